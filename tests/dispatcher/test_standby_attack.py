"""Attacks on standby jobs (review). Each test states a guarantee that should hold; a failure is a bug."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy import text

from dispatcher.db.agents import poll, register_pull
from dispatcher.db.attempts import Backoff, cancel_task
from dispatcher.db.engine import StoreUnavailable, transaction
from dispatcher.db.gpus import set_gpu_state
from dispatcher.db.standby import eligible_slots
from dispatcher.gpus.gpu_client import Answer, Verdict
from dispatcher.gpus.pull import hash_agent_token
from dispatcher.loop.core import Dispatcher
from dispatcher.states import GpuState
from dispatcher.testing import settle
from tests.dispatcher.helpers import end_attempt
from tests.dispatcher.test_handoff import World, finish, run, world  # noqa: F401 - world: a fixture
from tests.dispatcher.test_standby_loop import _bound, _next_of, _sent

# -- 1. a synchronous GPU's answer to an early-sent standby is thrown away ------------------------------


def test_sync_answer_of_an_early_standby_is_lost_when_the_holders_transaction_fails(world: World) -> None:  # noqa: F811
    """SPEC §4: a 2xx whose body says "finished" completes the task at once (synchronous services).
    The standby is POSTed before its holder's transaction; that transaction fails (StoreUnavailable, the
    callback gets 503 and the GPU will retry it). The standby's answer comes back meanwhile: it is judged
    against a row still 'standby', found stale, and dropped. Nobody retries a POST answer: the result is
    lost, the standby is promoted later by the holder's retried callback, and runs again after its lease."""
    w = world

    async def body(d: Dispatcher) -> None:
        ids, nxt = await _bound(w, d)
        standby = nxt[ids[1]]
        end_many = d.handoffs.end_many
        calls = 0

        async def failing_once(items: list[dict[str, Any]]) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise StoreUnavailable("database down for a moment")
            return await end_many(items)

        d.ends.hand_off_with(failing_once)
        with pytest.raises(StoreUnavailable):
            await finish(d, ids[1])  # the holder's callback: 503, retried by its GPU later
        assert _sent(d, standby)  # the standby went out early
        # the GPU's synchronous answer to the standby's POST: 200 {"status": "finished", "result": ...},
        # judged as GpuRequests._send does
        await d.requests._judge(_placed_row(w, d, standby), Answer(Verdict.FINISHED, status=200, result=42))
        # the holder's callback, retried by its GPU, now applies and promotes the standby
        assert await finish(d, ids[1]) == "applied"
        await settle(d)
        await d.standbys.step()  # the owner's next round (every 50 ms) applies the answer it kept
        await settle(d)
        # the standby ran and reported "finished" with a result: it must be finished, not waiting to rerun
        assert w.state(standby) == "finished", f"standby is {w.state(standby)}: its result was dropped"

    run(w, w.settings(["g0"]), body)


def _job_of(w: World, d: Dispatcher, task_id: str) -> Any:
    from producer.job import Job

    return Job(task_id=task_id, type="t", queue=w.queue, data={})


def _placed_row(w: World, d: Dispatcher, task_id: str) -> Any:
    from dispatcher.db.dispatch import Placed

    b = w.rows()[task_id]
    return Placed(_job_of(w, d, task_id), "default", b.gpu_id, b.slot_index, "", 1)


def test_sync_answer_of_an_early_standby_is_lost_when_its_holder_was_cancelled(world: World) -> None:  # noqa: F811
    """The holder was cancelled; its final callback still sends its standby early (outcome FINISHED), then the
    end is 'stale/cancelled' and ``confirm_stop`` frees the slot (promoting the standby) in a transaction of
    its own, AFTER ``standbys.ended`` let the standby's own reports through. A synchronous GPU's answer to
    the standby arriving before that confirm is judged against a 'standby' row, found stale and dropped."""
    w = world

    async def body(d: Dispatcher) -> None:
        ids, nxt = await _bound(w, d)
        standby = nxt[ids[1]]
        transaction(w.engine, cancel_task, task_id=ids[1], now=d.now(), backoff=Backoff())
        confirm = d.ends.confirm_stop
        answered: list[str] = []

        async def confirm_after_the_answer(task_id: str, attempt: int, **kw: Any) -> bool:
            if task_id == ids[1]:
                # the standby's POST was answered synchronously before this confirm's transaction
                await d.requests._judge(
                    _placed_row(w, d, standby), Answer(Verdict.FINISHED, status=200, result=42)
                )
                answered.append(standby)
            return await confirm(task_id, attempt, **kw)

        d.ends.confirm_stop = confirm_after_the_answer  # type: ignore[method-assign]
        assert await finish(d, ids[1]) == "stale"  # the cancelled holder's report (answered 409)
        assert answered == [standby]
        assert _sent(d, standby)
        await settle(d)
        await d.standbys.step()  # the owner's next round applies an answer it had to keep, if any
        await settle(d)
        assert w.state(standby) == "finished", f"standby is {w.state(standby)}: its result was dropped"

    run(w, w.settings(["g0"]), body)


# -- 2. push -> pull conversion: the standby is POSTed to the old URL and fetched by the agent ------------


@pytest.mark.parametrize("how", ["early", "look"])
def test_a_standby_on_a_gpu_turned_pull_runs_twice(world: World, how: str) -> None:  # noqa: F811
    w = world

    async def body(d: Dispatcher) -> None:
        ids, nxt = await _bound(w, d)
        holder = ids[1]
        standby = nxt[holder]
        # the operator turns the pushed GPU into a pull GPU (its service still runs the jobs it has)
        token = transaction(w.engine, register_pull, gpu_id="g0", pool="default", slot_count=2, now=d.now())
        assert token
        if how == "early":  # the running job's callback reaches the owner: standby POSTed at once
            assert await finish(d, holder) == "applied"
        else:  # ...or another dispatcher: the owner's next look sends it
            assert end_attempt(w.engine, holder, now=d.now()).code == "applied"
            d.standbys._looked = 0.0
            await d.standbys.step()
        await settle(d)
        posted = standby in w.received()
        # the agent polls
        got = transaction(
            w.engine,
            poll,
            gpu_id="g0",
            token_hash=hash_agent_token(token),
            max_jobs=4,
            now=d.now(),
            lease_seconds=60,
            seen_until=None,
        )
        fetched = standby in [j.task_id for j in got.jobs]
        assert not (posted and fetched), "the standby was POSTed to the old service AND fetched by the agent"

    run(w, w.settings(["g0"]), body)


# -- 3. a drained GPU gets a new job ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["early", "look", "down-here"])
def test_a_drained_gpu_gets_no_standby(world: World, how: str) -> None:  # noqa: F811
    """Drained by an operator (another process): nothing goes there once the owner's GPU look (every
    GPU_LOOK_SECONDS) has seen it; taken out of rotation by this process: at once."""
    w = world

    async def body(d: Dispatcher) -> None:
        ids, nxt = await _bound(w, d)
        holder = ids[1]
        standby = nxt[holder]
        if how == "down-here":
            d.requests.gpu_down("g0")  # this process counted its failures past the threshold
            assert await finish(d, holder) == "applied"
            await settle(d)
            assert standby not in w.received()
            return
        transaction(w.engine, set_gpu_state, gpu_id="g0", state=GpuState.DRAINING, now=d.now())
        if how == "early":  # the holder's callback comes after the owner's GPU look saw the drain
            d.standbys._gpus_looked = 0.0
            await d.standbys.step()
            assert await finish(d, holder) == "applied"
        else:  # ended elsewhere; the owner's next round both looks and checks the GPUs
            assert end_attempt(w.engine, holder, now=d.now()).code == "applied"
            d.standbys._looked = 0.0
            d.standbys._gpus_looked = 0.0
            await d.standbys.step()
        await settle(d)
        assert standby not in w.received(), "a new job was POSTed to a drained GPU"

    run(w, w.settings(["g0"]), body)


# -- 4. _check_gpus forgets standbys without taking them back (KeyError mid-loop) ---------------------------


def test_a_callback_during_the_gpu_check_strands_other_standbys(world: World) -> None:  # noqa: F811
    w = world

    async def body(d: Dispatcher) -> None:
        _ids, nxt = await _bound(w, d)
        by_standby = {s: h for h, s in nxt.items()}
        order = list(d.standbys._by_task)  # the order _check_gpus will take them back in
        first, second = order
        transaction(w.engine, set_gpu_state, gpu_id="g0", state=GpuState.DRAINING, now=d.now())
        real_db = d.rt.db

        async def db(fn: Any, /, **kw: Any) -> Any:
            out = await real_db(fn, **kw)
            if fn is eligible_slots:
                # while the check awaited the database, the GPU's callback for the second standby's holder
                # came in (end_attempt calls on_end before its transaction): that standby is sent
                d.standbys.on_end(by_standby[second], 1)
            return out

        d.rt.db = db  # type: ignore[method-assign]
        d.standbys._gpus_looked = 0.0
        d.standbys._looked = time.monotonic()
        await d.standbys.step()  # it used to raise KeyError here, leaving the first one stranded
        d.rt.db = real_db  # type: ignore[method-assign]
        # the first standby: forgotten by _forget, never unbound, never back in the buffer
        in_memory = d.standbys.holds(first)
        in_buffer = any(r.job.task_id == first for r in d.handoffs.buffer.drain())
        still_bound = first in _next_of(w).values()
        assert in_memory or in_buffer or not still_bound, (
            f"standby {first} is bound in the database ({w.state(first)}) but neither held nor buffered:"
            " after its holder ends it is promoted, never sent, and waits a whole lease"
        )

    run(w, w.settings(["g0"]), body)


# -- 5. a cancelled standby, released then unbound in two transactions ------------------------------------


def test_a_cancelled_standby_promoted_between_release_and_unbind_keeps_its_slot(world: World) -> None:  # noqa: F811
    w = world

    async def body(d: Dispatcher) -> None:
        ids, nxt = await _bound(w, d)
        holder = ids[1]
        standby = nxt[holder]
        transaction(w.engine, cancel_task, task_id=standby, now=d.now(), backoff=Backoff())
        real_db = d.rt.db
        from dispatcher.db.standby import drop_cancelled

        async def db(fn: Any, /, **kw: Any) -> Any:
            out = await real_db(fn, **kw)
            if fn is drop_cancelled and kw.get("task_id") == standby:
                # the holder's callback is applied by another dispatcher right after the release
                assert end_attempt(w.engine, holder, now=d.now()).code == "applied"
            return out

        d.rt.db = db  # type: ignore[method-assign]
        d.standbys._looked = 0.0
        await d.standbys.step()
        d.rt.db = real_db  # type: ignore[method-assign]
        await settle(d)
        assert standby not in w.received()
        with w.engine.connect() as conn:
            held = conn.execute(
                text("SELECT COUNT(*) FROM slots WHERE task_id = :t"), {"t": standby}
            ).scalar()
        assert held == 0, "a cancelled standby never sent holds its slot (until its lease runs out)"

    run(w, w.settings(["g0"]), body)


# -- 6. a graceful stop cancels a bind in flight: its standbys stay bound to a process that is gone --------


def test_a_stop_during_a_bind_leaves_no_standby_bound(world: World) -> None:  # noqa: F811
    w = world

    async def body(d: Dispatcher) -> None:
        from dispatcher.loop.handoff import HandOffs  # noqa: F401
        from tests.dispatcher.test_handoff import primed

        ids = await primed(w, d, 6)
        real_db = d.rt.db
        started = asyncio.Event()

        async def db(fn: Any, /, **kw: Any) -> Any:
            if fn.__name__ == "bind":
                started.set()

                def slow(conn: Any, **k: Any) -> Any:
                    out = fn(conn, **k)
                    time.sleep(0.3)  # the bind's transaction commits while its awaiter is cancelled
                    return out

                return await real_db(slow, **kw)
            return await real_db(fn, **kw)

        d.rt.db = db  # type: ignore[method-assign]
        step = asyncio.create_task(d.standbys.step())
        await started.wait()
        await asyncio.sleep(0.05)
        step.cancel()  # Dispatcher.stop cancels every side task, "standbys" among them
        with pytest.raises(asyncio.CancelledError):
            await step
        await asyncio.sleep(0.5)  # the worker thread commits
        d.rt.db = real_db  # type: ignore[method-assign]
        await d.standbys.release_all()  # what stop() does next
        assert _next_of(w) == {}, (
            f"standbys {sorted(_next_of(w).values())} stay bound to a stopped dispatcher:"
            f" {[w.state(i) for i in ids[3:5]]}"
        )

    run(w, w.settings(["g0"]), body)


# -- 7. the oldest job bound behind a long-running holder: younger jobs start without bound -----------------


def test_a_standby_behind_a_long_holder_is_overtaken_without_bound(world: World) -> None:  # noqa: F811
    """SPEC §4 Order: a job never starts after a job of the same priority enqueued after it, beyond a small
    documented prefetch (README: HANDOFF_BUFFER plus one per slot). Bind gives the OLDEST buffered job to the
    slot whose holder started FIRST; when that holder is a long job (heartbeating), the standby waits for it
    while every younger job runs on the other slot. Nothing takes it back (the design's "when the buffer's
    demand lapses" was not built)."""
    w = world

    async def body(d: Dispatcher) -> None:
        ids, nxt = await _bound(w, d)  # ids[1], ids[2] running; ids[3], ids[4] their standbys
        oldest_waiting = min(nxt.values(), key=ids.index)
        long_holder = next(h for h, s in nxt.items() if s == oldest_waiting)
        younger_started = 0
        more = w.push(30)
        for _ in range(20):
            with w.engine.connect() as conn:
                holders = [
                    r.task_id
                    for r in conn.execute(text("SELECT task_id FROM slots WHERE task_id IS NOT NULL"))
                ]
            short = next(h for h in holders if h != long_holder)
            # the long job heartbeats; the other slot's job finishes
            await d.ends.heartbeat(long_holder, 1)
            assert await finish(d, short) == "applied"
            await settle(d)
            d.slot_freed()
            await d.dispatch_once()  # refill the buffer
            await settle(d)
            d.standbys.binder.targets = True
            await d.standbys.step()
            await settle(d)
        rows = w.rows()
        younger = ids[ids.index(oldest_waiting) + 1 :] + more
        younger_started = sum(1 for i in younger if i in rows and rows[i].state in ("processing", "finished"))
        bound = d.settings.handoff_buffer + 2
        assert w.state(oldest_waiting) != "standby" or younger_started <= bound, (
            f"{younger_started} younger jobs started while {oldest_waiting} (older) still waits as a standby"
            f" behind {long_holder}; documented bound {bound}"
        )

    run(w, w.settings(["g0"]), body)


# -- 8. a take-back that fails half way strands the standbys already taken back ------------------------------


def test_a_failed_release_during_a_take_back_strands_the_jobs_taken_back(world: World) -> None:  # noqa: F811
    w = world

    async def body(d: Dispatcher) -> None:
        _ids, _nxt = await _bound(w, d)
        first, second = list(d.standbys._by_task)
        transaction(w.engine, cancel_task, task_id=second, now=d.now(), backoff=Backoff())
        transaction(w.engine, set_gpu_state, gpu_id="g0", state=GpuState.DRAINING, now=d.now())
        from dispatcher.db.standby import drop_cancelled

        real_db = d.rt.db

        async def db(fn: Any, /, **kw: Any) -> Any:
            if fn is drop_cancelled:
                raise StoreUnavailable("database down for a moment")
            return await real_db(fn, **kw)

        d.rt.db = db  # type: ignore[method-assign]
        d.standbys._gpus_looked = 0.0
        d.standbys._looked = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await d.standbys.step()  # run() logs it and retries in 0.2 s
        d.rt.db = real_db  # type: ignore[method-assign]
        assert w.state(first) == "queued"  # taken back in the database
        buffered = [r.job.task_id for r in d.handoffs.buffer.drain()]
        assert d.standbys.holds(first) or first in buffered, (
            f"{first} is queued in the database, its element held in the processing list (in_flight:"
            f" {sum(1 for e in d.handoffs.in_flight if first in e)}), but neither buffered nor a standby:"
            " no pass will ever place it while this process lives"
        )

    run(w, w.settings(["g0"]), body)
