"""First-wave priming (``ReadyBuffer.prime``) keeps the queue's order when its jobs go back: an outside
review's reproductions (2026-12-02), each a bug found and fixed.

- jobs given back to a priority list whose pool has jobs set aside go to the head of that set-aside list,
  which a take serves first (``Settlement.back``, ``SETTLE``'s ``lpushx``/``lpushelse``);
- a pass that gives a lapsed pool's jobs back sends its own fresh jobs of that pool the same way, even if a
  callback puts the pool in demand meanwhile (``Placing._fill``, ``gone``);
- the idle loop wakes when a buffer lapses, not one idle poll later (``ReadyBuffer.next_lapse``);
- a lapsed priming takes back only the standbys bound since it (``ReadyBuffer.unprimed``);
- parked lists are served before their queue's lists for their pool, in that queue's turns (``TAKE``).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from dispatcher.db.attempts import Backoff, cancel_task
from dispatcher.db.engine import transaction
from dispatcher.loop import ready
from dispatcher.loop.core import Dispatcher
from dispatcher.queues import intake as intake_mod
from dispatcher.testing import in_process, settle
from producer.job import Job
from producer.keys import Priority, queue_key
from tests.dispatcher.helpers import add_gpu
from tests.dispatcher.test_first_wave import (
    _fill_and_buffer,
    _held_in_demand,
    _lapse,
    _parked,
    _queued,
)
from tests.dispatcher.test_handoff import World, finish, run, world  # noqa: F401
from tests.dispatcher.test_handoff_order import buffered
from tests.dispatcher.test_standby_loop import _next_of


def _push_typed(w: World, typ: str, n: int, prefix: str) -> list[str]:
    ids = [f"{prefix}-{uuid.uuid4().hex[:6]}" for _ in range(n)]
    for task_id in ids:
        job = Job(task_id=task_id, type=typ, queue=w.queue, priority=Priority.NORMAL, data={})
        w.rds.rpush(queue_key(w.queue, Priority.NORMAL), job.to_redis())
    return ids


def _ids(w: World, key: str) -> list[str]:
    return [str(json.loads(raw)["task_id"]) for raw in w.rds.lrange(key, 0, -1)]


def test_jobs_given_back_to_a_list_whose_pool_has_jobs_set_aside_are_not_overtaken_by_them(
    world: World,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A queue mixing two pools (README "Placement": set-aside lists). Pool default is primed and buffers
    t2, t3 taken from the queue's normal list. A take for the other pool then sets aside the default jobs
    at the list's head (t4..). The priming lapses: t2, t3 go back to the head of the *normal list*, behind
    (in service order) the set-aside list, which a take serves first for its pool: t4 starts before t2."""
    _held_in_demand(monkeypatch)
    monkeypatch.setattr(intake_mod, "SCAN_DEPTH", 4)
    w = world
    other = f"p{uuid.uuid4().hex[:6]}"

    async def body(d: Dispatcher) -> None:
        t = _push_typed(w, "t", 2, "t")
        assert await d.dispatch_once()  # t0, t1 on g0's 2 slots: default is full, primed
        await settle(d)
        assert [w.state(i) for i in t] == ["processing", "processing"]
        t += _push_typed(w, "t", 10, "t")
        await d.dispatch_once()  # default's buffer: t2, t3 (HANDOFF_BUFFER=2)
        await settle(d)
        assert buffered(d, "default") == t[2:4]
        _push_typed(w, "u", 2, "u")  # jobs of the other pool, behind the default ones
        d.wake.look_now()
        await d.dispatch_once()  # a take for `other` (room 2) skips t4..t7 and sets them aside
        await settle(d)
        aside = d.keys.aside(w.queue, Priority.NORMAL, "default")
        assert _ids(w, aside)[:1] == [t[4]]
        _lapse(monkeypatch)
        await d.dispatch_once()  # the priming lapsed: t2, t3 given back, to the head of the set-aside list
        await settle(d)
        assert _ids(w, aside)[:3] == t[2:5]
        _held_in_demand(monkeypatch)
        assert await finish(d, t[0]) == "applied"  # the first slot of default frees at last
        await d.dispatch_once()
        await settle(d)
        running = [i for i in t[2:] if w.state(i) == "processing"]
        assert running == [t[2]]  # the oldest waiting job of the pool

    gpus = f"g0={w.fleet.url('g0')},{other}:g1={w.fleet.url('g1')}"
    settings = w.settings(
        [], gpu_endpoints=gpus, task_routes=f"u={other}", handoff_buffer=2, standby_jobs=False
    )
    run(w, settings, body)


def test_a_callback_during_the_pass_that_gives_a_lapsed_priming_back_lets_no_younger_job_run_first(
    world: World,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pass gives back the primed pool's buffered jobs (t2, t3: ``lapsed`` says ``goes_back``) and then,
    after its placement transaction for another pool, decides the jobs its take got for the primed pool
    (t4, t5) again (``buffer.add`` / ``_refused``). A callback of the primed pool that lands during that
    transaction puts the pool in demand: t4, t5 are buffered while t2, t3 go to the queue's head; the freed
    slot then gets t4."""
    _held_in_demand(monkeypatch)
    w = world
    other = f"p{uuid.uuid4().hex[:6]}"

    async def body(d: Dispatcher) -> None:
        t = _push_typed(w, "t", 4, "t")
        assert await d.dispatch_once()  # t0, t1 running: default primed
        await settle(d)
        await d.dispatch_once()  # t2, t3 buffered; room for 2 more
        await settle(d)
        assert buffered(d, "default") == t[2:4]
        t += _push_typed(w, "t", 2, "t")
        u = _push_typed(w, "u", 2, "u")
        take, place = d.intake.take, d.placing._place

        async def slow_take(*args: Any, **kwargs: Any) -> Any:  # the priming lapses during the take
            out = await take(*args, **kwargs)
            _lapse(monkeypatch)
            return out

        async def place_during_a_callback(*args: Any, **kwargs: Any) -> Any:
            # meanwhile t0's callback (a job of ~DEMAND_SECONDS) reaches this process
            _held_in_demand(monkeypatch)
            assert await finish(d, t[0]) == "applied"
            return await place(*args, **kwargs)

        monkeypatch.setattr(d.intake, "take", slow_take)
        monkeypatch.setattr(d.placing, "_place", place_during_a_callback)
        d.wake.look_now()  # the other pool's room is read: u0, u1 placed in this pass
        await d.dispatch_once()
        assert [w.state(i) for i in u] == ["processing", "processing"]
        await settle(d)
        monkeypatch.setattr(d.intake, "take", take)
        monkeypatch.setattr(d.placing, "_place", place)
        await d.dispatch_once()  # the slot t0 freed
        await settle(d)
        running = [i for i in t[2:] if w.state(i) == "processing"]
        assert running == [t[2]]

    gpus = f"g0={w.fleet.url('g0')},{other}:g1={w.fleet.url('g1')}"
    settings = w.settings(
        [], gpu_endpoints=gpus, task_routes=f"u={other}", handoff_buffer=4, standby_jobs=False
    )
    run(w, settings, body)


def test_a_lapsed_priming_is_given_back_when_it_lapses_not_at_the_next_idle_poll(
    world: World,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """README: "a long-job pool holds jobs outside its queue for those 2 s only". The loop running for real
    (background), STANDBY_JOBS=false, IDLE_POLL_SECONDS=5, DEMAND_SECONDS 0.3 here: nothing woke the loop
    when the priming lapsed, so the buffered jobs stayed out of their queue until the next idle poll (5 s).
    The bound checked is far from both (a loaded machine must not fail it)."""
    monkeypatch.setattr(ready, "DEMAND_SECONDS", 0.3)
    w = world

    async def main() -> None:
        settings = w.settings(["g0"], standby_jobs=False, idle_poll_seconds=5.0)
        async with in_process(settings, background=True) as d:
            await asyncio.sleep(0.5)  # first sweep, loop idle
            ids = w.push(6)
            d.wake.look_now()
            t0 = time.monotonic()
            while len(w.processing_list(d)) < 4 and time.monotonic() - t0 < 3:
                await asyncio.sleep(0.01)
            assert len(w.processing_list(d)) == 4, "the primed buffer took ids[2:]"
            filled = time.monotonic()
            while _queued(w) != ids[2:] and time.monotonic() - filled < 8:
                await asyncio.sleep(0.05)
            held = time.monotonic() - filled
            assert held < 2.5, f"held {held:.2f} s (IDLE_POLL_SECONDS 5: the lapse must wake the loop)"

    asyncio.run(main())


def _age(d: Dispatcher, attr: str, pool: str = "default", by: float = 10.0) -> None:
    """Make the pool's last freed slot (``_demand``) or priming (``_primed``) ``by`` seconds older."""
    for name in (attr, "_primed_first") if attr == "_primed" else (attr,):
        table = getattr(d.handoffs.buffer, name)
        if pool in table:
            table[pool] -= by


def test_standbys_bound_while_slots_were_seen_freed_do_not_go_back_behind_younger_parked_jobs(
    world: World,  # noqa: F811
) -> None:
    """A pool in demand (callbacks here) binds standbys; the demand lapses and its buffered jobs are parked
    (younger than the standbys). Then a pass fills the pool's last slots (a GPU joined) and primes it. When
    that priming lapses, ``unprimed`` took back *every* standby of the pool, also those bound before, and
    they went back to the head of the queue's list, while the younger jobs sat in the parked list, which is
    served first: the younger jobs started before the older standbys. Only those bound since go back now."""
    w = world

    async def body(d: Dispatcher) -> None:
        j = w.push(16)
        assert await d.dispatch_once()  # j0, j1 on g0: primed
        await settle(d)
        await d.dispatch_once()  # buffer j2..j9
        await settle(d)
        await d.standbys.step()  # j2, j3 standbys of j0, j1
        await settle(d)
        assert sorted(_standby_ids(w)) == sorted(j[2:4])
        assert await finish(d, j[0]) == "applied"  # a slot freed here: the pool is in demand (not primed)
        await settle(d)
        await d.dispatch_once()
        await settle(d)
        await d.standbys.step()
        await settle(d)
        kept = _standby_ids(w)  # bound while this process saw the pool's slots freed
        assert kept
        _age(d, "_demand")  # no slot freed for a while: the demand lapses
        _age(d, "_primed")
        await d.dispatch_once()  # its buffer is parked
        await settle(d)
        add_gpu(w.engine, "g1", 2, url=w.fleet.url("g1"), now=d.now())
        d.wake.look_now()
        await d.dispatch_once()  # g1's 2 slots get the parked jobs; the pool is full: primed
        await settle(d)
        await d.dispatch_once()  # its buffer refilled
        await settle(d)
        await d.standbys.step()
        await settle(d)
        _age(d, "_primed")  # the priming lapses, no slot freed: time passes for the standbys too
        for s in d.standbys._by_task.values():
            s.since -= 10.0
        await d.standbys.step()  # takes back the standbys bound since the priming
        await settle(d)
        await d.dispatch_once()  # gives back
        await settle(d)
        # Older than every parked job, they stay bound (given back, they went behind the parked ones)
        assert [w.state(i) for i in kept] == ["standby"] * len(kept)
        assert sorted(_standby_ids(w)) == sorted(kept)  # those bound since the priming went back
        assert min(j.index(p) for p in _parked(w)) > max(j.index(k) for k in kept)
        waiting = [i for i in j if w.state(i) in (None, "queued")]
        for holder in [i for i in j if w.state(i) == "processing" and w.rows()[i].gpu_id == "g0"]:
            assert await finish(d, holder) == "applied"
            await settle(d)
        await d.dispatch_once()
        await settle(d)
        assert [w.state(i) for i in kept] == ["processing"] * len(kept)  # they started first
        assert [i for i in waiting if w.state(i) == "processing"] == []

    run(w, w.settings(["g0"]), body)


def _standby_ids(w: World) -> list[str]:
    return list(_next_of(w).values())


def test_parked_jobs_are_taken_before_the_queue_s_jobs_of_their_pool(world: World) -> None:  # noqa: F811
    """Intake.take's docstring / README: "Parked lists are served first for their pool". (Pre-existing; the
    priming makes a pass take from both at once.)"""
    w = world

    async def body(d: Dispatcher) -> None:
        older = w.push(3)
        for raw in w.rds.lrange(queue_key(w.queue, Priority.NORMAL), 0, -1):
            w.rds.rpush(d.keys.parked(w.queue, "default"), raw)
        w.rds.delete(queue_key(w.queue, Priority.NORMAL))
        w.push(3)  # younger, in the queue
        taken = await d.intake.take(2, {"default": 2})
        got = [json.loads(t.raw)["task_id"] for t in taken]
        assert got == older[:2]

    run(w, w.settings(["g0"]), body)


def test_a_redis_error_during_the_give_back_loses_nothing_and_keeps_the_order(
    world: World,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _held_in_demand(monkeypatch)
    w = world

    async def body(d: Dispatcher) -> None:
        ids = await _fill_and_buffer(w, d, 6)
        later = w.push(2)
        real = d.intake._settle
        calls = {"n": 0}

        async def failing(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RedisConnectionError("Redis restarted")
            return await real(*args, **kwargs)

        monkeypatch.setattr(d.intake, "_settle", failing)
        _lapse(monkeypatch)
        with pytest.raises(RedisConnectionError):
            await d.dispatch_once()
        d.handoffs.reconcile_at = 0.0  # as the loop does after a TRANSIENT error
        await d.dispatch_once()
        await settle(d)
        await d.dispatch_once()
        await settle(d)
        assert _queued(w) == ids[2:] + later
        assert w.processing_list(d) == []
        assert _parked(w) == []

    run(w, w.settings(["g0"], standby_jobs=False), body)


def test_a_primed_job_cancelled_then_given_back_never_runs(
    world: World,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _held_in_demand(monkeypatch)
    w = world

    async def body(d: Dispatcher) -> None:
        ids = await _fill_and_buffer(w, d, 6)
        await d.standbys.step()  # ids[2], ids[3] standbys
        await settle(d)
        transaction(w.engine, cancel_task, task_id=ids[3], now=d.now(), backoff=Backoff())
        transaction(w.engine, cancel_task, task_id=ids[4], now=d.now(), backoff=Backoff())
        _lapse(monkeypatch)
        await d.standbys.step()
        await settle(d)
        await d.dispatch_once()
        await settle(d)
        _held_in_demand(monkeypatch)
        for holder in ids[:2]:
            assert await finish(d, holder) == "applied"
            await settle(d)
            await d.dispatch_once()
            await settle(d)
        assert ids[3] not in w.received() and ids[4] not in w.received()
        assert w.state(ids[2]) == "processing" and w.state(ids[5]) == "processing"

    run(w, w.settings(["g0"]), body)
