"""Slot hand-off (issue 12), step by step in-process (dispatcher/testing.py) against real MariaDB / SQLite and
Redis and a simulated GPU that accepts jobs and never calls back: the test plays the callbacks, so every
step happens in the order written and nothing depends on timing.

The proof that the next job started in the transaction that ended the one before: both rows carry that
transaction's one clock reading (``finished_at`` of the first == ``started_at`` of the next).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, text

from dispatcher.db.attempts import Backoff, cancel_task, expired_leases
from dispatcher.db.engine import make_engine, transaction
from dispatcher.db.gpus import record_failure, set_gpu_state
from dispatcher.db.handoff import end_and_hand_off
from dispatcher.loop import handoff as handoff_loop
from dispatcher.loop.core import Dispatcher
from dispatcher.loop.ready import BY_HANDOFF
from dispatcher.settings import DispatcherSettings
from dispatcher.states import GpuState, Outcome
from dispatcher.testing import in_process, settle
from producer.job import Job
from producer.keys import Priority, queue_key
from simgpu.fleet import SimFleet
from tests.dispatcher.harness import BEARER, SECRET
from tests.dispatcher.helpers import add_gpu, wait_for


class World:
    def __init__(self, url: str, redis_url: str, prefix: str, rds: redis.Redis, fleet: SimFleet) -> None:
        self.url, self.redis_url, self.prefix, self.rds, self.fleet = url, redis_url, prefix, rds, fleet
        self.queue = f"q-{uuid.uuid4().hex[:6]}"
        self.engine: Engine = make_engine(url, pool_size=2)

    def settings(self, gpus: list[str], **extra: Any) -> DispatcherSettings:
        options: dict[str, Any] = {
            "database_url": self.url,
            "redis_url": self.redis_url,
            "redis_key_prefix": self.prefix,
            "task_queues": self.queue,
            "gpu_endpoints": ",".join(f"{g}={self.fleet.url(g)}" for g in gpus),
            "callback_secret": SECRET,
            "bearer_token": BEARER,
            "slots_per_gpu": 2,
            "handoff_buffer": 8,
            "standby_jobs": True,  # the standby tests step it by hand; the hand-off tests never call step()
            "dispatcher_id": f"t-{uuid.uuid4().hex[:6]}",
        }
        return DispatcherSettings(**(options | extra))

    def push(self, n: int, priority: Priority = Priority.NORMAL) -> list[str]:
        ids = [f"{priority.value}-{uuid.uuid4().hex[:8]}" for _ in range(n)]
        for task_id in ids:
            job = Job(task_id=task_id, type="t", queue=self.queue, priority=priority, data={})
            self.rds.rpush(queue_key(self.queue, priority), job.to_redis())
        return ids

    def rows(self) -> dict[str, Any]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT task_id, state, attempt, gpu_id, slot_index, started_at, finished_at FROM tasks")
            ).all()
        return {r.task_id: r for r in rows}

    def state(self, task_id: str) -> str | None:
        row = self.rows().get(task_id)
        return None if row is None else str(row.state)

    def received(self) -> list[str]:
        return [j["task_id"] for j in self.fleet.stats()["jobs"]]

    def processing_list(self, d: Dispatcher) -> list[str]:
        return [el.decode().partition("\n")[2] for el in self.rds.lrange(d.intake.proc, 0, -1)]


@pytest.fixture
def world(any_database_url: str, redis_url: str, key_prefix: str, rds: redis.Redis) -> Iterator[World]:
    fleet = SimFleet(gpus=2, token=BEARER, seed=7, faults=["lost_callback"]).start()
    w = World(any_database_url, redis_url, key_prefix, rds, fleet)
    yield w
    fleet.stop()
    w.engine.dispose()
    for key in rds.scan_iter(f"{key_prefix}*"):
        rds.delete(key)
    for p in Priority:
        rds.delete(queue_key(w.queue, p))


def run(w: World, settings: DispatcherSettings, body: Callable[[Dispatcher], Awaitable[None]]) -> None:
    async def main() -> None:
        async with in_process(settings) as d:
            await body(d)

    asyncio.run(main())


async def finish(d: Dispatcher, task_id: str) -> str:
    """The GPU's ``finished`` callback for attempt 1, as the HTTP edge passes it on; its answer code."""
    fin = await d.ends.end_attempt(task_id, 1, Outcome.FINISHED, reported="finished")
    return fin.code


async def primed(w: World, d: Dispatcher, n: int) -> list[str]:
    """Push ``n`` jobs, fill the free slots, end the first attempt (its slot goes to the loop, nothing being
    buffered yet) and run the pass that fills that slot and the buffer. Returns the ids, oldest first."""
    ids = w.push(n)
    assert await d.dispatch_once()
    await settle(d)
    assert await finish(d, ids[0]) == "applied"
    assert await d.dispatch_once()
    await settle(d)
    return ids


def buffered(d: Dispatcher, pool: str) -> list[str]:
    """The task ids in ``pool``'s buffer, oldest first (popped and put back: the buffer is left as it was)."""
    jobs = d.handoffs.buffer.pop(pool, 99)
    d.handoffs.buffer.put_back(jobs)
    return [r.job.task_id for r in jobs]


@pytest.mark.parametrize("buffer", [8, 0])
def test_a_callback_starts_the_next_job_in_its_own_transaction(world: World, buffer: int) -> None:
    w = world

    async def body(d: Dispatcher) -> None:
        ids = await primed(w, d, 6)  # 1 GPU x 2 slots: ids[0] ended, ids[1] and ids[2] running
        assert [w.state(i) for i in ids[:3]] == ["finished", "processing", "processing"]
        assert d.handoffs.buffer.count("default") == (3 if buffer else 0)
        before = w.rows()[ids[1]]
        assert await finish(d, ids[1]) == "applied"
        rows = w.rows()
        if not buffer:  # HANDOFF_BUFFER=0: the slot waits for the loop
            assert ids[3] not in rows
            assert d.handoffs.handed_off == 0
            return
        nxt = rows[ids[3]]
        assert nxt.state == "processing"
        assert (nxt.gpu_id, nxt.slot_index) == (before.gpu_id, before.slot_index)
        assert nxt.started_at == rows[ids[1]].finished_at  # the same transaction
        await settle(d)
        assert ids[3] in w.received()
        assert d.handoffs.handed_off == 1
        assert sorted(w.processing_list(d)) == sorted(j.job.to_redis() for j in d.handoffs.buffer.drain())

    run(w, w.settings(["g0"], handoff_buffer=buffer), body)


@pytest.mark.parametrize("how", ["drained", "unhealthy"])
def test_a_gpu_out_of_rotation_gets_no_handoff(world: World, how: str) -> None:
    w = world

    async def body(d: Dispatcher) -> None:
        ids = await primed(w, d, 5)  # 2 GPUs x 1 slot: ids[1], ids[2] running, ids[3:] buffered
        gpu = w.rows()[ids[1]].gpu_id
        if how == "drained":
            transaction(w.engine, set_gpu_state, gpu_id=gpu, state=GpuState.DRAINING, now=d.now())
        else:
            transaction(
                w.engine, record_failure, gpu_id=gpu, error="x", threshold=1, probe_seconds=60, now=d.now()
            )
        assert await finish(d, ids[1]) == "applied"
        assert ids[3] not in w.rows()
        assert d.handoffs.handed_off == 0
        assert d.handoffs.buffer.count("default") == 2

    run(w, w.settings(["g0", "g1"], slots_per_gpu=1), body)


def test_a_handoff_goes_to_the_least_loaded_gpu_when_the_pool_is_not_full(world: World) -> None:
    w = world

    async def body(d: Dispatcher) -> None:
        ids = await primed(w, d, 5)  # g0 only: ids[1], ids[2] running, ids[3:] buffered
        # a GPU joins; nobody wakes this dispatcher, so its buffer still holds jobs while g1 is idle
        add_gpu(w.engine, "g1", 2, url=w.fleet.url("g1"), now=d.now())
        assert await finish(d, ids[1]) == "applied"
        assert w.rows()[ids[3]].gpu_id == "g1"  # g0 has 1 busy slot after the end, g1 none

    run(w, w.settings(["g0"]), body)


def test_a_job_cancelled_while_buffered_is_dropped_by_the_handoff_not_failed(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Its tombstone makes the hand-off's INSERT fail; the hand-off runs again looking first, as a pass does.
    It used to end the attempts without a hand-off and log a failure with a traceback: and the slot freed
    that way raced the loop's pass, which could start the jobs behind out of order (a flaky
    test_take_starvation)."""
    w = world

    async def body(d: Dispatcher) -> None:
        ids = await primed(w, d, 5)  # g0 x 2: ids[1], ids[2] running; ids[3], ids[4] buffered
        transaction(w.engine, cancel_task, task_id=ids[3], now=d.now(), backoff=Backoff())
        with caplog.at_level(logging.ERROR, logger="gpuq"):
            assert await finish(d, ids[1]) == "applied"
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        assert w.state(ids[1]) == "finished"
        assert w.state(ids[3]) == "cancelled"
        buffered = " ".join(d.handoffs.buffer.elements())
        assert ids[3] not in buffered and ids[4] in buffered  # dropped, not given back
        assert await d.dispatch_once()  # the slot it freed goes to the next job
        await settle(d)
        assert w.state(ids[4]) == "processing"
        assert ids[3] not in w.received()
        assert w.processing_list(d) == []

    run(w, w.settings(["g0"]), body)


def test_a_failed_handoff_still_ends_the_attempt_and_its_job_runs_later(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world

    def broken(conn: Any, **kwargs: Any) -> Any:
        if kwargs["candidates"]:
            raise RuntimeError("a hand-off that breaks")
        return end_and_hand_off(conn, **kwargs)

    async def body(d: Dispatcher) -> None:
        ids = await primed(w, d, 4)  # g0 x 2: ids[1], ids[2] running; ids[3] buffered
        monkeypatch.setattr(handoff_loop, "end_and_hand_off", broken)
        assert await finish(d, ids[1]) == "applied"  # the callback is not failed by the hand-off
        assert w.state(ids[1]) == "finished"
        assert w.state(ids[3]) is None  # not placed by the broken hand-off
        monkeypatch.undo()
        assert await d.dispatch_once()  # given back to the buffer: the loop places it
        await settle(d)
        assert w.state(ids[3]) == "processing"
        assert ids[3] in w.received()
        assert w.processing_list(d) == []

    run(w, w.settings(["g0"]), body)


def test_a_crash_between_the_commit_and_the_post_is_covered_by_the_lease(world: World) -> None:
    w = world

    async def body(d: Dispatcher) -> None:
        ids = await primed(w, d, 4)
        d.requests.fire = lambda placed, started: None  # type: ignore[method-assign]  # dies after COMMIT
        assert await finish(d, ids[1]) == "applied"
        assert w.state(ids[3]) == "processing"
        assert ids[3] not in w.received()
        wait_for(
            lambda: (ids[3], 1) in transaction(w.engine, expired_leases, now=d.now()), 10, what="lease over"
        )
        await d.housekeeping.expire_leases()
        assert w.state(ids[3]) == "retrying"  # tried again after its backoff, never lost

    run(w, w.settings(["g0"], task_timeout_seconds=0.5), body)


def test_a_later_high_priority_job_waits_behind_at_most_the_buffer(world: World) -> None:
    w = world
    size = 2

    async def body(d: Dispatcher) -> None:
        ids = await primed(w, d, 6)  # 1 slot: ids[1] running, ids[2], ids[3] buffered, ids[4:] in Redis
        [high] = w.push(1, Priority.HIGH)
        started, current = [], ids[1]
        for _ in range(4):
            assert await finish(d, current) == "applied"
            rows = w.rows()
            current = next(i for i in [*ids, high] if i in rows and rows[i].state == "processing")
            started.append(current)
            await d.dispatch_once()  # the loop tops the buffer up: high priority first
            await settle(d)
        # the high-priority job started behind the jobs already buffered (at most HANDOFF_BUFFER of them),
        # ahead of every normal job still in Redis when it was pushed
        assert started == [ids[2], ids[3], high, ids[4]]

    run(w, w.settings(["g0"], slots_per_gpu=1, handoff_buffer=size), body)


@pytest.mark.slow
def test_jobs_a_handoff_gives_back_while_draining_are_parked_not_left_in_the_buffer(world: World) -> None:
    """A hand-off that took its candidates before a drain began puts the ones it did not place back into the
    buffer after the drain parked it: they must be parked too, not wait in a buffer nobody serves until the
    process stops (README: "a draining dispatcher parks them at once")."""
    w = world

    async def body(d: Dispatcher) -> None:
        ids = await primed(w, d, 4)  # g0 x 2: ids[1], ids[2] running, ids[3] buffered
        real_db = d.rt.db_hot  # the group commit's transactions run on the hot thread
        draining: list[asyncio.Task[None]] = []

        async def db(fn: Callable[..., Any], /, **kwargs: Any) -> Any:
            if fn is end_and_hand_off and not draining:  # SIGTERM lands while the hand-off's transaction runs
                draining.append(asyncio.create_task(d.drain(10)))
                await asyncio.sleep(0)
            return await real_db(fn, **kwargs)

        d.rt.db_hot = db  # type: ignore[method-assign]
        # a repeated callback: frees nothing, so the hand-off's candidate ids[3] goes back to the buffer
        assert await finish(d, ids[0]) != "applied"
        assert await finish(d, ids[1]) == "applied"
        assert await finish(d, ids[2]) == "applied"
        await draining[0]  # nothing held any more: the drain is over
        await settle(d)
        assert d.handoffs.buffer.count("default") == 0
        parked = [
            el.decode() for el in w.rds.lrange(d.keys.parked(d.settings.all_queues[0], "default"), 0, -1)
        ]
        assert [json.loads(p)["task_id"] for p in parked] == [ids[3]]
        assert w.processing_list(d) == []
        returned = {"pool": "default", "to": "parked"}  # counted (gpuq_jobs_returned)
        assert d.metrics.registry.get_sample_value("gpuq_jobs_returned_total", returned) == 1

    run(w, w.settings(["g0"]), body)


def test_callbacks_of_two_pools_in_one_batch_each_hand_off_within_their_own_pool(world: World) -> None:
    w = world
    pool = f"p{uuid.uuid4().hex[:6]}"

    def push_u(n: int) -> list[str]:
        ids = [f"u-{uuid.uuid4().hex[:8]}" for _ in range(n)]
        for task_id in ids:
            job = Job(task_id=task_id, type="u", queue=pool, priority=Priority.NORMAL, data={})
            w.rds.rpush(queue_key(pool, Priority.NORMAL), job.to_redis())
        return ids

    async def body(d: Dispatcher) -> None:
        t, u = w.push(3), push_u(3)
        assert await d.dispatch_once()  # t[0] on g0, u[0] on g1: both pools full (primed, test_first_wave.py)
        await settle(d)
        assert await d.dispatch_once()  # so the next pass fills both buffers
        await settle(d)
        for first in (t[0], u[0]):  # each pool's first end hands its slot to its own pool's next job
            assert await finish(d, first) == "applied"
            await settle(d)
        assert d.handoffs.handed_off == 2
        assert d.handoffs.buffer.count("default") == 1
        assert d.handoffs.buffer.count(pool) == 1
        # both ends in one group-commit batch: one transaction hands each freed slot to its own pool's job
        assert await asyncio.gather(finish(d, t[1]), finish(d, u[1])) == ["applied", "applied"]
        rows = w.rows()
        assert (rows[t[2]].state, rows[t[2]].gpu_id) == ("processing", "g0")
        assert (rows[u[2]].state, rows[u[2]].gpu_id) == ("processing", "g1")
        assert rows[t[2]].started_at == rows[u[2]].started_at  # the same transaction
        assert d.handoffs.handed_off == 4

    try:
        gpus = f"g0={w.fleet.url('g0')},{pool}:g1={w.fleet.url('g1')}"
        settings = w.settings([], gpu_endpoints=gpus, slots_per_gpu=1, task_routes=f"u={pool}")
        run(w, settings, body)
    finally:
        for p in Priority:
            w.rds.delete(queue_key(pool, p))


def test_handoffs_to_a_gpu_refusing_connections_stop_once_it_is_out_of_rotation(world: World) -> None:
    """A GPU that refuses the hand-off's POST: each refusal ends the attempt (retried later) and hands the slot
    to the next buffered job, until the failures take the GPU out of rotation; then the buffer keeps the rest.
    No slot stays held, no job is lost."""
    w = world

    async def body(d: Dispatcher) -> None:
        ids = await primed(w, d, 8)  # g0 x 2: ids[1], ids[2] running, ids[3:] buffered (5)
        with w.engine.begin() as conn:  # the GPU's service goes away: nothing listens there any more
            conn.execute(text("UPDATE gpus SET url = 'http://127.0.0.1:9/' WHERE gpu_id = 'g0'"))
        assert await finish(d, ids[1]) == "applied"
        await settle(d)
        rows = w.rows()
        failed = [i for i in ids[3:] if i in rows]
        assert len(failed) == 3  # GPU_FAILURE_THRESHOLD refusals, then g0 is unhealthy
        assert all(rows[i].state == "retrying" for i in failed)
        with w.engine.connect() as conn:
            busy = conn.execute(text("SELECT task_id FROM slots WHERE task_id IS NOT NULL")).scalars().all()
            healthy = conn.execute(text("SELECT healthy FROM gpus WHERE gpu_id = 'g0'")).scalar_one()
        assert busy == [ids[2]] and not healthy
        assert d.handoffs.buffer.count("default") == 2
        held = sorted(w.processing_list(d))
        assert held == sorted(j.job.to_redis() for j in d.handoffs.buffer.drain())

    run(w, w.settings(["g0"]), body)


def test_a_pool_of_more_slots_than_handoff_buffer_buffers_one_job_per_active_slot(world: World) -> None:
    """Its callbacks empty a HANDOFF_BUFFER-sized buffer faster than a loop short of CPU refills it
    (``ready.SLOTS_CAP_FACTOR``): housekeeping reads the pool's slots, the buffer holds one job per slot."""
    w = world

    async def body(d: Dispatcher) -> None:
        await d.housekeeping.read_pools()  # g0, g1 x 2 slots: 4 > HANDOFF_BUFFER 1
        assert d.handoffs.buffer.cap("default") == 4
        ids = await primed(w, d, 12)  # 4 running, the first ended and refilled: 5 started
        assert d.handoffs.buffer.count("default") == 4
        assert [r.job.task_id for r in d.handoffs.buffer.pop("default", 9)] == ids[5:9]
        # a drained GPU's slots no longer count: g0's 2 slots
        transaction(w.engine, set_gpu_state, gpu_id="g1", state=GpuState.DRAINING, now=d.now())
        await d.housekeeping.read_pools()
        assert d.handoffs.buffer.cap("default") == 2

    run(w, w.settings(["g0", "g1"], handoff_buffer=1, standby_jobs=False), body)


def test_a_running_dispatcher_reads_its_pools_slots_by_itself(world: World) -> None:
    """The sizes come from housekeeping's own schedule, not only from a test's call (an outside review: with
    the duty unscheduled, the test above still passed)."""
    w = world

    async def main() -> None:
        async with in_process(w.settings(["g0", "g1"], handoff_buffer=1), background=True) as d:
            for _ in range(200):
                if d.handoffs.buffer.cap("default") == 4:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(f"buffer size {d.handoffs.buffer.cap('default')} after 10 s, not 4")

    asyncio.run(main())


def test_jobs_a_refilled_buffer_pushes_out_start_before_younger_ones_the_next_take_finds(
    world: World,
) -> None:
    """A pass refills the buffer while a hand-off holds its candidates; given back, they push the youngest
    buffered jobs out to be parked. The pass that parked them took younger jobs from Redis first (its take came
    before ``lapsed``): those were buffered, and the next hand-offs started them while the older ones waited
    parked (an outside review). The parking is now settled before the take, which serves parked jobs first."""
    w = world

    async def body(d: Dispatcher) -> None:
        buf = d.handoffs.buffer
        ids = await primed(w, d, 10)  # g0 x 2: ids[1], ids[2] running, ids[3], ids[4] buffered
        assert buffered(d, "default") == ids[3:5]
        out = buf.pop("default", 2, BY_HANDOFF)  # a hand-off's candidates, its transaction in flight
        d.handoffs.in_flight.update(r.element for r in out)
        assert await d.dispatch_once()  # the loop refills meanwhile: ids[5], ids[6]
        await settle(d)
        d.handoffs._return(out)  # given back: ids[5], ids[6] pushed out, to be parked
        assert buffered(d, "default") == ids[3:5]
        assert await finish(d, ids[1]) == "applied"  # a hand-off starts ids[3]: room for one more
        await d.dispatch_once()
        await settle(d)
        for t in ids[2:5]:  # the next ends: each hand-off starts the oldest waiting job
            assert await finish(d, t) == "applied"
            await d.dispatch_once()
            await settle(d)
        rows = w.rows()
        started = sorted((rows[t].started_at, ids.index(t)) for t in ids if t in rows and rows[t].started_at)
        assert [i for _, i in started] == sorted(i for _, i in started), started

    run(w, w.settings(["g0"], handoff_buffer=2, standby_jobs=False), body)
