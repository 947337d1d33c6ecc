"""Pushing one job from inside the dispatcher, as the producer pushes it (``POST /v1/embeddings``).

The push is the producer's own script (``producer.enqueue.PUSH_LUA``: the job and its idempotency mark in
one step), so a job pushed here is exactly a job the Lambda would have pushed. ``pushed`` tells whether a task
id is still only in Redis, by that mark: between the push and a dispatcher's take, the database has no row.
"""

from __future__ import annotations

from redis.asyncio import Redis

from producer.enqueue import PUSH_LUA, push_arguments
from producer.events import Planned
from producer.job import Job
from producer.keys import Keys


async def push(redis: Redis, keys: Keys, job: Job, *, idempotency_key: str, ttl: int) -> None:
    """Push ``job`` with its idempotency mark (a second push of the same key is a no-op)."""
    names, args = push_arguments([Planned(job, idempotency_key)], keys, ttl=ttl)
    await redis.eval(PUSH_LUA, len(names), *names, *args)


async def pushed(redis: Redis, keys: Keys, queues: list[str], idempotency_key: str) -> bool:
    """Does any queue hold the idempotency mark of ``idempotency_key``? One queue (one cluster slot) at a
    time, so it works on a Redis Cluster too."""
    return any([await redis.exists(keys.idem(q, idempotency_key)) for q in queues])
