"""Jobs set aside by a take (``Keys.aside``): a queue that mixes pools is not blocked by more than SCAN_DEPTH
jobs at its head whose pool has no room, and the jobs set aside keep their order, priority and visibility."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from dispatcher.queues import intake as intake_module
from dispatcher.queues.intake import Intake, Settlement
from dispatcher.queues.intake_lua import SCAN_DEPTH
from dispatcher.queues.queue_view import Plan, read_sync
from dispatcher.queues.reprioritize import find_waiting, move_job
from producer.keys import Keys, queue_key
from producer.keys import Priority as P
from tests.redis_cluster import Cluster

ROUTES = {"embed": "embed"}


def _jobs(kind: str, n: int, tag: str) -> list[str]:
    return [json.dumps({"task_id": f"{tag}{i}", "type": kind, "data": {"i": i}}) for i in range(n)]


def _raw(values: list[Any]) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else v for v in values]


@asynccontextmanager
async def _intake(redis_url: str, key_prefix: str) -> AsyncIterator[tuple[str, Keys, Redis, Intake]]:
    """A queue ``q`` of this test's own, its keys, a Redis client (closed after, also on failure) and an
    ``Intake`` of dispatcher d1 reading ``q`` with ``ROUTES``."""
    q, keys = f"{key_prefix}q", Keys(key_prefix)
    rds = Redis.from_url(redis_url)
    try:
        yield q, keys, rds, Intake(rds, keys, "d1", [q], routes=ROUTES)
    finally:
        await rds.aclose()


async def _take_all(intake: Intake, free: dict[str, int] | None) -> list[str]:
    """Take until nothing comes, one job per call (a pass takes what the room allows)."""
    out = []
    while got := await intake.take(1, free):
        out += [t.raw for t in got]
        await intake.settle(Settlement(ack=[t.element for t in got]))
    return out


def test_a_head_of_jobs_without_room_is_set_aside_in_order_and_served_first_once_their_pool_has_room(
    redis_url, key_prefix
):
    async def scenario() -> None:
        async with _intake(redis_url, key_prefix) as (q, keys, rds, intake):
            embed = _jobs("embed", 300, "e")
            default = _jobs("transcribe", 5, "t")
            high = _jobs("embed", 2, "h")  # fewer than SCAN_DEPTH: stays in its list
            low = _jobs("embed", 300, "l")
            await rds.rpush(q, *embed, *default)
            await rds.rpush(queue_key(q, P.HIGH), *high)
            await rds.rpush(queue_key(q, P.LOW), *low)
            # WHEN the default pool has room and the embed pool none (no GPU at all: no budget)
            taken = await intake.take(5, {"default": 5})
            # THEN the default pool's jobs behind 300 embed jobs are taken, in order
            assert [t.raw for t in taken] == default
            assert {t.pool for t in taken} == {"default"}
            # ... the first SCAN_DEPTH embed jobs of the normal list were set aside, in order; the rest wait
            aside = keys.aside(q, P.NORMAL, "embed")
            assert _raw(await rds.lrange(aside, 0, -1)) == embed[:SCAN_DEPTH]
            assert _raw(await rds.lrange(q, 0, -1)) == embed[SCAN_DEPTH:]
            assert intake.set_aside == SCAN_DEPTH
            # ... the high list (shorter than the depth) and the low list (not reached) are untouched
            assert _raw(await rds.lrange(queue_key(q, P.HIGH), 0, -1)) == high
            assert _raw(await rds.lrange(queue_key(q, P.LOW), 0, -1)) == low
            await intake.settle(Settlement(ack=[t.element for t in taken]))
            # a take that finds nothing for the default pool: 44 embed jobs left in the normal list (within the
            # depth) stay; the low list, reached now, has its first SCAN_DEPTH set aside
            assert await intake.take(5, {"default": 5}) == []
            assert intake.set_aside == 2 * SCAN_DEPTH
            assert _raw(await rds.lrange(q, 0, -1)) == embed[SCAN_DEPTH:]
            assert _raw(await rds.lrange(keys.aside(q, P.LOW, "embed"), 0, -1)) == low[:SCAN_DEPTH]
            # WHEN the embed pool gets room: every embed job once, in priority order and, within it, in order
            # (what was set aside from a list comes before that list's jobs, after the lists above it)
            order = await _take_all(intake, {"embed": 1000})
            assert order == high + embed + low
            assert not await rds.exists(aside, q, queue_key(q, P.HIGH), queue_key(q, P.LOW))

    asyncio.run(scenario())


def test_each_take_sets_aside_at_most_scan_depth_per_list(redis_url, key_prefix):
    """Bounded work per call: a backlog of 1,000 jobs for a pool without room moves SCAN_DEPTH per take;
    the job behind it is taken by the take that reaches it."""

    async def scenario() -> None:
        async with _intake(redis_url, key_prefix) as (q, keys, rds, intake):
            embed = _jobs("embed", 1000, "e")
            (default,) = _jobs("transcribe", 1, "t")
            await rds.rpush(q, *embed, default)
            moved: list[int] = []
            while True:
                before = intake.set_aside
                taken = await intake.take(1, {"default": 1})
                moved.append(intake.set_aside - before)
                if taken:
                    break
            # the third take moves SCAN_DEPTH and finds the job behind the 232 left, within its second look
            assert moved == [SCAN_DEPTH] * 3
            assert [t.raw for t in taken] == [default]
            assert _raw(await rds.lrange(keys.aside(q, P.NORMAL, "embed"), 0, -1)) == embed[: 3 * SCAN_DEPTH]
            assert _raw(await rds.lrange(q, 0, -1)) == embed[3 * SCAN_DEPTH :]

    asyncio.run(scenario())


def test_unparsable_and_unknown_jobs_are_never_set_aside(redis_url, key_prefix):
    """A job that is not a JSON object with a type is taken whatever the room (to be dead-lettered); a type
    without a route is the default pool's; neither waits behind a blocked head."""

    async def scenario() -> None:
        async with _intake(redis_url, key_prefix) as (q, keys, rds, intake):
            embed = _jobs("embed", 600, "e")
            (unknown,) = _jobs("no-such-type", 1, "u")
            await rds.rpush(q, *embed[:100], unknown, *embed[100:300], "not json", *embed[300:])
            # WHEN no pool of theirs has room: only the unparsable job can be taken (past the first depth)
            first = await intake.take(2, {"nothing": 1})
            assert [(t.raw, t.pool) for t in first] == [("not json", None)]
            await intake.settle(Settlement(ack=[t.element for t in first]))
            # THEN the unknown type, the default pool's, was set aside for it, in the same move as the embed jobs
            assert _raw(await rds.lrange(keys.aside(q, P.NORMAL, "default"), 0, -1)) == [unknown]
            assert _raw(await rds.lrange(keys.aside(q, P.NORMAL, "embed"), 0, -1)) == embed[: SCAN_DEPTH - 1]
            # ... and taken from there once it has room, before any embed job
            got = await intake.take(1, {"default": 1})
            assert [(t.raw, t.pool) for t in got] == [(unknown, "default")]

    asyncio.run(scenario())


def test_set_aside_jobs_taken_then_handed_back_return_to_the_head_of_their_list(redis_url, key_prefix):
    """A crash or stop after taking set-aside jobs: the sweep puts them back where they came from, in order;
    a job that lost its slot race goes back to the head as well. No job lost or doubled."""

    async def scenario() -> None:
        async with _intake(redis_url, key_prefix) as (q, keys, rds, intake):
            embed = _jobs("embed", 300, "e")
            await rds.rpush(q, *embed, *_jobs("transcribe", 1, "t"))
            (t,) = await intake.take(1, {"default": 1})
            await intake.settle(Settlement(ack=[t.element]))
            aside = keys.aside(q, P.NORMAL, "embed")
            taken = await intake.take(3, {"embed": 3})
            assert [t.raw for t in taken] == embed[:3] and {t.source for t in taken} == {aside}
            # a seed-style job does not say its queue: the list it was set aside from does
            assert {t.queue for t in taken} == {q} and {t.queue for t in await intake.held()} == {q}
            assert await intake.hand_back() == 3  # a stop, or the sweep of a dispatcher that died
            assert _raw(await rds.lrange(aside, 0, -1)) == embed[:SCAN_DEPTH]
            taken = await intake.take(3, {"embed": 3})
            assert [t.raw for t in taken] == embed[:3]
            await intake.settle(
                Settlement(back=[(t.element, t.raw, t.pool) for t in taken])
            )  # lost their slots
            assert _raw(await rds.lrange(aside, 0, -1)) == embed[:SCAN_DEPTH]
            assert _raw(await rds.lrange(q, 0, -1)) == embed[SCAN_DEPTH:]
            assert await rds.llen(intake.proc) == 0

    asyncio.run(scenario())


def test_a_take_without_per_pool_limits_serves_set_aside_jobs_too(redis_url, key_prefix):
    async def scenario() -> None:
        async with _intake(redis_url, key_prefix) as (q, _keys, rds, intake):
            embed = _jobs("embed", 300, "e")
            await rds.rpush(q, *embed, *_jobs("transcribe", 1, "t"))
            await intake.take(1, {"default": 1})
            got = await intake.take(2, None)
            assert [t.raw for t in got] == embed[:2]

    asyncio.run(scenario())


def test_set_aside_jobs_are_visible_counted_and_their_priority_changes(redis_url, key_prefix):
    """A set-aside job still waits in its queue at its priority: GET /tasks/{id} and `gpuq task show` find it
    (queued), the queue's depth and oldest wait count it, and `gpuq task priority` moves it."""

    async def scenario() -> None:
        async with _intake(redis_url, key_prefix) as (q, _keys, rds, intake):
            await rds.rpush(q, *_jobs("embed", 300, "e"), *_jobs("transcribe", 1, "t"))
            await intake.take(1, {"default": 1})

    asyncio.run(scenario())
    q, keys, pools = f"{key_prefix}q", Keys(key_prefix), ["default", "embed"]
    aside = keys.aside(q, P.NORMAL, "embed")
    rds = redis.Redis.from_url(redis_url)
    try:
        found = find_waiting(rds, keys=keys, task_id="e5", queues=[q], pools=pools)
        assert found is not None
        assert (found["state"], found["queue"], found["list"], found["position"]) == ("queued", q, aside, 5)
        view = read_sync(rds, Plan(keys, [q], pools))
        normal = next(d for d in view.queues if d.priority == P.NORMAL.value)
        assert (normal.depth, normal.aside) == (300, SCAN_DEPTH)
        assert view.waiting() == 300  # not counted twice
        # the same priority: it keeps its place (ahead of the list's embed jobs)
        same = move_job(rds, task_id="e5", queues=[q], priority=P.NORMAL, keys=keys, pools=pools)
        assert (same.found, same.target) == (True, aside)
        assert rds.lindex(aside, 5) == _jobs("embed", 6, "e")[5].encode()
        # another priority: to the back of that list, once
        moved = move_job(rds, task_id="e5", queues=[q], priority=P.HIGH, keys=keys, pools=pools)
        assert (moved.found, moved.source, moved.target) == (True, aside, queue_key(q, P.HIGH))
        assert rds.llen(aside) == SCAN_DEPTH - 1
        assert json.loads(rds.lindex(queue_key(q, P.HIGH), 0) or b"{}")["task_id"] == "e5"
        # without the set-aside lists (the CLI before them) it is not found
        assert not move_job(rds, task_id="e6", queues=[q], priority=P.HIGH).found
    finally:
        rds.close()


def test_jobs_set_aside_for_a_pool_no_longer_routed_to_go_back_to_their_list(redis_url, key_prefix):
    """TASK_ROUTES changed while jobs were set aside for a pool without GPUs: no take reads that pool's
    set-aside lists any more, so the first sweep puts their jobs back at the head of their list, in order."""

    async def scenario() -> None:
        q, keys = f"{key_prefix}q[1]", Keys(key_prefix)  # glob characters in the name: matched literally
        rds = Redis.from_url(redis_url)
        before = Intake(rds, keys, "d1", [q], routes={**ROUTES, "tr": "transcribe"})
        embed, tr = _jobs("embed", 300, "e"), _jobs("tr", 300, "r")
        await rds.rpush(q, *embed, *tr, *_jobs("x", 1, "t"))
        while not await before.take(1, {"default": 1}):
            pass
        assert await rds.llen(keys.aside(q, P.NORMAL, "embed")) == 300
        assert await rds.llen(keys.aside(q, P.NORMAL, "transcribe")) == SCAN_DEPTH - 300 % SCAN_DEPTH
        # WHEN a dispatcher starts that routes "tr" still, "embed" no more
        after = Intake(rds, keys, "d2", [q], routes={"tr": "transcribe"})
        assert await after.sweep_dead() == 300
        # THEN the embed jobs are back at the head of the queue, in order; the transcribe ones stay aside
        assert _raw(await rds.lrange(q, 0, 299)) == embed
        assert not await rds.exists(keys.aside(q, P.NORMAL, "embed"))
        assert await rds.llen(keys.aside(q, P.NORMAL, "transcribe")) == SCAN_DEPTH - 300 % SCAN_DEPTH
        # ... at the first sweep, then only every ASIDE_RESCAN_SECONDS: a dispatcher still on the old routes
        # (a rolling change) sets more aside, and they go back at the next look, not never
        late = _jobs("embed", 1, "late")
        await rds.rpush(keys.aside(q, P.NORMAL, "embed"), *late)
        assert await after.sweep_dead() == 0
        after._aside_due = 0.0  # ASIDE_RESCAN_SECONDS have passed
        assert await after.sweep_dead() == 1
        assert _raw(await rds.lrange(q, 0, 0)) == late
        assert not await rds.exists(keys.aside(q, P.NORMAL, "embed"))
        await rds.aclose()

    asyncio.run(scenario())


def test_set_aside_on_a_redis_cluster_stays_in_the_queues_slot(redis_cluster: Cluster, key_prefix):
    """Every list the take script touches is passed in KEYS and carries the queue's hash tag: on a cluster
    the same take sets aside and serves in order (a key of another slot would fail the script)."""

    async def scenario() -> None:
        q, keys = f"{key_prefix}q", Keys(key_prefix)
        rds = RedisCluster.from_url(redis_cluster.url)
        intake = Intake(rds, keys, "d1", [q], routes=ROUTES)  # type: ignore[arg-type]
        assert intake.cluster
        embed = _jobs("embed", 300, "e")
        default = _jobs("transcribe", 2, "t")
        await rds.rpush(q, *embed, *default)
        try:
            assert [t.raw for t in await intake.take(2, {"default": 2})] == default
            assert await rds.llen(keys.aside(q, P.NORMAL, "embed")) == SCAN_DEPTH
            assert await _take_all(intake, {"embed": 1000}) == embed
            # the start-time look for jobs set aside for pools no longer routed to scans every node
            await rds.rpush(q, *embed)
            assert await intake.take(1, {"default": 1}) == []
            restarted = Intake(rds, keys, "d2", [q])  # type: ignore[arg-type]
            assert await restarted.sweep_dead() == SCAN_DEPTH
            assert _raw(await rds.lrange(q, 0, -1)) == embed
        finally:
            for key in (q, keys.aside(q, P.NORMAL, "embed"), intake.proc):
                await rds.delete(key)
            await rds.aclose()

    asyncio.run(scenario())


def test_an_unpaired_conditional_push_is_refused_and_changes_nothing(redis_url, key_prefix):
    """SETTLE's ``lpushx`` (onto a set-aside list that holds jobs) and ``lpushelse`` (else onto the source)
    come in pairs. Either alone was applied: the ``lrem`` ran, the push did not, and the job was in no list (a
    second outside review). A settlement that breaks a pair is refused whole, as any malformed one."""

    async def scenario() -> None:
        async with _intake(redis_url, key_prefix) as (q, keys, rds, intake):
            await rds.rpush(q, *_jobs("transcribe", 1, "t"))
            (t,) = await intake.take(1, None)
            aside = keys.aside(q, P.NORMAL, "default")  # empty: the lone lpushx pushes nothing
            for op, target in (("lpushx", aside), ("lpushelse", q)):
                with pytest.raises(redis.ResponseError, match="come in pairs"):
                    await intake._settle(
                        keys=[intake.proc, target], args=["lrem", 1, t.element, op, 2, t.raw]
                    )
                assert [await rds.llen(k) for k in (intake.proc, q, aside)] == [1, 0, 0]

    asyncio.run(scenario())


def test_a_queue_s_parked_jobs_come_first_in_its_own_turns_only(redis_url, key_prefix):
    """Parked lists are served before their queue's lists for their pool (a pool's parked jobs were taken
    before any still in the queue), within that queue's turns: served before every queue's turn (as was done
    for a few hours), one queue's parked backlog held back a heavier queue's high-priority jobs (a second
    outside review). Before that, a queue's turns alternated its parked and queued jobs."""

    async def scenario() -> None:
        q1, q2 = f"{key_prefix}q1", f"{key_prefix}q2"
        rds = Redis.from_url(redis_url)
        keys = Keys(key_prefix)
        try:
            intake = Intake(rds, keys, "d1", [q1, q2], {q2: 3})
            parked = [json.dumps({"type": "t", "task_id": f"p{i}"}) for i in range(20)]
            await rds.rpush(keys.parked(q1, "default"), *parked)
            await rds.rpush(q1, *[json.dumps({"type": "t", "task_id": f"n{i}"}) for i in range(20)])
            await rds.rpush(
                queue_key(q2, P.HIGH), *[json.dumps({"type": "t", "task_id": f"h{i}"}) for i in range(20)]
            )
            taken = [json.loads(t.raw)["task_id"] for t in await intake.take(8, {"default": 8})]
            # q2 has 3 of every 4 turns; q1's turns take its parked jobs, in order, before its queued ones
            assert sorted(taken) == sorted(["p0", "p1", "h0", "h1", "h2", "h3", "h4", "h5"])
            assert [i for i in taken if i.startswith("p")] == ["p0", "p1"]
        finally:
            await rds.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize("give_back", ["hand_back", "sweep"])
def test_a_job_handed_back_or_swept_is_not_overtaken_by_younger_jobs_set_aside(
    redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch, give_back: str
) -> None:
    """A job taken from a priority list while younger jobs of its pool were set aside afterwards: a stop
    (``hand_back``) or the sweep of a dead dispatcher LPUSHed it onto the priority list, behind those (a take
    serves the set-aside list first). It goes to the head of that set-aside list now (``SWEEP``'s ARGV), and
    onto the priority list when nothing is set aside (a second outside review)."""
    monkeypatch.setattr(intake_module, "SCAN_DEPTH", 4)  # jobs set aside after four skipped

    async def scenario() -> None:
        q, keys = f"{key_prefix}q", Keys(key_prefix)
        rds = Redis.from_url(redis_url)
        aside = keys.aside(q, P.NORMAL, "default")

        async def taken_then_set_aside_behind(set_aside: bool) -> Intake:
            await rds.delete(q, aside)
            jobs = [json.dumps({"task_id": f"t{i}", "type": "t"}) for i in range(10)]
            jobs += [json.dumps({"task_id": f"u{i}", "type": "u"}) for i in range(2)]
            await rds.rpush(q, *jobs)
            d1 = Intake(rds, keys, "d1", [q], routes={"u": "other"})
            (x,) = await d1.take(1, {"default": 1})
            assert x.source == q
            if set_aside:
                got = await d1.take(1, {"other": 1})  # t1..t4 set aside for default, u0 taken
                await d1.settle(Settlement(ack=[t.element for t in got]))
                assert [json.loads(r)["task_id"] for r in await rds.lrange(aside, 0, -1)] == [
                    "t1",
                    "t2",
                    "t3",
                    "t4",
                ]
            return d1

        async def given_back(d1: Intake) -> None:
            if give_back == "hand_back":
                assert await d1.hand_back() == 1  # a stop
            else:  # d1 died: another dispatcher sweeps its processing list
                d3 = Intake(rds, keys, "d3", [q], routes={"u": "other"})
                assert await d3._sweep_procs([(q, d1.proc)]) == 1

        try:
            await given_back(await taken_then_set_aside_behind(True))
            d2 = Intake(rds, keys, "d2", [q], routes={"u": "other"})
            (y,) = await d2.take(1, {"default": 1})
            assert json.loads(y.raw)["task_id"] == "t0"
            assert [json.loads(r)["task_id"] for r in await rds.lrange(aside, 0, 0)] == ["t1"]
            # nothing set aside: back onto the priority list's head, as before
            await given_back(await taken_then_set_aside_behind(False))
            assert json.loads((await rds.lrange(q, 0, 0))[0])["task_id"] == "t0"
            assert await rds.llen(aside) == 0
        finally:
            await rds.aclose()

    asyncio.run(scenario())
