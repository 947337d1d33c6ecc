"""A second outside review of standby jobs, attacking the first review's fixes: each test states a guarantee
that failed before its fix (store errors while a standby is settled, a GPU taken down during a GPU look)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from sqlalchemy import text

from dispatcher.db.attempts import Backoff, cancel_task, slot_drift
from dispatcher.db.cancels import release_cancelled
from dispatcher.db.engine import StoreUnavailable, transaction
from dispatcher.db.gpus import set_gpu_state
from dispatcher.db.operator import retry_task
from dispatcher.db.standby import eligible_slots
from dispatcher.loop.core import Dispatcher
from dispatcher.states import GpuState
from dispatcher.testing import settle
from tests.dispatcher.helpers import add_gpu, end_attempt
from tests.dispatcher.test_handoff import World, finish, run, world  # noqa: F401 - world: a fixture
from tests.dispatcher.test_standby_loop import _bound


def _gpu_of_post(w: World, task_id: str) -> list[Any]:
    return [j for j in w.fleet.stats()["jobs"] if j["task_id"] == task_id]


# -- A. a promoted standby given back to the buffer by a failed _settle is POSTed by the "mine" path --------


def test_a_promoted_standby_given_back_by_a_failed_settle_is_not_sent_to_its_drained_gpu(
    world: World,  # noqa: F811
) -> None:
    w = world

    async def body(d: Dispatcher) -> None:
        ids, nxt = await _bound(w, d)
        holder = ids[1]
        standby = nxt[holder]
        # an operator drains g0 (another process); the holder's callback reaches another dispatcher: the
        # standby is promoted on the drained GPU, not sent
        transaction(w.engine, set_gpu_state, gpu_id="g0", state=GpuState.DRAINING, now=d.now())
        assert end_attempt(w.engine, holder, now=d.now()).code == "applied"
        assert w.state(standby) == "processing"
        real_db = d.rt.db
        calls = 0

        async def db(fn: Any, /, **kw: Any) -> Any:
            nonlocal calls
            if fn is eligible_slots:
                calls += 1
                if calls == 2:  # _settle's eligibility read of the promoted one: the database blinks
                    raise StoreUnavailable("database down for a moment")
            return await real_db(fn, **kw)

        d.rt.db = db  # type: ignore[method-assign]
        d.standbys._gpus_looked = 0.0
        d.standbys._looked = time.monotonic()
        with contextlib.suppress(StoreUnavailable):
            await d.standbys.step()  # run() logs it and retries
        d.rt.db = real_db  # type: ignore[method-assign]
        await settle(d)
        # room elsewhere: the next pass takes the buffer's oldest jobs
        add_gpu(w.engine, "g1", 2, url=w.fleet.url("g1"), now=d.now())
        d.slot_freed()
        await d.dispatch_once()
        await settle(d)
        await d.standbys.step()
        await settle(d)
        posts = _gpu_of_post(w, standby)
        row = w.rows()[standby]
        assert not (posts and row.gpu_id == "g0"), (
            f"standby {standby} was POSTed to the drained GPU g0 ({row.state}, attempt {row.attempt}): {posts}"
        )

    run(w, w.settings(["g0"]), body)


# -- B. a refund that fails: the standby is both acknowledged and back in the buffer, then POSTed ----------


async def _refund_fails(w: World, d: Dispatcher) -> str:
    """g0 drained by an operator, a standby promoted there by another process; the owner's look refunds it
    (GPU_REFUSED), and that end fails (the database down for a moment). Returns the standby."""
    ids, nxt = await _bound(w, d)
    holder = ids[1]
    standby = nxt[holder]
    transaction(w.engine, set_gpu_state, gpu_id="g0", state=GpuState.DRAINING, now=d.now())
    assert end_attempt(w.engine, holder, now=d.now()).code == "applied"  # promoted elsewhere
    end_many = d.handoffs.end_many

    async def failing(items: list[dict[str, Any]]) -> Any:
        raise StoreUnavailable("database down for a moment")

    d.ends.hand_off_with(failing)
    d.standbys._gpus_looked = time.monotonic()
    d.standbys._looked = 0.0
    with contextlib.suppress(StoreUnavailable):
        await d.standbys.step()  # _look -> _settle -> _refund -> raises
    d.ends.hand_off_with(end_many)
    return standby


def test_a_failed_refund_neither_acks_and_rebuffers_nor_sends_to_the_drained_gpu(world: World) -> None:  # noqa: F811
    w = world

    async def body(d: Dispatcher) -> None:
        standby = await _refund_fails(w, d)
        buffered = [r.job.task_id for r in d.handoffs.buffer.drain()]
        pending_ack = standby in "".join(d.handoffs._pending.ack) or any(
            standby in el for el in d.handoffs.in_flight
        )
        # put the buffer back as it was for the rest of the test
        await settle(d)
        acked = all(standby not in el for el in w.processing_list(d))
        assert not (standby in buffered and (acked or pending_ack)), (
            f"standby {standby} is acknowledged in Redis and back in the buffer at once"
        )

    run(w, w.settings(["g0"]), body)


def test_a_failed_refund_does_not_end_up_posted_to_the_drained_gpu(world: World) -> None:  # noqa: F811
    w = world

    async def body(d: Dispatcher) -> None:
        standby = await _refund_fails(w, d)
        await settle(d)
        add_gpu(w.engine, "g1", 2, url=w.fleet.url("g1"), now=d.now())
        d.slot_freed()
        await d.dispatch_once()
        await settle(d)
        posts = _gpu_of_post(w, standby)
        row = w.rows()[standby]
        assert not (posts and row.gpu_id == "g0"), (
            f"standby {standby} was POSTed to the drained GPU g0 ({row.state}, attempt {row.attempt}): {posts}"
        )

    run(w, w.settings(["g0"]), body)


# -- C. a GPU this process takes out of rotation while a GPU look reads: the look forgets it ---------------


def test_gpu_down_during_the_gpu_look_is_not_forgotten(world: World) -> None:  # noqa: F811
    w = world

    async def body(d: Dispatcher) -> None:
        ids, nxt = await _bound(w, d)
        holder = ids[1]
        standby = nxt[holder]
        real_db = d.rt.db

        async def db(fn: Any, /, **kw: Any) -> Any:
            out = await real_db(fn, **kw)
            if fn is eligible_slots:
                # while the look's read was on its way, a failed request here took g0 out of rotation
                # (record_failure committed after the read): GpuRequests._judge calls gpu_down
                with w.engine.begin() as conn:
                    from sqlalchemy import text

                    conn.execute(text("UPDATE gpus SET healthy = 0 WHERE gpu_id = 'g0'"))
                d.requests.gpu_down("g0")
            return out

        d.rt.db = db  # type: ignore[method-assign]
        d.standbys._gpus_looked = 0.0
        d.standbys._looked = time.monotonic()
        await d.standbys.step()
        d.rt.db = real_db  # type: ignore[method-assign]
        # the holder's callback comes right after (before the next GPU look)
        assert await finish(d, holder) == "applied"
        await settle(d)
        assert standby not in w.received(), "a standby was sent early to a GPU this process just took down"

    run(w, w.settings(["g0"]), body)


# -- C. a cancelled standby still bound is retried (a third review) ------------------------------------------


def test_a_cancelled_standby_still_bound_to_a_slot_is_not_retried(world: World) -> None:  # noqa: F811
    # Its owner is dead (kill -9) or has not looked yet: the binding stays on the holder's slot (the owner may
    # have sent it early). Retried then, the job was placed on another GPU and the holder's end gave the old
    # slot to the same task (a duplicate key: every end of that holder failed) or to a task waiting in Redis.
    w = world

    async def body(d: Dispatcher) -> None:
        ids, nxt = await _bound(w, d)
        holder = ids[1]
        standby = nxt[holder]
        # the owner does not look again from here on (no d.standbys.step())
        assert (
            transaction(w.engine, cancel_task, task_id=standby, now=d.now(), backoff=Backoff()).code
            == "applied"
        )
        refused = transaction(w.engine, retry_task, task_id=standby, now=d.now())
        assert refused.code == "refused" and "standby of slot" in (refused.reason or ""), refused
        assert w.state(standby) == "cancelled"
        # the holder ends elsewhere: the slot passes to the cancelled standby, the tables agree
        assert end_attempt(w.engine, holder, now=d.now()).code == "applied"
        with w.engine.connect() as conn:
            assert slot_drift(conn) == []
        # once that slot is free again (the GPU confirmed the cancel), the retry goes through
        assert transaction(w.engine, release_cancelled, task_id=standby, attempt=1, now=d.now())
        with w.engine.connect() as conn:
            held = conn.execute(
                text("SELECT COUNT(*) FROM slots WHERE task_id = :t OR next_task_id = :t"), {"t": standby}
            ).scalar()
        assert held == 0
        assert transaction(w.engine, retry_task, task_id=standby, now=d.now()).code == "applied"

    run(w, w.settings(["g0"]), body)


# -- C. a cancel overtakes a promoted standby its owner is about to send --------------------------------------


def test_a_cancel_does_not_overtake_a_promoted_standby_its_owner_is_about_to_send(world: World) -> None:  # noqa: F811
    """An outside trial (3 dispatchers, cancels of every running and standby task): a standby promoted by
    another process's end was cancelled while its owner read whether its GPU could still take it. The owner's
    cancel sender saw no request of its on the way and sent the GPU's cancel: "not running", so the slot was
    freed and given to the next job; then the owner POSTed the standby: 5 and 6 jobs on 4-slot GPUs."""
    w = world

    def held(task_id: str) -> int:
        with w.engine.connect() as conn:
            return int(
                conn.execute(text("SELECT COUNT(*) FROM slots WHERE task_id = :t"), {"t": task_id}).scalar()
            )

    async def body(d: Dispatcher) -> None:
        ids, nxt = await _bound(w, d)
        holder = ids[1]
        standby = nxt[holder]
        # GIVEN the holder's callback reached another dispatcher: the standby is promoted there, not sent yet
        assert end_attempt(w.engine, holder, now=d.now()).code == "applied"
        assert w.state(standby) == "processing"
        real_db = d.rt.db
        while_deciding: list[int] = []

        async def db(fn: Any, /, **kw: Any) -> Any:
            if fn is eligible_slots and not while_deciding:
                # WHEN the user cancels it while its owner reads whether its GPU may still have it, and the
                # owner's cancel sender looks meanwhile
                transaction(w.engine, cancel_task, task_id=standby, now=d.now(), backoff=Backoff())
                await d.cancels.scan()
                await settle(d)
                while_deciding.append(held(standby))
            return await real_db(fn, **kw)

        d.rt.db = db  # type: ignore[method-assign]
        d.standbys._gpus_looked = time.monotonic()  # the GPU look is not what this is about
        d.standbys._looked = 0.0
        await d.standbys.step()
        d.rt.db = real_db  # type: ignore[method-assign]
        await settle(d)
        # THEN the GPU's cancel waited: the slot stayed the standby's while it had not gone out
        assert while_deciding == [1], "the cancel overtook the standby: its slot was freed before it was sent"
        assert standby in w.received()
        # AND once the standby's request was answered, the cancel went: the GPU stopped it, the slot is free
        await d.cancels.scan()
        await settle(d)
        assert held(standby) == 0
        assert w.state(standby) == "cancelled"

    run(w, w.settings(["g0"]), body)
