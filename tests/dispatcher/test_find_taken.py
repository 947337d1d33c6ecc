"""A job a dispatcher has taken but not yet recorded is still visible (GET /tasks/{id}, its event stream).

Found when the event-stream test opened 150 streams right after GET answered: 10 of them got 404 while the
job sat in the dispatcher's processing list (taken, its placement under way). Jobs held in a hand-off ready
buffer sit there too, for longer. Neither waiting in its queue nor in the database is not "unknown".
"""

from __future__ import annotations

import asyncio

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from dispatcher.queues.reprioritize import find_waiting, find_waiting_async
from producer.job import Job
from producer.keys import Keys


def _find(redis_url: str, keys: Keys, task_id: str, queue: str) -> dict | None:
    async def run() -> dict | None:
        client = AsyncRedis.from_url(redis_url)
        try:
            return await find_waiting_async(
                client, keys=keys, task_id=task_id, queues=[queue], pools=["default"]
            )
        finally:
            await client.aclose()

    return asyncio.run(run())


@pytest.mark.parametrize("client", ["async", "sync"])  # the HTTP edge; the CLI (show, and cancel's check)
def test_a_job_in_a_processing_list_is_found_about_to_start(
    rds: redis.Redis, redis_url: str, key_prefix: str, client: str
):
    # GIVEN a job taken by dispatcher d1 (in its processing list, tagged with the list it came from), and
    # another job still waiting in the queue
    keys = Keys(key_prefix)
    queue = f"{key_prefix}q1"
    taken = Job(task_id="taken-1", type="t", queue=queue, data={"x": 1})
    rds.sadd(keys.dispatchers, "d1")
    rds.rpush(keys.proc(queue, "d1"), f"{queue}\n{taken.to_redis()}")

    # WHEN it is looked up
    def look(task_id: str) -> dict | None:
        if client == "sync":
            return find_waiting(rds, keys=keys, task_id=task_id, queues=[queue], pools=["default"])
        return _find(redis_url, keys, task_id, queue)

    found = look("taken-1")

    # THEN it is found as queued at the head of its list, with its own fields, not reported unknown
    assert found is not None
    assert (found["state"], found["type"], found["list"], found["position"]) == ("queued", "t", queue, 0)
    assert found["data"] == {"x": 1}
    # and an id in neither place is still unknown
    assert look("nowhere") is None
