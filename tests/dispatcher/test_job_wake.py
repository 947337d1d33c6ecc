"""A job pushed (the wake channel's "job") reads the free slots only when some may be idle (issue 12).

Every push made the next pass read every pool's free slots from the database: in the efficiency run the
driver's 65 pushes cost 30 reads in the first half second, while the first waves of callbacks were being
handled. A push frees no slot, so when the last read found none left free, the pass only takes jobs for the
buffers; a slot freed behind the dispatcher's back (an operator's SQL, no wake-up) is still found within
``IDLE_POLL_SECONDS`` however often jobs are pushed. In-process against real MariaDB / SQLite and Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from dispatcher.loop import placing
from dispatcher.loop.core import Dispatcher
from dispatcher.testing import in_process, settle
from tests.dispatcher.helpers import add_gpu
from tests.dispatcher.test_handoff import World, buffered, finish, run, world  # noqa: F401


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times a pass read the free slots (``snapshot``), as a one-item list."""
    reads = [0]
    real = placing.snapshot

    def counted(conn: Any, **kwargs: Any) -> Any:
        reads[0] += 1
        return real(conn, **kwargs)

    monkeypatch.setattr(placing, "snapshot", counted)
    return reads


def test_a_job_pushed_while_every_slot_is_busy_reads_no_free_slots(
    world: World,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w = world
    reads = _count_reads(monkeypatch)

    async def body(d: Dispatcher) -> None:
        first = w.push(2)
        assert await d.dispatch_once()  # a new dispatcher looks: both slots of g0 taken
        await settle(d)
        assert [w.state(i) for i in first] == ["processing", "processing"]
        assert reads[0] == 1
        # WHEN jobs are pushed while no slot is free
        later = w.push(3)
        d.wake.event.clear()
        d.wake.job_pushed()
        # THEN the loop is woken to take them into its buffer, without reading the free slots
        assert d.wake.event.is_set()
        assert await d.dispatch_once()
        await settle(d)
        assert reads[0] == 1, "a push with every slot busy read the free slots"
        assert buffered(d, "default") == later
        # AND a callback hands the freed slot to the oldest of them
        assert await finish(d, first[0]) == "applied"
        await settle(d)
        assert w.state(later[0]) == "processing"

    run(w, w.settings(["g0"], standby_jobs=False), body)


@pytest.mark.parametrize("before", ["a slot left idle", "no pass yet"])
def test_a_job_pushed_while_a_slot_may_be_idle_looks_for_it(
    world: World,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    before: str,
) -> None:
    w = world
    reads = _count_reads(monkeypatch)

    async def body(d: Dispatcher) -> None:
        if before == "a slot left idle":
            one = w.push(1)
            assert await d.dispatch_once()  # one of g0's two slots taken, the other left free
            await settle(d)
            assert w.state(one[0]) == "processing"
        d.wake.look_wanted()  # a new dispatcher's own first look is not what this is about
        read = reads[0]
        job = w.push(1)
        d.wake.job_pushed()
        assert await d.dispatch_once()
        await settle(d)
        assert reads[0] == read + 1
        assert w.state(job[0]) == "processing"

    run(w, w.settings(["g0"], standby_jobs=False), body)


async def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s: {what}")


def test_a_push_through_the_wake_channel_places_a_job_on_an_idle_slot_at_once(world: World) -> None:  # noqa: F811
    """The running loop, its listener on Redis: the push's wake-up, not the idle poll (30 s here), places it."""
    w = world

    async def main() -> None:
        settings = w.settings(["g0"], idle_poll_seconds=30, standby_jobs=False)
        async with in_process(settings, background=True) as d:
            one = w.push(1)
            w.rds.publish(d.keys.wake, "job")
            await _until(lambda: w.state(one[0]) == "processing", 10, "the first job placed")
            await asyncio.sleep(0.2)  # the loop goes idle: g0's second slot is free
            two = w.push(1)
            w.rds.publish(d.keys.wake, "job")
            await _until(lambda: w.state(two[0]) == "processing", 10, "a job pushed onto an idle slot")

    asyncio.run(main())


def test_a_slot_freed_behind_its_back_is_found_however_often_jobs_are_pushed(world: World) -> None:  # noqa: F811
    """A GPU added with SQL (no wake-up) while the fleet is full and a producer pushes every 50 ms: each push
    wakes the loop, so its idle poll never runs out; the GPU is still looked for within IDLE_POLL_SECONDS."""
    w = world

    async def main() -> None:
        settings = w.settings(["g0"], idle_poll_seconds=0.3, standby_jobs=False, handoff_buffer=1)
        async with in_process(settings, background=True) as d:
            first = w.push(2)
            w.rds.publish(d.keys.wake, "job")
            await _until(lambda: all(w.state(i) == "processing" for i in first), 10, "g0 full")
            add_gpu(w.engine, "g1", 2, url=w.fleet.url("g1"), now=d.now())

            def on_g1() -> bool:
                return any(r.gpu_id == "g1" for r in w.rows().values())

            for _ in range(200):  # 10 s of pushes, each waking the loop
                if on_g1():
                    return
                w.push(1)
                w.rds.publish(d.keys.wake, "job")
                await asyncio.sleep(0.05)
            raise AssertionError("no job reached a GPU added behind the dispatcher's back in 10 s of pushes")

    asyncio.run(main())
