"""Standby jobs, the owner's side (``dispatcher/loop/standbys.py``), step by step in-process against real
MariaDB / SQLite, Redis and a simulated GPU that never calls back (the test plays the callbacks and runs the
standby rounds with ``d.standbys.step()``), so every step happens in the order written.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import text

from dispatcher.db.attempts import Backoff, cancel_task
from dispatcher.db.deferred import due_deferred, mark_queued
from dispatcher.db.engine import transaction
from dispatcher.db.gpus import set_gpu_state
from dispatcher.gpus.tokens import make_token
from dispatcher.http.callback import handle
from dispatcher.loop import standbys as standbys_loop
from dispatcher.loop.core import Dispatcher
from dispatcher.states import GpuState, Outcome
from dispatcher.testing import in_process, run_until_idle, settle
from producer.keys import queue_key
from tests.dispatcher.harness import SECRET
from tests.dispatcher.helpers import add_gpu, end_attempt
from tests.dispatcher.test_handoff import World, finish, primed, run, world  # noqa: F401 - world: a fixture


def _next_of(w: World) -> dict[str, str]:
    """holder task id -> its slot's standby."""
    with w.engine.connect() as conn:
        rows = conn.execute(text("SELECT task_id, next_task_id FROM slots WHERE next_task_id IS NOT NULL"))
        return {r.task_id: r.next_task_id for r in rows}


def _sent(d: Dispatcher, task_id: str) -> bool:
    return d.requests.pool_of(task_id, 1) is not None


async def _bound(w: World, d: Dispatcher, n: int = 6) -> tuple[list[str], dict[str, str]]:
    """1 GPU x 2 slots: ids[1], ids[2] running, ids[3], ids[4] their standbys, ids[5] buffered."""
    ids = await primed(w, d, n)
    await d.standbys.step()
    await settle(d)
    nxt = _next_of(w)
    assert sorted(nxt) == sorted(ids[1:3])
    assert sorted(nxt.values()) == sorted(ids[3:5])
    assert {w.state(i) for i in ids[3:5]} == {"standby"}
    assert not any(_sent(d, i) for i in ids[3:5])
    return ids, nxt


def _hold_hand_offs(d: Dispatcher) -> tuple[asyncio.Event, asyncio.Event]:
    """Group-commit batches stop before their transaction (``entered`` set) until ``go`` is set."""
    go, entered = asyncio.Event(), asyncio.Event()
    hand_off = d.handoffs._hand_off

    async def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        await go.wait()
        return await hand_off(*args, **kwargs)

    d.handoffs._hand_off = held  # type: ignore[method-assign]
    return go, entered


def test_a_callback_sends_the_standby_before_its_own_transaction(world: World) -> None:  # noqa: F811
    w = world

    async def body(d: Dispatcher) -> None:
        ids, nxt = await _bound(w, d)
        standby = nxt[ids[1]]
        seen: list[bool] = []
        end_many = d.handoffs.end_many

        async def watching(items: list[dict[str, Any]]) -> Any:
            seen.append(_sent(d, standby))  # what the transaction finds when it starts
            return await end_many(items)

        d.ends.hand_off_with(watching)
        assert await finish(d, ids[1]) == "applied"
        assert seen == [True]
        before = w.rows()
        assert before[standby].state == "processing"
        assert before[standby].started_at == before[ids[1]].finished_at  # promoted by that transaction
        await settle(d)
        assert standby in w.received()
        assert d.standbys.sent == 1
        # the job is no longer held in the processing list once sent
        assert all(standby not in el for el in w.processing_list(d))
        # a repeated callback of the holder sends nothing again
        assert await finish(d, ids[1]) in ("repeat", "stale")
        assert d.standbys.sent == 1

    run(w, w.settings(["g0"]), body)


def test_the_standbys_own_callback_waits_for_its_promotion(world: World) -> None:  # noqa: F811
    w = world

    async def body(d: Dispatcher) -> None:
        ids, nxt = await _bound(w, d)
        standby = nxt[ids[1]]
        gate = asyncio.Event()
        end_many = d.handoffs.end_many

        async def slow(items: list[dict[str, Any]]) -> Any:
            await gate.wait()  # the holder's transaction has not run yet
            return await end_many(items)

        d.ends.hand_off_with(slow)
        holder = asyncio.create_task(finish(d, ids[1]))
        await asyncio.sleep(0.05)
        assert _sent(d, standby)
        # the GPU is fast: the standby's callback comes before its holder's transaction
        own = asyncio.create_task(finish(d, standby))
        await asyncio.sleep(0.05)
        assert not own.done()
        gate.set()
        assert await holder == "applied"
        assert await own == "applied"
        assert w.state(standby) == "finished"

    run(w, w.settings(["g0"]), body)


def test_another_process_answers_a_standbys_early_callback_503(world: World) -> None:  # noqa: F811
    w = world

    async def body(d: Dispatcher) -> None:
        ids, nxt = await _bound(w, d)
        standby = nxt[ids[1]]
        raw = orjson.dumps({"task_id": standby, "status": "finished"})
        status, answer, headers = await handle(d, raw, f"Bearer {make_token(SECRET.encode(), standby, 1)}")
        assert status == 503, answer
        assert answer["code"] == "not_started"
        assert headers == {"Retry-After": "1"}
        assert w.state(standby) == "standby"  # nothing changed

    run(w, w.settings(["g0"]), body)


def test_a_lease_sweep_of_the_holder_does_not_send_early_but_the_next_round_does(world: World) -> None:  # noqa: F811
    w = world

    async def body(d: Dispatcher) -> None:
        ids, nxt = await _bound(w, d)
        standby = nxt[ids[1]]
        with w.engine.begin() as conn:
            conn.execute(
                text("UPDATE slots SET lease_expires_at = :at WHERE task_id = :t"),
                {"at": d.now() - timedelta(seconds=1), "t": ids[1]},
            )
        # the GPU may still be at work on an expired attempt: nothing goes out before the database says so
        fin = await d.ends.end_attempt(ids[1], 1, Outcome.EXPIRED, error="lease")
        assert fin.code == "applied"
        assert not _sent(d, standby)
        assert w.state(standby) == "processing"
        d.standbys._looked = 0.0
        await d.standbys.step()
        await settle(d)
        assert standby in w.received()

    run(w, w.settings(["g0"]), body)


def test_a_holder_ended_by_another_process_gets_its_standby_sent_by_the_owners_look(world: World) -> None:  # noqa: F811
    w = world

    async def body(d: Dispatcher) -> None:
        ids, nxt = await _bound(w, d)
        standby = nxt[ids[2]]
        # the GPU's callback reached another dispatcher (a load balancer): ended there, in its transaction
        assert end_attempt(w.engine, ids[2], now=d.now()).code == "applied"
        assert w.state(standby) == "processing"
        assert not _sent(d, standby)
        d.standbys._looked = 0.0
        await d.standbys.step()
        await settle(d)
        assert standby in w.received()
        assert d.standbys.sent == 1

    run(w, w.settings(["g0"]), body)


def test_a_cancelled_standby_never_sent_gives_its_slot_back_at_once(world: World) -> None:  # noqa: F811
    w = world

    async def body(d: Dispatcher) -> None:
        ids, nxt = await _bound(w, d)
        standby = nxt[ids[2]]
        transaction(w.engine, cancel_task, task_id=standby, now=d.now(), backoff=Backoff())
        assert end_attempt(w.engine, ids[2], now=d.now()).code == "applied"  # another process
        d.standbys._looked = 0.0
        await d.standbys.step()
        await settle(d)
        assert standby not in w.received()
        assert w.state(standby) == "cancelled"
        with w.engine.connect() as conn:
            held = conn.execute(
                text("SELECT COUNT(*) FROM slots WHERE task_id = :t"), {"t": standby}
            ).scalar()
        assert held == 0
        assert all(standby not in el for el in w.processing_list(d))

    run(w, w.settings(["g0"]), body)


def test_standbys_of_a_drained_gpu_are_taken_back_and_run_elsewhere(world: World) -> None:  # noqa: F811
    w = world

    async def body(d: Dispatcher) -> None:
        ids, _ = await _bound(w, d)
        transaction(w.engine, set_gpu_state, gpu_id="g0", state=GpuState.DRAINING, now=d.now())
        d.standbys._gpus_looked = 0.0
        await d.standbys.step()
        await settle(d)
        assert _next_of(w) == {}
        assert {w.state(i) for i in ids[3:5]} == {"queued"}
        assert len(d.standbys) == 0
        # the holder's end sends nothing to the drained GPU
        assert await finish(d, ids[1]) == "applied"
        await settle(d)
        assert not set(ids[3:5]) & set(w.received())
        # back in rotation, the freed slot goes to the oldest of them, as a first attempt
        transaction(w.engine, set_gpu_state, gpu_id="g0", state=GpuState.ACTIVE, now=d.now())
        d.slot_freed()
        assert await d.dispatch_once()
        await settle(d)
        assert [w.state(i) for i in ids[3:5]] == ["processing", "queued"]
        assert w.rows()[ids[3]].attempt == 1

    run(w, w.settings(["g0"]), body)


def test_a_graceful_stop_takes_back_every_standby_not_sent(world: World) -> None:  # noqa: F811
    w = world

    async def body(d: Dispatcher) -> None:
        ids, _ = await _bound(w, d)
        await d.drain(0.1)
        assert _next_of(w) == {}
        assert {w.state(i) for i in ids[3:5]} == {"queued"}
        assert d.handoffs.buffer.drain() == []
        await settle(d)
        queued = [el.decode() for key in w.rds.scan_iter(f"*{w.queue}*") for el in w.rds.lrange(key, 0, -1)]
        assert all(any(i in el for el in queued) for i in ids[3:6])

    run(w, w.settings(["g0"]), body)


def test_with_standby_jobs_off_nothing_is_bound_and_the_daemon_runs(world: World) -> None:  # noqa: F811
    w = world

    async def main() -> None:
        async with in_process(w.settings(["g0"], standby_jobs=False), background=True) as d:
            ids = w.push(6)
            for _ in range(100):
                await asyncio.sleep(0.02)
                if w.state(ids[1]) == "processing" and len(d.handoffs.buffer):
                    break
            assert d.fatal is None
            assert not d.standbys.enabled
            await d.standbys.step()  # even asked, a disabled one binds nothing
            assert _next_of(w) == {}

    asyncio.run(main())


def test_standbys_take_free_slots_that_have_nothing_else_to_run(world: World) -> None:  # noqa: F811
    """Bound behind jobs still running (perhaps for long), standbys must not wait while a GPU of their pool
    sits idle: a pass that finds free slots and no job takes the oldest standbys back to fill them."""
    w = world

    async def body(d: Dispatcher) -> None:
        ids, _ = await _bound(w, d, 5)  # ids[3], ids[4] standbys on g0's two busy slots; nothing else waits
        d.slot_freed()
        await d.dispatch_once()  # no free slot: nothing taken back
        await d.standbys.step()
        assert len(_next_of(w)) == 2
        # a GPU joins: room, and nothing in the buffer or Redis; standbys bound a moment ago stay (at
        # saturation a slot freed just before its standby was bound looks just like this)
        add_gpu(w.engine, "g1", 2, url=w.fleet.url("g1"), now=d.now())
        d.slot_freed()
        await d.dispatch_once()
        await d.standbys.step()
        assert len(_next_of(w)) == 2
        # once they have waited IDLE_TAKE_BACK_SECONDS, the idle GPU takes them
        for s in d.standbys._by_task.values():
            s.since -= standbys_loop.IDLE_TAKE_BACK_SECONDS
        d.slot_freed()
        await d.dispatch_once()
        await settle(d)
        await d.standbys.step()  # the standbys are taken back
        await settle(d)
        assert _next_of(w) == {}
        d.slot_freed()
        assert await d.dispatch_once()
        await settle(d)
        rows = w.rows()
        assert [(rows[i].state, rows[i].gpu_id) for i in ids[3:5]] == [("processing", "g1")] * 2
        assert set(ids[3:5]) <= set(w.received())

    run(w, w.settings(["g0"]), body)


def test_a_round_binds_no_job_past_an_older_one_it_cannot_bind(world: World) -> None:  # noqa: F811
    # A round binds fresh first attempts only; one to be looked up first (a stray, a job given back by a
    # failed transaction) must not be overtaken by younger ones bound around it: on a one-slot pool a test saw
    # job 227 of 300 run out of order that way.
    w = world

    async def body(d: Dispatcher) -> None:
        ids = await primed(w, d, 6)  # ids[1], ids[2] running; ids[3], ids[4], ids[5] buffered
        buffered = list(d.handoffs.buffer._jobs["default"])
        assert [r.job.task_id for r in buffered] == ids[3:6]
        buffered[1].check = True  # ids[4]: to be looked up before it is placed
        await d.standbys.step()
        await settle(d)
        # two busy slots, but only ids[3] is bound: ids[5] would start before ids[4]
        assert sorted(_next_of(w).values()) == [ids[3]]
        assert [r.job.task_id for r in d.handoffs.buffer._jobs["default"]] == ids[4:6]

    run(w, w.settings(["g0"]), body)


def test_the_callback_that_promotes_a_standby_binds_the_next_one_in_its_own_transaction(
    world: World,  # noqa: F811
) -> None:
    # Bound by a round instead, the next standby waited for the promotion's COMMIT, then for a round and its
    # transaction: on a loaded machine 9-26 % of 100 ms jobs found no standby when their holder ended.
    w = world

    async def body(d: Dispatcher) -> None:
        ids, nxt = await _bound(w, d)  # ids[3], ids[4] standbys of ids[1], ids[2]; ids[5] buffered
        standby = nxt[ids[1]]
        assert await finish(d, ids[1]) == "applied"
        # no round ran: the callback's transaction promoted the standby and bound ids[5] behind it
        assert _next_of(w).get(standby) == ids[5]
        assert w.state(ids[5]) == "standby"
        assert ids[5] not in [r.job.task_id for r in d.handoffs.buffer._jobs.get("default", [])]
        assert d.standbys.holds(ids[5])
        # and when that standby's own callback comes, ids[5] is sent before its transaction, as any standby
        await settle(d)
        assert await finish(d, standby) == "applied"
        await settle(d)
        assert ids[5] in w.received()
        assert w.state(ids[5]) == "processing"

    run(w, w.settings(["g0"]), body)


def test_a_standby_the_database_retried_before_the_owner_sent_it_is_acknowledged_not_rebuffered(
    world: World,  # noqa: F811
) -> None:
    # With the database out for seconds, the owner could neither send a promoted standby nor learn of it; its
    # lease ran out and the retry went back to Redis (`queued`, attempt 1). The owner's look then took that
    # `queued` for its own take-back and gave the stale first copy to the buffer, where one pass met it with the
    # retry and dropped both: the task stayed `queued` for good (a kill test with standbys on).
    w = world

    async def body(d: Dispatcher) -> None:
        ids, nxt = await _bound(w, d)
        standby = nxt[ids[2]]
        now = d.now()
        assert end_attempt(w.engine, ids[2], now=now).code == "applied"  # promoted elsewhere
        later = now + timedelta(days=1)  # its lease has run out
        assert end_attempt(w.engine, standby, outcome=Outcome.EXPIRED, now=later).state == "retrying"
        (retry,) = transaction(w.engine, due_deferred, now=later + timedelta(seconds=1))
        w.rds.rpush(queue_key(w.queue, retry.priority), retry.to_redis())  # as requeue_due does: Redis first
        transaction(w.engine, mark_queued, jobs=[retry], now=later)
        assert (w.state(standby), retry.attempt) == ("queued", 1)
        d.standbys._looked = 0.0
        await d.standbys.step()
        await settle(d)
        # the first copy is acknowledged: neither sent, nor held, nor buffered, nor in the processing list
        assert not _sent(d, standby) and not d.standbys.holds(standby)
        assert standby not in [r.job.task_id for r in d.handoffs.buffer._jobs.get("default", [])]
        assert all(standby not in el for el in w.processing_list(d))
        # and the retry, taken from Redis, runs when a slot frees
        assert await finish(d, ids[1]) == "applied"
        await run_until_idle(d)
        assert (w.state(standby), w.rows()[standby].attempt) == ("processing", 2)

    run(w, w.settings(["g0"]), body)


def test_a_drain_takes_back_a_standby_that_a_batch_in_flight_bound_after_its_first_take_back(
    world: World,  # noqa: F811
) -> None:
    # The drain takes standbys back first; a group commit already past its take of the next job commits after
    # that and binds it. Left bound, it would run only after a lease once this process is gone (an outside
    # review). The drain's loop takes it back too.
    w = world

    async def body(d: Dispatcher) -> None:
        ids, _ = await _bound(w, d)  # ids[3], ids[4] standbys of ids[1], ids[2]; ids[5] buffered
        go, entered = _hold_hand_offs(d)
        callback = asyncio.ensure_future(finish(d, ids[1]))
        await entered.wait()  # the batch took ids[5] to bind it next, its transaction not yet run
        drain = asyncio.ensure_future(d.drain(grace=2.0))
        for _ in range(500):  # until the drain's first take-back is done: ids[4] queued again
            if w.state(ids[4]) == "queued":
                break
            await asyncio.sleep(0.02)
        assert w.state(ids[4]) == "queued"
        go.set()
        assert await callback == "applied"
        await drain
        # ids[5] was bound by that batch, then taken back by the drain: waiting, on no slot
        assert w.state(ids[5]) == "queued"
        assert ids[5] not in _next_of(w).values()
        assert not d.standbys.holds(ids[5])

    run(w, w.settings(["g0"]), body)


def test_a_stop_takes_back_a_standby_that_a_batch_in_flight_bound_after_its_first_take_back(
    world: World,  # noqa: F811
) -> None:
    # As the drain above, for a stop: its first take-back comes before it waits for the requests and batches
    # in flight; a batch that binds the next standby after that must not leave it bound once we are gone.
    w = world
    seen: dict[str, Any] = {}

    async def body(d: Dispatcher) -> None:
        ids, _ = await _bound(w, d)  # ids[3], ids[4] standbys of ids[1], ids[2]; ids[5] buffered
        go, entered = _hold_hand_offs(d)

        async def release_after_first_take_back() -> None:
            for _ in range(500):  # until the stop's first take-back is done: ids[4] queued again
                if w.state(ids[4]) == "queued":
                    break
                await asyncio.sleep(0.02)
            seen["first"] = w.state(ids[4])
            go.set()
            seen["callback"] = await seen["future"]

        seen["future"] = asyncio.ensure_future(finish(d, ids[1]))
        await entered.wait()  # the batch took ids[5] to bind it next, its transaction not yet run
        seen["release"] = asyncio.ensure_future(release_after_first_take_back())
        seen["ids"], seen["d"] = ids, d
        # returning stops the dispatcher (in_process) while the batch waits

    run(w, w.settings(["g0"]), body)
    ids, d = seen["ids"], seen["d"]
    assert seen["first"] == "queued"
    assert seen["callback"] == "applied"
    # ids[5] was bound by that batch, then taken back by the stop: waiting, on no slot, its job in Redis
    assert w.state(ids[5]) == "queued"
    assert ids[5] not in _next_of(w).values()
    assert not d.standbys.holds(ids[5])
    lists = [k for k in w.rds.scan_iter(f"{w.prefix}*") if w.rds.type(k) in (b"list", "list")]
    assert sum(ids[5] in str(el) for k in lists for el in w.rds.lrange(k, 0, -1)) == 1


@pytest.mark.parametrize("room", ["enough", "none"])
def test_the_next_standby_is_bound_in_the_batch_only_within_what_its_results_leave_of_a_statement(
    world: World,  # noqa: F811
    room: str,
) -> None:
    # The next standby's data goes out in the group commit's own statement, with the batch's results: past
    # what a statement takes, MariaDB drops the connection and every callback of the batch fails. With no
    # room left the job waits in the buffer for a round (its own transaction), bound all the same.
    w = world

    async def body(d: Dispatcher) -> None:
        ids, nxt = await _bound(w, d)  # ids[3], ids[4] standbys of ids[1], ids[2]; ids[5] buffered
        result = "x" * 1400
        if room == "none":
            d.rt.limits = dataclasses.replace(d.rt.limits, batch_bytes=1500)  # 1400 of results: ~100 left
        fin = await d.ends.end_attempt(ids[1], 1, Outcome.FINISHED, result=result, reported="finished")
        assert fin.code == "applied"
        assert w.state(nxt[ids[1]]) == "processing"  # ids[1]'s standby took its slot either way
        if room == "enough":
            assert _next_of(w).get(nxt[ids[1]]) == ids[5]  # bound in that very batch
        else:
            assert ids[5] not in _next_of(w).values()
            assert w.state(ids[5]) is None  # still only buffered: no row yet
            await d.standbys.step()  # a round binds it, in a transaction of its own
            await settle(d)
            assert _next_of(w).get(nxt[ids[1]]) == ids[5]
        assert w.state(ids[5]) == "standby"

    run(w, w.settings(["g0"]), body)


def test_a_batch_cancelled_in_its_transaction_gives_its_next_standby_back(world: World) -> None:  # noqa: F811
    # A stop cancels a group-commit batch while its transaction (which binds the next standby of the slot its
    # early standby takes) is out. Left lent, that job held its pool's younger jobs back from every pass.
    w = world

    async def body(d: Dispatcher) -> None:
        ids, _nxt = await _bound(w, d)
        entered = asyncio.Event()

        async def cancelled(*args: Any, **kwargs: Any) -> Any:
            assert [n.ready.job.task_id for n in kwargs["nexts"]] == [ids[5]]  # it was taken as the next one
            entered.set()
            raise asyncio.CancelledError

        d.handoffs._hand_off = cancelled  # type: ignore[method-assign]
        holder = asyncio.create_task(finish(d, ids[1]))
        await entered.wait()
        await asyncio.sleep(0)  # the batch's handlers run
        buffer = d.handoffs.buffer
        assert not any(buffer.lent(p) for p in buffer.pools() or ["default"])
        assert not any(buffer.held_outside_a_pass(p) for p in buffer.pools() or ["default"])
        back = [r for r in buffer.drain() if r.job.task_id == ids[5]]
        assert back, "the next standby is neither lent nor back in the buffer"
        assert back[0].check  # the transaction may have bound it: looked up before it is placed
        assert not [el for el in d.handoffs.in_flight if ids[5] in el]  # not counted as out with a batch
        holder.cancel()

    run(w, w.settings(["g0"]), body)


def test_a_next_standby_takes_no_more_than_half_a_statement(world: World) -> None:  # noqa: F811
    # The next standbys' data goes out in the batch's query with the hand-off's candidates, which
    # ``place_fresh`` bounds at half a statement (escaping may double it). A budget of their own let large
    # bindings push the candidates off the one query onto ``dispatch``; past half, no next standby is taken
    # (a round binds the slot after the COMMIT).
    w = world

    async def body(d: Dispatcher) -> None:
        ids, _nxt = await _bound(w, d)
        element = next(el for el in d.handoffs.buffer.elements() if ids[5] in el)  # buffered
        seen: list[list[str]] = []
        hand_off = d.handoffs._hand_off

        async def watching(*args: Any, **kwargs: Any) -> Any:
            seen.append([n.ready.job.task_id for n in kwargs["nexts"]])
            return await hand_off(*args, **kwargs)

        d.handoffs._hand_off = watching  # type: ignore[method-assign]
        # the whole statement holds the job, half of it does not
        d.rt.limits = dataclasses.replace(d.rt.limits, batch_bytes=2 * len(element) - 2)
        assert await finish(d, ids[1]) == "applied"
        assert seen == [[]]

    run(w, w.settings(["g0"]), body)
