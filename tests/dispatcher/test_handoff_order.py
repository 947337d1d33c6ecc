"""Jobs waiting for a full pool keep their place while a hand-off holds some of them (the flaky
tests/features/test_pools.py::test_jobs_waiting_for_a_full_pool_keep_their_place: of four jobs waiting for a
1-slot pool, the 3rd and 4th started swapped).

The interleaving behind it, played step by step in-process (see test_handoff.py) against real MariaDB /
SQLite and Redis: a batch of attempt ends takes the pool's oldest buffered job (s3) as a hand-off candidate;
while its transaction runs, a pass of the loop has room for that pool. Placing the next buffered job (s4)
there started s4 first, s3 coming back to the buffer. Now the pass keeps that room until the hand-off is over
(``Wakeups.defer`` / ``resume``), and a batch takes candidates only of the pools its ends free when this
process sent those attempts (``HandOffs._freeing``), so a fast pool's callbacks no longer hold a slow
pool's jobs at all. The transaction is held by wrapping ``rt.db_hot``, nothing depends on timing.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from dispatcher.db.attempts import finish_many
from dispatcher.db.handoff import end_and_hand_off
from dispatcher.loop import ready
from dispatcher.loop.core import Dispatcher
from dispatcher.settings import DispatcherSettings
from dispatcher.states import Outcome
from dispatcher.testing import settle
from producer.job import Job
from producer.keys import Priority, queue_key
from tests.dispatcher.test_handoff import World, buffered, finish, run, world  # noqa: F401 - world: a fixture


@pytest.fixture(params=[1, 2], ids=["pipeline1", "pipeline2"])
def w(world: World, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> World:  # noqa: F811
    """The world (an imported fixture), with one group-commit batch in flight or two (COMMIT_PIPELINE)."""
    # The pools stay in demand however slowly the test runs (their buffers are not parked on the way).
    monkeypatch.setattr(ready, "DEMAND_SECONDS", 3600.0)
    world.pipeline = request.param  # type: ignore[attr-defined]
    return world


def settings(w: World) -> DispatcherSettings:
    """Two pools of one 1-slot GPU each: "slow" (jobs of type s) and "fast" (type f)."""
    gpus = f"slow:s0={w.fleet.url('g0')},fast:f0={w.fleet.url('g1')}"
    pipeline = w.pipeline  # type: ignore[attr-defined]
    return w.settings(
        [], gpu_endpoints=gpus, slots_per_gpu=1, task_routes="s=slow,f=fast", commit_pipeline=pipeline
    )


def push(w: World, task_type: str, n: int) -> list[str]:
    ids = [f"{task_type}{i}-{uuid.uuid4().hex[:6]}" for i in range(1, n + 1)]
    for task_id in ids:
        job = Job(task_id=task_id, type=task_type, queue=w.queue, priority=Priority.NORMAL, data={})
        w.rds.rpush(queue_key(w.queue, Priority.NORMAL), job.to_redis())
    return ids


async def slow_waiting(w: World, d: Dispatcher) -> tuple[list[str], list[str]]:
    """s2 runs on the slow pool, s3 and s4 wait in its buffer (oldest first), f1 runs on the fast pool, f2
    waits in Redis."""
    # As with another dispatcher running: a pass that fills a pool does not prime its buffer
    # (test_first_wave.py), so only the pool whose slot was freed here buffers jobs.
    d.intake.alone = False
    s, f = push(w, "s", 4), push(w, "f", 2)
    assert await d.dispatch_once()  # s1, f1 on the free slots; nothing buffered (no pool in demand yet)
    await settle(d)
    assert await finish(d, s[0]) == "applied"  # nothing buffered: the slot goes to the loop
    assert await d.dispatch_once()  # s2 on it; s3, s4 fill the slow pool's buffer
    await settle(d)
    assert [w.state(i) for i in s] == ["finished", "processing", None, None]
    assert buffered(d, "slow") == s[2:]
    return s, f


def hold_handoff(d: Dispatcher, meanwhile: Callable[[list[str]], Awaitable[None]]) -> list[list[str]]:
    """Run ``meanwhile(candidates)`` once, while the first hand-off's candidates are out and before its
    transaction; returns the candidates of every hand-off (task ids)."""
    real = d.rt.db_hot
    seen: list[list[str]] = []

    async def db(fn: Callable[..., Any], /, **kwargs: Any) -> Any:
        if fn is end_and_hand_off:
            seen.append([job.task_id for job, _ in kwargs["candidates"]])
            if len(seen) == 1:
                await meanwhile(seen[0])
        return await real(fn, **kwargs)

    d.rt.db_hot = db  # type: ignore[method-assign]
    return seen


def slow_room_meanwhile(
    w: World, d: Dispatcher, s: list[str], early: list[str | None]
) -> Callable[[list[str]], Awaitable[None]]:
    """While the hand-off holds s3: s2's slot is freed by something no hand-off counts (here s2 ends outside
    the group commit, as an operator's or another process's end would), and a pass of the loop looks. What
    became of s4 meanwhile goes to ``early`` (an assert in here would be taken for the hand-off failing)."""

    async def meanwhile(candidates: list[str]) -> None:
        item = {"task_id": s[1], "attempt": 1, "outcome": Outcome.FINISHED}
        item |= {"result": None, "error": None, "reported": "finished"}
        [fin] = await d.rt.db(finish_many, items=[item], now=d.now(), backoff=d.backoff)
        assert fin.code == "applied"
        d.slot_freed()
        await d.dispatch_once()  # room for "slow": s4 must not take it ahead of s3
        # (no ``settle`` in here: it would wait for the group commit's batch, which waits for this)
        early.append(w.state(s[3]))

    return meanwhile


def test_a_pass_keeps_a_pools_room_for_the_job_a_hand_off_gives_back(w: World) -> None:
    async def body(d: Dispatcher) -> None:
        s, _ = await slow_waiting(w, d)
        early: list[str | None] = []
        seen = hold_handoff(d, slow_room_meanwhile(w, d, s, early))
        # a callback for an attempt this process knows nothing of (another dispatcher's, say) that ends
        # nothing: its pool is unknown, so its hand-off takes candidates of every pool, and gives them back
        assert await finish(d, f"nobody-{uuid.uuid4().hex[:6]}") == "unknown"
        assert seen == [[s[2]]]  # the hand-off took the slow pool's oldest job
        assert early == [None], "a younger job started while an older one was out in a hand-off"
        assert d.handoffs.buffer.lent("slow") == 0
        # the room the pass kept goes to the next pass: s3 on the freed slot, not left idle
        assert await d.dispatch_once()
        await settle(d)
        assert (w.state(s[2]), w.state(s[3])) == ("processing", None)
        assert d.handoffs.buffer.count("slow") == 1
        assert await finish(d, s[2]) == "applied"  # s4 next, by hand-off
        rows = w.rows()
        assert rows[s[3]].state == "processing"
        assert rows[s[1]].started_at < rows[s[2]].started_at < rows[s[3]].started_at

    run(w, settings(w), body)


def test_a_hand_off_that_places_the_held_job_goes_first_and_the_kept_room_is_checked(w: World) -> None:
    async def body(d: Dispatcher) -> None:
        s, f = await slow_waiting(w, d)
        early: list[str | None] = []
        seen = hold_handoff(d, slow_room_meanwhile(w, d, s, early))
        del d.requests._sent[(f[0], 1)]  # as if another dispatcher had sent f1: its pool is unknown here
        assert await finish(d, f[0]) == "applied"
        assert seen == [[s[2]]]
        assert early == [None], "a younger job started while an older one was out in a hand-off"
        rows = w.rows()
        # the hand-off's transaction saw the slow slot free too: s3 started there, in that transaction
        assert rows[s[2]].state == "processing" and rows[s[2]].started_at == rows[f[0]].finished_at
        assert s[3] not in rows
        # the room kept for "slow" is stale now: the pass tries s4, finds no slot, keeps it first in line
        assert await d.dispatch_once()
        await settle(d)
        assert w.state(s[3]) is None and w.state(f[1]) == "processing"
        assert buffered(d, "slow") == [s[3]]

    run(w, settings(w), body)


def test_a_batch_of_ends_this_process_sent_takes_candidates_only_of_their_pools(w: World) -> None:
    async def body(d: Dispatcher) -> None:
        s, f = await slow_waiting(w, d)

        lent: list[int] = []

        async def meanwhile(candidates: list[str]) -> None:
            lent.append(d.handoffs.buffer.lent("slow"))

        seen = hold_handoff(d, meanwhile)
        assert await finish(d, f[0]) == "applied"  # f1 was sent here, to the fast pool
        assert seen == [[]]  # the fast pool's buffer is empty; the slow pool's jobs were not taken
        assert lent == [0]  # s3 stayed in the buffer, free for any pass
        assert await finish(d, s[1]) == "applied"  # s2 frees a slow slot: s3 is its candidate
        assert seen[1] == [s[2]]
        assert w.state(s[2]) == "processing"

    run(w, settings(w), body)


def test_room_the_loop_left_to_hand_offs_is_filled_by_the_next_one(w: World) -> None:
    """With batches overlapping (COMMIT_PIPELINE > 1) some hand-off may hold a pool's jobs at every moment,
    so the loop may never get that pool's deferred room back: the next hand-off takes candidates for it."""

    async def body(d: Dispatcher) -> None:
        s, f = await slow_waiting(w, d)
        item = {"task_id": s[1], "attempt": 1, "outcome": Outcome.FINISHED}
        item |= {"result": None, "error": None, "reported": "finished"}
        [fin] = await d.rt.db(finish_many, items=[item], now=d.now(), backoff=d.backoff)
        assert fin.code == "applied"  # the slow slot is free; no hand-off counted it
        d.wake.defer({"slow": 1})  # as a pass does while a hand-off holds s3 (that one is over: nothing held)
        seen = hold_handoff(d, lambda candidates: asyncio.sleep(0))
        assert await finish(d, f[0]) == "applied"  # a fast-pool end, sent here
        assert seen == [[s[2]]]  # plus a candidate for the room the loop left
        rows = w.rows()
        assert rows[s[2]].state == "processing" and rows[s[2]].started_at == rows[f[0]].finished_at
        assert d.wake.deferred()[0] == {}  # spent: its transaction counted the slots afresh
        assert buffered(d, "slow") == [s[3]]

    run(w, settings(w), body)
