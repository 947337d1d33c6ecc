"""A job the dispatcher itself put back in Redis (a retry whose backoff is over) and that a job rule then
refuses is dead-lettered; its task must not stay ``queued`` with no job anywhere to take it. In-process
(dispatcher/testing.py) against the real stores, a simulated GPU that never calls back: the test plays
the callbacks, so every step happens in the order written."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from dispatcher.db.engine import make_engine, transaction
from dispatcher.db.reads import get_task
from dispatcher.settings import DispatcherSettings
from dispatcher.states import Outcome
from dispatcher.testing import in_process, settle
from producer.job import Job
from producer.keys import Keys, Priority, queue_key
from simgpu.fleet import SimFleet
from tests.dispatcher.harness import BEARER, SECRET


@pytest.fixture
def fleet() -> Iterator[SimFleet]:
    f = SimFleet(gpus=1, token=BEARER, seed=7, faults=["lost_callback"]).start()
    yield f
    f.stop()


def _settings(
    url: str, redis_url: str, prefix: str, queue: str, fleet: SimFleet, **extra: Any
) -> DispatcherSettings:
    options: dict[str, Any] = {
        "database_url": url,
        "redis_url": redis_url,
        "redis_key_prefix": prefix,
        "task_queues": queue,
        "gpu_endpoints": f"g0={fleet.url('g0')}",
        "callback_secret": SECRET,
        "bearer_token": BEARER,
        "retry_backoff_seconds": 0,
        "dispatcher_id": f"t-{uuid.uuid4().hex[:6]}",
    }
    return DispatcherSettings(**(options | extra))


def test_a_retry_refused_by_a_job_rule_fails_its_task_with_the_reason(
    any_database_url: str, redis_url: str, key_prefix: str, rds: redis.Redis, fleet: SimFleet
) -> None:
    queue = f"q-{uuid.uuid4().hex[:6]}"
    # GIVEN a 100 KB job, accepted and started by a dispatcher with the default MAX_JOB_BYTES (256 KiB)
    job = Job(task_id=f"big-{uuid.uuid4().hex[:6]}", type="t", queue=queue, data={"blob": "x" * 100_000})
    rds.rpush(queue, job.to_redis())
    first = _settings(any_database_url, redis_url, key_prefix, queue, fleet)
    later = _settings(any_database_url, redis_url, key_prefix, queue, fleet, max_job_bytes=50_000)

    async def main() -> None:
        async with in_process(first) as d:
            assert await d.dispatch_once()
            await settle(d)
            # WHEN its attempt fails with retry and the dispatchers now run with MAX_JOB_BYTES=50000
            fin = await d.ends.end_attempt(job.task_id, 1, Outcome.FAILED_RETRY, error="GPU OOM")
            assert (fin.code, fin.state) == ("applied", "retrying")
        async with in_process(later) as d:
            await d.housekeeping.requeue_due()  # the dispatcher writes the retry into Redis
            assert await rds_len(queue) == 1
            await d.dispatch_once()  # ... and refuses it when it takes it
            await settle(d)

    async def rds_len(q: str) -> int:
        return int(rds.llen(queue_key(q, Priority.NORMAL)))

    try:
        asyncio.run(main())
        # THEN the job is dead-lettered with the reason, and its task ends failed saying so
        [dead] = [json.loads(x) for x in rds.lrange(Keys(key_prefix).dead, 0, -1)]
        assert "MAX_JOB_BYTES=50000" in dead["reason"]
        assert rds.llen(queue) == 0
        engine = make_engine(any_database_url, pool_size=1)
        task = transaction(engine, get_task, task_id=job.task_id)  # what GET /tasks/{id} and gpuq task show
        engine.dispose()
        assert task is not None and task["state"] == "failed", task
        assert "dead-lettered" in task["error"] and "MAX_JOB_BYTES=50000" in task["error"], task
        assert task["finished_at"] is not None
    finally:
        for p in Priority:
            rds.delete(queue_key(queue, p))
