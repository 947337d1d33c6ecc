"""A GPU request this process could not send (out of file descriptors) uses no attempt and blames no GPU.

Found by an outside attack at ``ulimit -n 256`` with 200 GPUs: such requests counted as failed attempts, so
tasks ended ``failed`` after three tries that never reached a GPU."""

from __future__ import annotations

import uuid

from sqlalchemy import text

from dispatcher.db.dispatch import dispatch
from dispatcher.db.engine import transaction, utcnow
from dispatcher.gpus.gpu_client import Answer, Verdict
from dispatcher.loop.core import Dispatcher
from producer.job import Job
from tests.dispatcher.test_handoff import World, run, world  # noqa: F401 - the fixture, shared


def test_a_request_not_sent_for_our_own_limits_waits_again_without_using_an_attempt(world: World) -> None:  # noqa: F811
    w = world
    job = Job(task_id=f"n-{uuid.uuid4().hex[:8]}", type="t", queue=w.queue, data={})
    task_id = job.task_id

    async def body(d: Dispatcher) -> None:
        # GIVEN the job placed on g0, at its only attempt (MAX_ATTEMPTS=1)
        res = transaction(
            d.engine,
            dispatch,
            items=[(job, "default")],
            dispatcher_id=d.settings.dispatcher_id,
            lease_seconds=60,
            max_attempts=1,
            now=utcnow(),
        )
        (placed,) = res.placed
        # WHEN its request could not be sent: this process was out of file descriptors
        answer = Answer(Verdict.NOT_SENT, error="not sent: [Errno 24] Too many open files", unhealthy=False)
        await d.requests._judge(placed, answer)

    run(w, w.settings(["g0"], max_attempts=1), body)
    # THEN the task waits again with its attempt given back, its slot freed, and g0 still in rotation
    with w.engine.connect() as conn:
        state, max_attempts, run_after, updated_at = conn.execute(
            text("SELECT state, max_attempts, run_after, updated_at FROM tasks WHERE task_id = :t"),
            {"t": task_id},
        ).one()
        outcome = conn.execute(
            text("SELECT outcome FROM attempts WHERE task_id = :t"), {"t": task_id}
        ).scalar()
        healthy, failures = conn.execute(
            text("SELECT healthy, consecutive_failures FROM gpus WHERE gpu_id = 'g0'")
        ).one()
        held = conn.execute(text("SELECT COUNT(*) FROM slots WHERE task_id IS NOT NULL")).scalar()
    assert (state, max_attempts, held, outcome) == ("retrying", 2, 0, "not_sent")
    # and not due again at once (as a GPU's refusal is): nothing bounds these rounds but the backoff
    assert run_after > updated_at
    assert (bool(healthy), failures) == (True, 0)
