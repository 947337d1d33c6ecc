"""Jobs waiting for a full pool count in the queue-age metric wherever they wait (SPEC §4 "Order").

Before: a ready buffer's jobs sit in the dispatcher's processing list and parked jobs in a parked list, so with
their queue's list empty ``gpuq_queue_oldest_age_seconds`` and ``gpuq queue list`` answered 0 (or nothing)
for jobs that had waited for minutes. Now a priority's oldest age reads the head of each processing list (by
the list it was taken from), the parked heads (by their priority), and, in the dispatcher's own ``/metrics``
and dashboard, every job it buffers. Heads only: reading the processing lists whole moved up to 128 jobs of
256 KiB at each scrape, or held Redis a quarter of a second per look in a script (an outside review).
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import redis
from redis.asyncio import Redis, RedisCluster

from dispatcher.queues.intake import Intake
from dispatcher.queues.queue_view import Plan, read_async, read_sync
from producer.keys import Keys, Priority, queue_key
from tests.dispatcher.harness import states
from tests.dispatcher.helpers import wait_for
from tests.operators.test_metrics import scrape, value
from tests.operators.test_waiting_jobs import _push
from tests.redis_cluster import Cluster

POOLS = ["default", "embed"]


def _stamp(waited: float) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=waited)


def _job(task_id: str, kind: str, waited: float, priority: str | None = None) -> str:
    job = {"task_id": task_id, "type": kind, "enqueued_at": _stamp(waited).isoformat()}
    return json.dumps(job | ({"priority": priority} if priority else {}))


def _by_priority(view) -> dict[str, object]:
    return {d.priority: d for d in view.queues}


def test_taken_parked_and_held_jobs_count_in_their_priority_s_age_not_in_its_depth(redis_url, key_prefix):
    q, keys = f"{key_prefix}q", Keys(key_prefix)
    high, low = queue_key(q, Priority.HIGH), queue_key(q, Priority.LOW)

    async def take() -> list[str]:
        rds = Redis.from_url(redis_url)
        try:
            intake = Intake(rds, keys, "d1", [q], routes={"embed": "embed"})
            await intake.claim()
            await intake.heartbeat()  # listed among the dispatchers, as a running one is
            # GIVEN a high job that waited 30 s and a low embed job that waited 90 s, both taken into d1's
            # processing list (the high one first: its head), a low job still in its list (5 s) ...
            await rds.rpush(high, _job("h", "transcribe", 30))
            await rds.rpush(low, _job("l-taken", "embed", 90), _job("l-waiting", "transcribe", 5))
            return [t.element for t in await intake.take(2, {"default": 1, "embed": 1})]
        finally:
            await rds.aclose()

    elements = asyncio.run(take())
    rds = redis.Redis.from_url(redis_url)
    try:
        # ... and a normal job parked for the embed pool 200 s ago, and a low one 20 s ago
        rds.rpush(
            keys.parked(q, "embed"), _job("n-parked", "embed", 200), _job("l-parked", "embed", 20, "low")
        )
        rds.rpush(keys.parked(q, "default"), _job("l-parked-2", "transcribe", 20, "low"))
        assert rds.llen(high) == 0 and rds.llen(low) == 1
        plan = Plan(keys, [q], POOLS)
        # WHEN an operator looks (the CLI's blocking client; the HTTP edge's asyncio one, with the jobs the
        # dispatcher serving it holds in its buffer: here the low one)
        view = read_sync(rds, plan)
        held = [(el, _stamp(90)) for el in elements if "l-taken" in el]
        seen = asyncio.run(_read_async(redis_url, plan, held))
    finally:
        rds.close()
    # THEN each priority's oldest age is its oldest waiting job's, wherever it waits; depth counts its list
    for v in (view, seen):
        by = _by_priority(v)
        assert 29 < by["high"].oldest_age < 60 and by["high"].depth == 0  # the processing list's head
        assert 199 < by["normal"].oldest_age < 260 and by["normal"].depth == 0  # parked, no priority: normal
        assert by["low"].depth == 1 and v.taken == 2 and v.waiting() == 6  # each job once
    assert 19 < _by_priority(view)["low"].oldest_age < 60  # parked (the taken one is not at a head)
    assert 89 < _by_priority(seen)["low"].oldest_age < 150  # held by the dispatcher that answers


async def _read_async(url: str, plan: Plan, held=()):
    client = Redis.from_url(url)
    try:
        return await read_async(client, plan, held)
    finally:
        await client.aclose()


def test_a_head_taken_from_a_set_aside_list_counts_in_that_list_s_priority(redis_url, key_prefix):
    q, keys = f"{key_prefix}q", Keys(key_prefix)
    aside = keys.aside(q, Priority.LOW, "embed")
    rds = redis.Redis.from_url(redis_url)
    try:
        rds.sadd(keys.dispatchers, "d1")
        rds.rpush(keys.proc(q, "d1"), f"{aside}\n" + _job("e", "embed", 70))
        view = read_sync(rds, Plan(keys, [q], POOLS))
    finally:
        rds.close()
    by = _by_priority(view)
    assert 69 < by["low"].oldest_age < 120 and by["normal"].oldest_age is None


def test_hostile_heads_never_break_the_view(redis_url, key_prefix):
    # GIVEN heads no producer of ours writes: a processing-list element without a source, poison JSON,
    # a parked job of a priority that does not exist, a parked JSON array, a time that is not one
    q, keys = f"{key_prefix}q", Keys(key_prefix)
    normal = queue_key(q, Priority.NORMAL)
    rds = redis.Redis.from_url(redis_url)
    try:
        for owner, head in (
            ("d1", "no newline at all"),
            ("d2", f"{normal}\n" + "[" * 5000),
            ("d3", f"{normal}\n" + json.dumps({"task_id": "y", "enqueued_at": "yesterday"})),
            ("d4", f"{key_prefix}elsewhere\n" + _job("x", "t", 500)),
        ):
            rds.sadd(keys.dispatchers, owner)
            rds.rpush(keys.proc(q, owner), head)
        rds.rpush(keys.parked(q, "default"), _job("p", "t", 40, priority="urgent"))
        rds.rpush(keys.parked(q, "embed"), json.dumps([1, 2]))
        # WHEN an operator looks
        view = read_sync(rds, Plan(keys, [q], POOLS))
    finally:
        rds.close()
    # THEN it reads: the foreign head counts in the whole's age only; the unknown priority as normal
    by = _by_priority(view)
    assert 39 < by["normal"].oldest_age < 100 and by["low"].oldest_age is None
    assert view.taken == 4 and 499 < view.oldest_age() < 600


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
        assert view.taken == 2

    asyncio.run(scenario())


def test_a_dispatcher_s_metrics_count_the_jobs_its_buffer_holds(stack):
    # GIVEN a 1-slot pool whose 0.5 s jobs keep it in demand, and 20 low jobs: all taken into the buffer
    fleet = stack.fleet(gpus=1, slots=1, service_time="fixed:0.5")
    q = stack.queues[0]
    d = stack.dispatcher(GPU_ENDPOINTS=f"g0={fleet.url('g0')}", SLOTS_PER_GPU="1")
    _push(stack, q, 20, Priority.LOW)
    wait_for(lambda: stack.rds.llen(queue_key(q, Priority.LOW)) == 0, 20, what="the low jobs all taken")
    wait_for(lambda: states(stack.engine)["finished"] >= 2, 20, what="two low jobs done")
    # WHEN the dispatcher is scraped while its buffer holds the rest
    samples = scrape(d.url)
    # THEN the low priority's age counts them (none is in the low list)
    assert value(samples, "gpuq_queue_depth", queue=q, priority="low") == 0
    assert value(samples, "gpuq_queue_oldest_age_seconds", queue=q, priority="low") > 0.5
