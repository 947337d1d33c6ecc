"""Jobs a dispatcher took and has not started still wait in their queue (SPEC §4 "Order": a job waiting for a
full pool counts in the queue-age metric).

Before: a ready buffer's jobs sit in the dispatcher's processing list, so with the queue's list empty
``gpuq_queue_oldest_age_seconds`` and ``gpuq queue list`` answered 0 (or nothing) for jobs that had waited for
minutes. Now each priority's oldest age reads the processing lists too, by the list each job was taken from.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import redis
from redis.asyncio import Redis, RedisCluster

from dispatcher.queues.intake import Intake
from dispatcher.queues.queue_view import TAKEN_SCAN, Plan, read_async, read_sync
from producer.keys import Keys, Priority, queue_key
from tests.redis_cluster import Cluster

POOLS = ["default", "embed"]


def _job(task_id: str, kind: str, waited: float) -> str:
    stamp = (datetime.now(UTC) - timedelta(seconds=waited)).isoformat()
    return json.dumps({"task_id": task_id, "type": kind, "enqueued_at": stamp})


def test_jobs_taken_and_not_started_count_in_their_priority_s_age_not_in_its_depth(redis_url, key_prefix):
    q, keys = f"{key_prefix}q", Keys(key_prefix)
    high, low = queue_key(q, Priority.HIGH), queue_key(q, Priority.LOW)

    async def take() -> None:
        rds = Redis.from_url(redis_url)
        try:
            intake = Intake(rds, keys, "d1", [q], routes={"embed": "embed"})
            await intake.claim()
            await intake.heartbeat()  # listed among the dispatchers, as a running one is
            # GIVEN a high job that waited 30 s and an embed job of the low list that waited 90 s, both taken
            # into d1's processing list (its ready buffer), and a low job still in its list, 5 s old
            await rds.rpush(high, _job("h", "transcribe", 30))
            await rds.rpush(low, _job("l-taken", "embed", 90), _job("l-waiting", "transcribe", 5))
            assert len(await intake.take(2, {"default": 1, "embed": 1})) == 2
        finally:
            await rds.aclose()

    asyncio.run(take())
    rds = redis.Redis.from_url(redis_url)
    try:
        assert rds.llen(high) == 0 and rds.llen(low) == 1
        # WHEN an operator looks (the CLI's blocking client, and the HTTP edge's asyncio one)
        view = read_sync(rds, Plan(keys, [q], POOLS))
        seen = asyncio.run(_read_async(redis_url, Plan(keys, [q], POOLS)))
    finally:
        rds.close()
    # THEN each priority's oldest age is its oldest job's, taken or not; the depth counts what is in the list
    for v in (view, seen):
        by = {d.priority: d for d in v.queues}
        assert 29 < by["high"].oldest_age < 60 and (by["high"].depth, by["high"].taken) == (0, 1)
        assert 89 < by["low"].oldest_age < 120 and (by["low"].depth, by["low"].taken) == (1, 1)
        assert by["normal"].oldest_age is None and by["normal"].taken == 0
        assert v.taken == 2 and v.waiting() == 3  # each job once


async def _read_async(url: str, plan: Plan):
    client = Redis.from_url(url)
    try:
        return await read_async(client, plan)
    finally:
        await client.aclose()


def test_hostile_or_foreign_elements_of_a_processing_list_never_break_the_view(redis_url, key_prefix):
    # GIVEN a processing list with an element without a source, one from a list no queue has, poison JSON,
    # a year-1 time, and more elements than a look reads
    q, keys = f"{key_prefix}q", Keys(key_prefix)
    normal = queue_key(q, Priority.NORMAL)
    rds = redis.Redis.from_url(redis_url)
    try:
        rds.sadd(keys.dispatchers, "d1")
        proc = keys.proc(q, "d1")
        rds.rpush(
            proc,
            "no newline at all",
            f"{key_prefix}elsewhere\n" + _job("x", "t", 500),
            f"{normal}\n" + "[" * 5000,
            f"{normal}\n" + json.dumps({"task_id": "y", "enqueued_at": "yesterday"}),
            f"{normal}\n" + _job("z", "t", 20),
        )
        rds.rpush(proc, *[f"{normal}\n" + _job(f"n{i}", "t", 1) for i in range(TAKEN_SCAN)])
        # WHEN an operator looks
        view = read_sync(rds, Plan(keys, [q], POOLS))
    finally:
        rds.close()
    # THEN the view reads: the normal priority's age is its oldest readable taken job's; the foreign one counts
    # in the whole's age and count only; each job read past TAKEN_SCAN is still counted as taken
    normal_depth = next(d for d in view.queues if d.priority == "normal")
    assert 19 < normal_depth.oldest_age < 60
    assert normal_depth.taken == TAKEN_SCAN - 2  # of the first TAKEN_SCAN: two are not of this queue
    assert view.taken == TAKEN_SCAN + 5
    assert 499 < view.oldest_age() < 600


def test_on_a_redis_cluster_each_processing_list_is_read_in_its_own_slot(redis_cluster: Cluster, key_prefix):
    # GIVEN two queues (two hash slots), each with a job taken into d1's processing list
    keys = Keys(key_prefix)
    queues = [f"{key_prefix}a", f"{key_prefix}b"]

    async def scenario() -> None:
        rds = RedisCluster.from_url(redis_cluster.url)
        try:
            intake = Intake(rds, keys, "d1", queues)  # type: ignore[arg-type]
            await intake.heartbeat()
            for i, q in enumerate(queues):
                await rds.rpush(queue_key(q, Priority.LOW), _job(f"t{i}", "transcribe", 40 + 20 * i))
            assert len(await intake.take(2, None)) == 2
            # WHEN an operator looks through the cluster client
            view = await read_async(rds, Plan(keys, queues, POOLS))
        finally:
            await rds.aclose()
        # THEN each queue's low priority shows its taken job's wait
        low = {d.queue: d for d in view.queues if d.priority == "low"}
        assert 39 < low[queues[0]].oldest_age < 59 and 59 < low[queues[1]].oldest_age < 79
        assert [low[q].taken for q in queues] == [1, 1] and view.taken == 2

    asyncio.run(scenario())
