"""The Redis side of the dispatcher against the real Redis: fairness, priority, parking, sweeping."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest
from redis.asyncio import Redis

from dispatcher.queues.intake import Intake, NotReplicated, Settlement, weighted_order
from producer.job import Job
from producer.keys import Keys, Legacy, queue_key
from producer.keys import Priority as P


def test_weighted_order_spreads_shares():
    assert weighted_order(["a", "b"], {"a": 3}) == ["a", "a", "b", "a"]
    assert Counter(weighted_order(["a", "b", "c"], {"a": 2, "c": 5})) == {"a": 2, "b": 1, "c": 5}
    assert weighted_order(["a", "b"]) == ["a", "b"]


def _run(coro):
    return asyncio.run(coro)


async def _fill(rds: Redis, key: str, n: int, tag: str) -> None:
    await rds.rpush(key, *[json.dumps({"type": "t", "data": {"tag": tag, "i": i}}) for i in range(n)])


async def _intake(redis_url: str, prefix: str, queues: list[str], weights=None, name="d1"):
    rds = Redis.from_url(redis_url)
    return rds, Intake(rds, Keys(prefix), name, queues, weights)


def test_queues_share_by_weight_and_priority_comes_first(redis_url, key_prefix):
    async def scenario():
        q1, q2 = f"{key_prefix}q1", f"{key_prefix}q2"
        rds, intake = await _intake(redis_url, key_prefix, [q1, q2], {q1: 3})
        await _fill(rds, q1, 100, "q1")
        await _fill(rds, q2, 100, "q2")
        await _fill(rds, queue_key(q2, P.HIGH), 2, "q2-high")
        await _fill(rds, queue_key(q2, P.LOW), 100, "q2-low")
        taken = []
        for _ in range(40):  # one job at a time, as when single slots free up
            taken += await intake.take(1, None)
        sources = Counter(t.source for t in taken)
        # q1 gets three visits in four; q2's two high-priority jobs come before its normal ones, low never yet
        assert sources[q1] == 30
        assert sources[queue_key(q2, P.HIGH)] == 2
        assert sources[q2] == 8
        assert all(t.queue == q2 for t in taken if t.source.startswith(q2))
        batch = await intake.take(8, None)
        assert Counter(t.queue for t in batch) == {q1: 6, q2: 2}
        # everything taken is in this dispatcher's processing list of its queue, tagged with its source
        keys = Keys(key_prefix)
        assert await rds.llen(keys.proc(q1, "d1")) == 36
        assert await rds.llen(keys.proc(q2, "d1")) == 12
        await rds.aclose()

    _run(scenario())


def test_hand_back_restores_order_and_sweep_takes_dead_lists(redis_url, key_prefix):
    async def scenario():
        q = f"{key_prefix}q"
        keys = Keys(key_prefix)
        rds, dead = await _intake(redis_url, key_prefix, [q], name="dead")
        rds2, alive = await _intake(redis_url, key_prefix, [q], name="alive")
        await _fill(rds, q, 5, "x")
        original = await rds.lrange(q, 0, -1)
        await dead.heartbeat()
        taken = await dead.take(3, None)
        assert await rds.llen(q) == 2
        # alive while its heartbeat lasts: not swept
        await alive.heartbeat()
        assert await alive.sweep_dead() == 0
        await rds.delete(keys.alive("dead"))  # the heartbeat expires
        assert await alive.sweep_dead() == 3
        assert await rds.lrange(q, 0, -1) == original  # back at the head, in their order
        assert not await rds.sismember(keys.dispatchers, "dead")
        # a parked job goes to its pool's list and is served first from there
        taken = await alive.take(1, None)
        await alive.settle(Settlement(park=[(taken[0].element, "gpu-pool", taken[0].raw)]))
        assert await rds.llen(keys.parked(q, "gpu-pool")) == 1
        first = await alive.take(1, {"gpu-pool": 1})
        assert first[0].source == keys.parked(q, "gpu-pool")
        assert first[0].queue is None  # a parked job's body says its queue
        await rds.aclose()
        await rds2.aclose()

    _run(scenario())


@pytest.mark.parametrize("weights", ["q9=2", "q1=0", "q1=x"])
def test_bad_weights_are_refused(monkeypatch, weights):
    from dispatcher.settings import DispatcherSettings
    from producer.errors import ConfigError
    from producer.settings import load

    monkeypatch.setenv("CALLBACK_SECRET", "0123456789abcdef" * 2)
    monkeypatch.setenv("TASK_QUEUES", "q1,q2")
    monkeypatch.setenv("QUEUE_WEIGHTS", weights)
    with pytest.raises(ConfigError) as err:
        load(DispatcherSettings, _env_file=None)
    assert "QUEUE_WEIGHTS" in err.value.message


def test_take_only_what_each_pool_can_start_and_leave_the_rest_in_place(redis_url, key_prefix):
    """The take contract (issue 14): per pool at most its free slots; a job for a full pool stays in its
    list, in order, while jobs behind it for pools with room are taken; a job back from a lost slot race
    returns to the head of its list."""

    async def scenario():
        q = f"{key_prefix}q"
        rds = Redis.from_url(redis_url)
        intake = Intake(rds, Keys(key_prefix), "d1", [q], routes={"e": "embed"})
        jobs = [json.dumps({"task_id": f"t{i}", "type": t, "data": {}}) for i, t in enumerate("ttteetbe")]
        jobs[6] = "not json"  # unparsable: taken whatever the budgets (it is dead-lettered)
        await rds.rpush(q, *jobs)
        taken = await intake.take(5, {"default": 1, "embed": 5})
        # one default job (the first), both embed jobs, the unparsable one, then the last embed job
        assert [t.raw for t in taken] == [jobs[0], jobs[3], jobs[4], jobs[6], jobs[7]]
        assert [t.pool for t in taken] == ["default", "embed", "embed", None, "embed"]
        assert await rds.lrange(q, 0, -1) == [j.encode() for j in (jobs[1], jobs[2], jobs[5])]
        # nothing for a pool without free slots, nothing at all for an unknown one
        assert await intake.take(5, {"embed": 3}) == []
        # a job that lost its slot goes back to the head, ahead of those that waited behind it
        await intake.settle(
            Settlement(back=[(taken[0].element, taken[0].raw, None)], ack=[t.element for t in taken[1:]])
        )
        assert (await rds.lrange(q, 0, 0))[0] == jobs[0].encode()
        assert await rds.llen(Keys(key_prefix).proc(q, "d1")) == 0
        await rds.aclose()

    _run(scenario())


def test_requeued_jobs_keep_their_order_at_the_head(redis_url, key_prefix):
    """Jobs due again (retries, refused by a misconfigured GPU) come in the order they fell due: the first
    must run first. Before, each was LPUSHed in turn, so a batch landed at the head reversed (review of
    issue 14: three jobs a 404 GPU refused ran last-refused first)."""

    async def scenario():
        q = f"{key_prefix}q1"
        rds, intake = await _intake(redis_url, key_prefix, [q])
        await _fill(rds, q, 2, "waiting")
        await intake.requeue([(q, "a"), (q, "b"), (q, "c")])
        head = [x.decode() for x in await rds.lrange(q, 0, 2)]
        assert head == ["a", "b", "c"]
        await rds.aclose()

    _run(scenario())


def test_old_parked_jobs_are_moved_after_an_old_dispatcher_drains_and_stops(redis_url, key_prefix):
    """Rolling upgrade: an old dispatcher beside a new one parks its ready buffer under the old name when it
    drains (``Dispatcher.drain``), then retires cleanly (no heartbeat left to expire, so no dead sweep).
    Before: only a new dispatcher's first sweep, or one after a dead sweep, looked for old parked lists, so
    those jobs waited until some new dispatcher restarted."""

    async def scenario():
        q = f"{key_prefix}q"
        rds, intake = await _intake(redis_url, key_prefix, [q], name="new")
        keys, old = Keys(key_prefix), Legacy(key_prefix)
        # GIVEN an old dispatcher alive beside the new one (an old one records no queues) ...
        await rds.set(keys.alive("old"), "1", ex=60)
        await rds.sadd(keys.dispatchers, "old")
        await intake.heartbeat()
        assert await intake.sweep_dead() == 0  # ... when the new one starts: nothing to move yet
        # WHEN the old one drains: parks a job under the old name, then retires
        job = Job(task_id="parked-at-drain", type="t", queue=q).to_redis()
        await rds.rpush(old.parked("default"), job)
        await rds.delete(keys.alive("old"))
        await rds.srem(keys.dispatchers, "old")
        await intake.sweep_dead()
        # THEN the next sweep moves it to the queue's parked list, where dispatchers of today serve it
        assert await rds.lrange(keys.parked(q, "default"), 0, -1) == [job.encode()]
        assert not await rds.exists(old.parked("default"))
        await rds.aclose()

    _run(scenario())


def test_a_queue_named_like_an_old_priority_list_keeps_its_jobs(redis_url, key_prefix):
    """Queues ``a`` and ``a:high``: before issue 15 ``a:high`` was also ``a``'s high list; today it is only the
    queue ``a:high`` (``a``'s is ``{a}:high``). Before: every sweep's migration moved queue ``a:high``'s jobs
    into ``{a}:high``, where they jumped ahead as ``a``'s high-priority work."""

    async def scenario():
        a = f"{key_prefix}a"
        rds, intake = await _intake(redis_url, key_prefix, [a], name="new")
        other = queue_key(a, P.NORMAL) + ":high"  # the queue a:high, served by some other dispatcher
        job = Job(task_id="of-a-high", type="t", queue=other).to_redis()
        seed_style = json.dumps({"type": "t", "data": {"task_id": "seed-style"}})
        await rds.rpush(other, seed_style, job)
        await intake.heartbeat()
        await intake.sweep_dead()
        assert await rds.lrange(other, 0, -1) == [seed_style.encode(), job.encode()]
        assert await rds.llen(queue_key(a, P.HIGH)) == 0
        # and the dispatcher serving both queues moves nothing either
        _, both = await _intake(redis_url, key_prefix, [a, other], name="both")
        await both.sweep_dead()
        assert await rds.llen(other) == 2
        await both.redis.aclose()
        await rds.aclose()

    _run(scenario())


def test_a_requeue_whose_wait_failed_is_not_pushed_again_by_the_next_attempt(redis_url, key_prefix):
    """REDIS_WAIT_REPLICAS with a replica missing (down, or fewer than asked for): a retry's requeue is written
    but its fence fails, so the database still has the task due and the next housekeeping tick (every
    ~1.25 s) requeues it again. Before: one more copy of the job per tick for as long as the replica was
    missing (queue depth and KEDA's scaling signal inflated, every copy but one dropped when taken)."""

    async def scenario():
        q = f"{key_prefix}q"
        rds = Redis.from_url(redis_url)  # this Redis has no replica: WAIT 1 always times out
        intake = Intake(rds, Keys(key_prefix), "d1", [q], wait_replicas=1, wait_timeout_seconds=0.05)
        job = Job(task_id="due-retry", type="t", queue=q, attempt=1).to_redis()
        for _ in range(3):
            with pytest.raises(NotReplicated):
                await intake.requeue([(q, job)])
        assert await rds.lrange(q, 0, -1) == [job.encode()]
        # a different job (or the next attempt of the same task) still goes in front
        again = Job(task_id="due-retry", type="t", queue=q, attempt=2).to_redis()
        with pytest.raises(NotReplicated):
            await intake.requeue([(q, again)])
        assert await rds.lrange(q, 0, -1) == [again.encode(), job.encode()]
        await rds.aclose()

    _run(scenario())


def test_a_parked_job_of_a_pool_with_a_colon_in_its_name_is_settled_in_its_own_queue(redis_url, key_prefix):
    """Pool names may hold a colon (``gpu:a100:g0=URL`` in GPU_ENDPOINTS, ``--pool gpu:a100``). Before: a
    parked list ``P{Q}:parked:gpu:a100`` was not recognised as Q's (split at its last colon), so settling a
    job taken from it worked on the first queue's lists: the job stayed in Q's processing list (taken again
    and again by each reconcile) and a re-park moved it to the first queue's parked list."""

    async def scenario():
        q1, q2 = f"{key_prefix}q1", f"{key_prefix}q2"
        rds, intake = await _intake(redis_url, key_prefix, [q1, q2])
        keys, pool = Keys(key_prefix), "gpu:a100"
        job = Job(task_id="parked-colon", type="t", queue=q2).to_redis()
        await rds.rpush(keys.parked(q2, pool), job)
        assert intake.queue_of(keys.parked(q2, pool)) == q2
        # taken, then parked again (still no slot): back at the head of q2's parked list
        taken = await intake.take(1, {pool: 1})
        assert [t.source for t in taken] == [keys.parked(q2, pool)]
        await intake.settle(Settlement(park=[(taken[0].element, pool, taken[0].raw)]))
        assert await rds.lrange(keys.parked(q2, pool), 0, -1) == [job.encode()]
        assert await rds.llen(keys.parked(q1, pool)) == 0
        # taken and placed: gone from the processing list
        taken = await intake.take(1, {pool: 1})
        await intake.settle(Settlement(ack=[taken[0].element]))
        assert await rds.llen(keys.proc(q2, "d1")) == 0
        await rds.aclose()

    _run(scenario())


def test_a_settlement_script_checks_every_operation_before_it_applies_one(redis_url, key_prefix):
    # Intake.settle's script (not MULTI: see SETTLE): a malformed settlement changes nothing at all.
    from redis.exceptions import ResponseError

    from dispatcher.queues.intake_lua import SETTLE

    async def scenario():
        rds = Redis.from_url(redis_url)
        a, b = f"{key_prefix}a", f"{key_prefix}b"
        await rds.rpush(a, "x")
        with pytest.raises(ResponseError, match="bad operation del at 4"):
            await rds.eval(SETTLE, 2, a, b, "lrem", 1, "x", "del", 2, "y")
        with pytest.raises(ResponseError, match="bad operation rpush at 1"):
            await rds.eval(SETTLE, 1, a, "rpush", 3, "y")  # no third key
        with pytest.raises(ResponseError, match="not operations of three"):
            await rds.eval(SETTLE, 1, a, "lrem", 1, "x", "rpush", 1)  # an incomplete last one
        await rds.set(b, "a string")
        with pytest.raises(ResponseError, match="is a string, not a list"):  # its job would be lost
            await rds.eval(SETTLE, 2, a, b, "lrem", 1, "x", "rpush", 2, "y")
        await rds.delete(b)
        assert await rds.lrange(a, 0, -1) == [b"x"] and not await rds.exists(b)
        assert await rds.eval(SETTLE, 2, a, b, "lrem", 1, "x", "rpush", 2, "y", "lpush", 2, "z") == 3
        assert await rds.lrange(a, 0, -1) == [] and await rds.lrange(b, 0, -1) == [b"z", b"y"]
        await rds.delete(a, b)
        await rds.aclose()

    _run(scenario())


def test_an_empty_settlement_costs_no_round_trip(redis_url, key_prefix):
    # Most passes settle nothing; a MULTI with nothing in it sent nothing, the script must not either.
    async def scenario():
        rds, intake = await _intake(redis_url, key_prefix, [f"{key_prefix}q"])
        calls = []
        settle_script = intake._settle

        async def counting(**kwargs):
            calls.append(kwargs)
            return await settle_script(**kwargs)

        intake._settle = counting
        await intake.settle(Settlement())
        assert calls == []
        await intake.settle(Settlement(ack=[f"{key_prefix}q\n{{}}"]))
        assert len(calls) == 1
        await rds.aclose()

    _run(scenario())
