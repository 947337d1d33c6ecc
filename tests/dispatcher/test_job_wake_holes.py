"""Holes in "a job pushed reads the free slots only when some may be idle" (issue 12, 5c1cd57).

A pass that read the free slots records "none left free" from ``left``, the room it counted minus the jobs it
meant to place there. A job that counted against that room but took no slot (a copy of a job in the same
batch, dropped; a copy of a known task; a scheduled job) leaves a slot free that the pass called busy: the
next job pushed was not looked for, and waited in the buffer beside the free slot until the idle poll. And a
job pushed while a GPU was added with SQL was bound as a standby behind a busy slot and stayed there after the
idle poll found the GPU (standbys bound under IDLE_TAKE_BACK_SECONDS ago were left where they were).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from dispatcher.loop import standbys
from dispatcher.loop.core import Dispatcher
from dispatcher.testing import in_process, settle
from producer.job import Job
from producer.keys import Priority, queue_key
from tests.dispatcher.test_handoff import World, buffered, run, world  # noqa: F401


def _push_twice(w: World) -> str:
    """One job pushed twice (a producer retrying its push): the second copy is dropped at placement."""
    task_id = f"dup-{uuid.uuid4().hex[:8]}"
    raw = Job(task_id=task_id, type="t", queue=w.queue, priority=Priority.NORMAL, data={}).to_redis()
    w.rds.rpush(queue_key(w.queue, Priority.NORMAL), raw, raw)
    return task_id


def test_a_job_that_took_no_slot_does_not_make_the_pass_call_the_pools_full(world: World) -> None:  # noqa: F811
    w = world

    async def body(d: Dispatcher) -> None:
        dup = _push_twice(w)
        assert await d.dispatch_once()  # reads: g0 has 2 free; both copies taken, one placed, one dropped
        await settle(d)
        assert w.state(dup) == "processing"
        free = [r for r in w.rows().values() if r.state == "processing"]
        assert len(free) == 1, "one of g0's two slots is still free"
        # WHEN a job is pushed
        later = w.push(1)
        d.wake.event.clear()
        d.wake.job_pushed()
        assert await d.dispatch_once()
        await settle(d)
        # THEN it takes the free slot, not the buffer
        assert buffered(d, "default") == []
        assert w.state(later[0]) == "processing", "a job waited in the buffer beside a free slot"

    run(w, w.settings(["g0"], standby_jobs=False), body)


def test_the_running_loop_places_a_job_pushed_after_a_dropped_copy_at_once(world: World) -> None:  # noqa: F811
    """The running loop, standbys on (the default): it waited for the idle poll (bound as a standby behind the
    busy slot until a read found the free one); the push's wake-up places it. IDLE_POLL_SECONDS is 3 s here so
    that the two are far apart on a busy machine."""
    w = world

    async def main() -> None:
        settings = w.settings(["g0"], idle_poll_seconds=3)
        async with in_process(settings, background=True) as d:
            dup = _push_twice(w)
            w.rds.publish(d.keys.wake, "job")
            for _ in range(100):
                if w.state(dup) == "processing":
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)  # the pass is over: g0's second slot is free
            later = w.push(1)
            pushed = time.monotonic()
            w.rds.publish(d.keys.wake, "job")
            while w.state(later[0]) != "processing":
                assert time.monotonic() - pushed < 1.5, "a job waited beside a free slot"
                await asyncio.sleep(0.02)

    asyncio.run(main())


def test_a_standby_bound_in_the_skip_window_takes_a_gpu_added_behind_its_back_at_the_idle_poll(
    world: World,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """test_job_wake's last test with standbys on (the default): a job pushed while the last full read is
    under IDLE_POLL_SECONDS old is bound as a standby behind a busy slot of g0, then a GPU is added with SQL;
    the idle poll's read found g1 but left a standby bound under IDLE_TAKE_BACK_SECONDS ago where it was (5 s
    here): it waited ~2 s (until its pool's priming lapsed), now about the idle poll (0.1 s)."""
    from tests.dispatcher.helpers import add_gpu

    monkeypatch.setattr(standbys, "IDLE_TAKE_BACK_SECONDS", 5.0)
    w = world

    async def main() -> None:
        settings = w.settings(["g0"], idle_poll_seconds=0.1)
        async with in_process(settings, background=True) as d:
            first = w.push(2)
            w.rds.publish(d.keys.wake, "job")
            while not all(w.state(i) == "processing" for i in first):
                await asyncio.sleep(0.02)
            later = w.push(1)
            w.rds.publish(d.keys.wake, "job")  # the last full read is fresh: no read, the job is buffered
            for _ in range(500):  # and bound as a standby behind a busy slot of g0
                if len(d.standbys) == 1:
                    break
                await asyncio.sleep(0.01)
            assert len(d.standbys) == 1, "the job pushed was not bound as a standby"
            add_gpu(w.engine, "g1", 2, url=w.fleet.url("g1"), now=d.now())
            added = time.monotonic()
            while w.state(later[0]) != "processing":
                assert time.monotonic() - added < 1.2, (
                    "a standby waited past IDLE_POLL_SECONDS beside a free GPU"
                )
                await asyncio.sleep(0.02)

    asyncio.run(main())
