"""Partial output (SPEC §4: ``running`` callbacks carrying ``"partial"``) is passed on and not stored: a GPU
streaming tokens must not cost a database transaction per token. The lease is still extended, at most once
per ``min(TASK_TIMEOUT_SECONDS / 3, 5 s)`` per attempt and process, and a cancel is still answered 409 at
once. In-process (dispatcher/testing.py): commits are counted with ``gpuq_db_commits``, nothing is timed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from dispatcher.http import cancel_api
from dispatcher.loop.core import Dispatcher
from dispatcher.loop.renewals import Renewals
from dispatcher.settings import DispatcherSettings
from dispatcher.testing import in_process, settle
from producer.job import Job
from producer.keys import Priority, queue_key
from simgpu.fleet import SimFleet
from tests.dispatcher.harness import BEARER, SECRET


@pytest.fixture
def fleet() -> Iterator[SimFleet]:
    f = SimFleet(gpus=1, token=BEARER, seed=7, faults=["lost_callback"]).start()
    yield f
    f.stop()


def _commits(d: Dispatcher) -> float:
    return float(d.metrics.db_commits._value.get())


def test_partials_do_not_write_to_the_database_and_a_cancel_still_stops_them(
    any_database_url: str, redis_url: str, key_prefix: str, rds: redis.Redis, fleet: SimFleet
) -> None:
    queue = f"q-{uuid.uuid4().hex[:6]}"
    task_id = f"stream-{uuid.uuid4().hex[:6]}"
    rds.rpush(queue, Job(task_id=task_id, type="t", queue=queue).to_redis())
    options: dict[str, Any] = {
        "database_url": any_database_url,
        "redis_url": redis_url,
        "redis_key_prefix": key_prefix,
        "task_queues": queue,
        "gpu_endpoints": f"g0={fleet.url('g0')}",
        "callback_secret": SECRET,
        "bearer_token": BEARER,
        "task_timeout_seconds": 600,
        "dispatcher_id": f"t-{uuid.uuid4().hex[:6]}",
    }

    async def main() -> None:
        async with in_process(DispatcherSettings(**options)) as d:
            assert await d.dispatch_once()
            await settle(d)
            # WHEN the GPU streams 50 partials for the running attempt
            before = _commits(d)
            for i in range(50):
                fin = await d.ends.heartbeat(task_id, 1, {}, partial={"i": i})
                assert (fin.code, fin.state) == ("applied", "processing")
            # THEN one transaction extended the lease, not fifty
            assert _commits(d) - before <= 1, _commits(d) - before
            # AND a heartbeat without partial still extends the lease in the database
            before = _commits(d)
            assert (await d.ends.heartbeat(task_id, 1, {})).code == "applied"
            assert _commits(d) - before == 1
            # AND once the task is cancelled, the next partial is refused (409), not answered from memory
            out = await cancel_api.cancel(task_id, d)
            assert out.applied and out.slot_held
            fin = await d.ends.heartbeat(task_id, 1, {}, partial={"i": 50})
            assert (fin.code, fin.state) == ("stale", "cancelled")

    try:
        asyncio.run(main())
    finally:
        for p in Priority:
            rds.delete(queue_key(queue, p))


def test_a_partial_extends_the_lease_again_once_the_interval_is_over() -> None:
    now = [100.0]
    r = Renewals(every=5.0, clock=lambda: now[0])
    assert not r.fresh("a", 1)  # never extended here: the partial goes to the database
    r.extended("a", 1)
    now[0] += 4.9
    assert r.fresh("a", 1) and not r.fresh("a", 2) and not r.fresh("b", 1)
    now[0] += 0.2
    assert not r.fresh("a", 1)  # the interval is over: the next partial extends the lease again
    r.extended("a", 1)
    r.extended("b", 1)
    r.forget("a")  # the attempt ended in this process
    assert not r.fresh("a", 1) and r.fresh("b", 1)
    r.forget()  # a cancel somewhere
    assert not r.fresh("b", 1)
