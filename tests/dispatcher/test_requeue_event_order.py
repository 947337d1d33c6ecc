"""A task requeued from the database (a retry whose backoff is over, a scheduled task now due) has its
``queued`` event in Redis before its job: pushed first, another dispatcher could place the job and publish
``dispatched`` before it (a fresh-clone CI run's event stream read state, dispatched, queued)."""

from __future__ import annotations

import asyncio
import uuid

import redis

from dispatcher.states import Outcome
from dispatcher.testing import in_process, settle
from producer.job import Job
from producer.keys import Priority, queue_key
from simgpu.fleet import SimFleet
from tests.dispatcher.test_refused_retry import _settings, fleet  # noqa: F401


def test_the_queued_event_of_a_requeued_task_is_out_before_its_job(
    any_database_url: str,
    redis_url: str,
    key_prefix: str,
    rds: redis.Redis,
    fleet: SimFleet,  # noqa: F811
) -> None:
    queue = f"q-{uuid.uuid4().hex[:6]}"
    job = Job(task_id=f"r-{uuid.uuid4().hex[:6]}", type="t", queue=queue, data={})
    rds.rpush(queue, job.to_redis())
    settings = _settings(any_database_url, redis_url, key_prefix, queue, fleet)
    seen: list[str] = []

    async def main() -> None:
        async with in_process(settings) as d:
            assert await d.dispatch_once()
            await settle(d)
            fin = await d.ends.end_attempt(job.task_id, 1, Outcome.FAILED_RETRY, error="GPU OOM")
            assert (fin.code, fin.state) == ("applied", "retrying")
            pubsub = rds.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(d.keys.task_events(job.task_id))
            real = d.rt.intake.requeue

            async def requeue(jobs: list[tuple[str, str]]) -> None:
                # what a listener has when the job becomes takeable
                got = [pubsub.get_message(timeout=0.2) for _ in range(3)]  # the subscription's answer first
                queued = any(m is not None and b'"queued"' in m["data"] for m in got)
                seen.append("event" if queued else "none")
                await real(jobs)
                seen.append("job")

            d.rt.intake.requeue = requeue  # type: ignore[method-assign]
            await d.housekeeping.requeue_due()
            pubsub.close()
            assert rds.llen(queue_key(queue, Priority.NORMAL)) == 1

    asyncio.run(main())
    assert seen == ["event", "job"], seen
