"""A cancelled attempt's slot is given back when the GPU says it stopped, or when its lease has run out: the
lease's word must still hold when it is acted on, not only when the sweep read it."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import text

from dispatcher.db.attempts import Backoff, cancel_task, expired_leases
from dispatcher.db.engine import transaction
from dispatcher.loop.core import Dispatcher
from dispatcher.states import Outcome
from dispatcher.testing import settle
from tests.dispatcher.test_handoff import World, run, world  # noqa: F401 - world: a fixture


def _held(w: World, task_id: str) -> int:
    with w.engine.connect() as conn:
        return int(
            conn.execute(text("SELECT COUNT(*) FROM slots WHERE task_id = :id"), {"id": task_id}).scalar_one()
        )


def _expire(w: World, d: Dispatcher, task_id: str) -> None:
    with w.engine.begin() as conn:
        conn.execute(
            text("UPDATE slots SET lease_expires_at = :at WHERE task_id = :id"),
            {"at": d.now() - timedelta(seconds=1), "id": task_id},
        )


async def _one_running(w: World, d: Dispatcher) -> str:
    [t] = w.push(1)
    assert await d.dispatch_once()
    await settle(d)
    assert w.state(t) == "processing"
    return t


def _cancel(w: World, d: Dispatcher, task_id: str) -> None:
    """As the CLI does; the slot stays held (a pending cancel) until the GPU's word or the lease."""
    assert transaction(w.engine, cancel_task, task_id=task_id, now=d.now(), backoff=Backoff()).held


def test_a_lease_renewed_after_the_sweep_read_it_keeps_a_cancelled_attempts_slot(world: World) -> None:  # noqa: F811
    w = world

    async def body(d: Dispatcher) -> None:
        # GIVEN a running task whose lease ran out: the sweep reads it as expired
        t = await _one_running(w, d)
        _expire(w, d, t)
        assert (t, 1) in transaction(w.engine, expired_leases, now=d.now())
        # WHEN the GPU's late heartbeat renews the lease, the user cancels, and then the sweep ends the lease
        assert (await d.ends.heartbeat(t, 1)).code == "applied"
        _cancel(w, d, t)
        await d.ends.end_attempt(t, 1, Outcome.EXPIRED, error="no callback before the lease ran out")
        # THEN the slot stays held: the GPU is still at work and has not confirmed the stop
        assert _held(w, t) == 1
        # and once the renewed lease has run out too, the next sweep gives it back
        _expire(w, d, t)
        await d.ends.end_attempt(t, 1, Outcome.EXPIRED, error="no callback before the lease ran out")
        assert _held(w, t) == 0

    run(w, w.settings(["g0"]), body)


def test_a_cancelled_attempts_final_callback_gives_its_slot_back_at_once(world: World) -> None:  # noqa: F811
    w = world

    async def body(d: Dispatcher) -> None:
        # GIVEN a cancelled running task, its lease far from over
        t = await _one_running(w, d)
        _cancel(w, d, t)
        # WHEN the GPU's final callback for it comes (the GPU's own word that it stopped)
        await d.ends.end_attempt(t, 1, Outcome.FINISHED)
        # THEN the slot is given back without waiting for the lease
        assert _held(w, t) == 0

    run(w, w.settings(["g0"]), body)
