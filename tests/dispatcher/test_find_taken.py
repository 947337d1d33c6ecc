"""A job a dispatcher has taken but not yet recorded is still visible (GET /tasks/{id}, its event stream).

Found when the event-stream test opened 150 streams right after GET answered: 10 of them got 404 while the
job sat in the dispatcher's processing list (taken, its placement under way). Jobs held in a hand-off ready
buffer sit there too, for longer. Neither waiting in its queue nor in the database is not "unknown".
"""

from __future__ import annotations

import asyncio
import json

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from dispatcher.queues.reprioritize import find_waiting, find_waiting_async, move_job
from producer.job import Job, parse_redis_job
from producer.keys import Keys, Priority, queue_key


def _look(
    rds: redis.Redis, keys: Keys, queue: str, task_id: str, client: str = "sync", redis_url: str = ""
) -> dict | None:
    """A lookup as the CLI makes it (``sync``) or the HTTP edge (``async``, its own client), in ``queue``."""
    if client == "sync":
        return find_waiting(rds, keys=keys, task_id=task_id, queues=[queue], pools=["default"])

    async def run() -> dict | None:
        edge = AsyncRedis.from_url(redis_url)
        try:
            return await find_waiting_async(
                edge, keys=keys, task_id=task_id, queues=[queue], pools=["default"]
            )
        finally:
            await edge.aclose()

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
        return _look(rds, keys, queue, task_id, client, redis_url)

    found = look("taken-1")

    # THEN it is found as queued at the head of its list, with its own fields, not reported unknown
    assert found is not None
    assert (found["state"], found["type"], found["list"], found["position"]) == ("queued", "t", queue, 0)
    assert found["data"] == {"x": 1}
    # and an id in neither place is still unknown
    assert look("nowhere") is None


@pytest.mark.parametrize("client", ["async", "sync"])
def test_seed_shaped_ids_are_found_as_the_dispatcher_reads_them(
    rds: redis.Redis, redis_url: str, key_prefix: str, client: str
):
    # GIVEN jobs pushed the seed's way: a numeric id in data, a null or empty top-level id beside data's
    keys = Keys(key_prefix)
    queue = f"{key_prefix}q1"
    rds.rpush(queue, json.dumps({"type": "t", "data": {"task_id": 123}}))
    rds.rpush(queue, json.dumps({"type": "t", "task_id": None, "data": {"task_id": "from-data"}}))
    rds.rpush(queue, json.dumps({"type": "t", "task_id": "", "data": {"task_id": "empty-top"}}))

    def look(task_id: str) -> dict | None:
        return _look(rds, keys, queue, task_id, client, redis_url)

    # THEN each is found under the id a dispatcher would give it (so it can be cancelled while it waits)
    assert [look(t)["position"] for t in ("123", "from-data", "empty-top")] == [0, 1, 2]  # type: ignore[index]
    assert look("12") is None


@pytest.mark.parametrize("client", ["async", "sync"])
def test_a_job_in_a_queue_only_another_dispatcher_serves_is_found(
    rds: redis.Redis, redis_url: str, key_prefix: str, client: str
):
    # GIVEN a dispatcher serving queue "other", and a job waiting there; the looker knows only its own queue
    keys = Keys(key_prefix)
    mine, other = f"{key_prefix}q1", f"{key_prefix}other"
    rds.hset(keys.owner_queues, "d2", json.dumps([other]))
    rds.rpush(other, Job(task_id="elsewhere", type="t", queue=other).to_redis())
    found = _look(rds, keys, mine, "elsewhere", client, redis_url)
    # THEN it is found in that queue (a cancel from the CLI or from a dispatcher of other queues is not 404)
    assert found is not None and (found["queue"], found["list"]) == (other, other)


ODD_IDS = [
    {"type": "t", "data": {"task_id": 1.0}},  # runs as "1.0"
    {"type": "t", "data": {"task_id": 1e15}},  # "1000000000000000.0"
    {"type": "t", "data": {"task_id": 2**53}},
    {"type": "t", "data": {"task_id": 1234567890123456789}},  # a 64-bit (snowflake) id, beyond a double
    {"type": "t", "data": {"task_id": 1.2345678901234567}},
    {"type": "t", "data": {"task_id": True}},  # "True"
    {"type": "t", "data": {"task_id": 0}},  # "0"
    {"type": "t", "task_id": 0, "data": {"task_id": "abc"}},  # 0 is no id: runs as "abc"
    {"type": "t", "task_id": [], "data": {"task_id": "abc"}},
]


@pytest.mark.parametrize(
    "body", ODD_IDS, ids=[json.dumps(b["data"]["task_id"]) + str(b.get("task_id")) for b in ODD_IDS]
)
def test_a_waiting_job_is_found_under_exactly_the_id_it_runs_under(
    rds: redis.Redis, key_prefix: str, body: dict
):
    keys = Keys(key_prefix)
    queue = f"{key_prefix}q1"
    raw = json.dumps(body)
    job, _ = parse_redis_job(raw, queue)  # what a dispatcher would run
    rds.rpush(queue, raw)
    found = _look(rds, keys, queue, job.task_id)
    assert found is not None, f"{raw} runs as {job.task_id!r} but a lookup of that id finds nothing"


def test_no_job_is_found_under_an_id_it_does_not_run_under(rds: redis.Redis, key_prefix: str):
    keys = Keys(key_prefix)
    queue = f"{key_prefix}q1"
    rds.rpush(queue, json.dumps({"type": "t", "data": {"task_id": 1.0}}))  # runs as "1.0"
    rds.rpush(queue, json.dumps({"type": "t", "task_id": 123}))  # refused by a dispatcher: no id
    for wrong in ("1", "123"):
        assert _look(rds, keys, queue, wrong) is None


@pytest.mark.parametrize("client", ["async", "sync"])
def test_a_job_parked_for_a_pool_only_another_dispatcher_routes_to_is_found(
    rds: redis.Redis, redis_url: str, key_prefix: str, client: str
):
    # GIVEN dispatcher d2 serves queue "other" with TASK_ROUTES embed=gpuX and parked a job for pool gpuX
    keys = Keys(key_prefix)
    mine, other = f"{key_prefix}q1", f"{key_prefix}other"
    rds.hset(keys.owner_queues, "d2", json.dumps([other]))
    rds.hset(keys.owner_pools, "d2", json.dumps(["default", "gpuX"]))
    rds.rpush(keys.parked(other, "gpuX"), Job(task_id="parked-1", type="embed", queue=other).to_redis())
    # WHEN a dispatcher or CLI without that route looks it up (its own pools: default only)
    found = _look(rds, keys, mine, "parked-1", client, redis_url)
    # THEN it is found (else a cancel answers 404 and the job runs)
    assert found is not None and found["list"] == keys.parked(other, "gpuX")


def test_a_numeric_id_behind_many_others_is_found_and_moved(rds: redis.Redis, key_prefix: str):
    # GIVEN 120 seed-style jobs with numeric ids (more than one window of them: each is read in Python)
    keys, queue = Keys(key_prefix), f"{key_prefix}q1"
    rds.rpush(queue, *[json.dumps({"type": "t", "data": {"task_id": i}}) for i in range(1, 121)])
    # THEN the last is found, and its priority can be changed
    found = _look(rds, keys, queue, "120")
    assert found is not None and found["position"] == 119
    assert move_job(
        rds, task_id="120", queues=[queue], priority=Priority.HIGH, keys=keys, pools=["default"]
    ).found
    assert _look(rds, keys, queue, "121") is None


def test_jobs_a_dispatcher_would_refuse_do_not_break_a_lookup(rds: redis.Redis, key_prefix: str):
    keys, queue = Keys(key_prefix), f"{key_prefix}q1"
    rds.rpush(queue, b'{"type":"t","data":{"task_id":5},"x":"\xff"}')  # not UTF-8: dead-lettered when taken
    rds.hset(keys.owner_pools, "d9", b'["p\xff"]')  # not a dispatcher's record
    rds.hset(keys.owner_queues, "d9", json.dumps(["x}", ""]))  # names no dispatcher may have
    rds.sadd(keys.dispatchers, b"d\xff")
    assert _look(rds, keys, queue, "nowhere") is None
    assert _look(rds, keys, queue, "5") is None


def test_a_big_job_under_a_raised_max_job_bytes_is_found(rds: redis.Redis, key_prefix: str):
    keys, queue = Keys(key_prefix), f"{key_prefix}q1"
    rds.rpush(queue, json.dumps({"type": "t", "data": {"task_id": 77, "blob": "x" * 300_000}}))
    assert _look(rds, keys, queue, "77") is not None


def test_a_job_taken_from_a_high_priority_list_shows_its_fields(rds: redis.Redis, key_prefix: str):
    # GIVEN a processing-list element whose source line starts with "{" (the list "{q}:high")
    keys, queue = Keys(key_prefix), f"{key_prefix}q1"
    rds.sadd(keys.dispatchers, "d1")
    job = Job(task_id="tk", type="t", queue=queue, priority=Priority.HIGH)
    rds.rpush(keys.proc(queue, "d1"), f"{queue_key(queue, Priority.HIGH)}\n{job.to_redis()}")
    found = _look(rds, keys, queue, "tk")
    assert found is not None
    assert (found["type"], found["queue"], found["priority"], found["position"]) == ("t", queue, "high", 0)


def test_the_priority_of_a_job_set_aside_for_another_dispatchers_pool_can_change(
    rds: redis.Redis, key_prefix: str
):
    keys, queue = Keys(key_prefix), f"{key_prefix}q1"
    rds.hset(keys.owner_queues, "d2", json.dumps([queue]))
    rds.hset(keys.owner_pools, "d2", json.dumps(["default", "gpuX"]))
    aside = keys.aside(queue, Priority.NORMAL, "gpuX")
    rds.rpush(aside, Job(task_id="a1", type="embed", queue=queue).to_redis())
    assert _look(rds, keys, queue, "a1") is not None
    moved = move_job(rds, task_id="a1", queues=[queue], priority=Priority.HIGH, keys=keys, pools=["default"])
    assert moved.found


def test_the_search_resumes_across_lists(rds: redis.Redis, key_prefix: str):
    # GIVEN more numeric-id jobs in the queue than one window holds, and the one looked for parked after them
    keys, queue = Keys(key_prefix), f"{key_prefix}q1"
    rds.rpush(queue, *[json.dumps({"type": "t", "data": {"task_id": i}}) for i in range(1, 76)])
    rds.rpush(
        keys.parked(queue, "default"), json.dumps({"type": "t", "data": {"task_id": 1.5}, "queue": queue})
    )
    found = _look(rds, keys, queue, "1.5")
    assert found is not None and found["list"] == keys.parked(queue, "default")


def test_one_atomic_search_whatever_jobs_move_meanwhile(rds: redis.Redis, key_prefix: str, monkeypatch):
    # GIVEN many numeric-id jobs ahead of a string-id job, and a dispatcher taking one job after each call
    keys, queue = Keys(key_prefix), f"{key_prefix}q1"
    rds.rpush(queue, *[json.dumps({"type": "t", "data": {"task_id": i}}) for i in range(1, 5001)])
    rds.rpush(queue, json.dumps({"type": "t", "task_id": "wanted"}))
    real = rds.eval

    def eval_then_take(*args):
        out = real(*args)
        rds.lpop(queue)
        return out

    monkeypatch.setattr(rds, "eval", eval_then_take)
    # THEN it is found: the lists are read in one script, numbers only handed over when they may be the id
    found = _look(rds, keys, queue, "wanted")
    assert found is not None and found["position"] == 5000
    assert _look(rds, keys, queue, "4999") is not None


def test_the_priority_of_a_job_that_is_not_utf8_can_change(rds: redis.Redis, key_prefix: str):
    keys, queue = Keys(key_prefix), f"{key_prefix}q1"
    rds.rpush(queue, b'{"type":"t","task_id":"bad","x":"\xff"}')
    moved = move_job(rds, task_id="bad", queues=[queue], priority=Priority.HIGH, keys=keys, pools=["default"])
    assert moved.found and rds.llen(queue) == 0
    assert b"\xff" in rds.lindex(queue_key(queue, Priority.HIGH), 0)
