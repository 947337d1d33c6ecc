"""Retrying and scheduled tasks wait in the database, not in Redis: here they come back when their time has.

An attempt that failed with attempts left (``attempts.py``) or a job with ``not_before`` (``dispatch.py``)
leaves the task ``retrying`` or ``scheduled`` with a ``run_after``. Housekeeping reads the due ones as jobs
(``due_deferred``), pushes them back into Redis, and only then marks them ``queued`` (``mark_queued``), so a
crash in between leaves a harmless extra copy in Redis, never a task in neither store.

A dispatcher first claims the due tasks it will push (``claim_due``: their ``run_after`` moves a short while
on), so that only one process says "queued" for them: two dispatchers reading the same due rows each sent the
event, one of them after the task had been placed and finished elsewhere (an outside review). A claimer that
dies before ``mark_queued`` leaves the tasks due again when the claim runs out.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from sqlalchemy import Connection, Update, select, update

from dispatcher.db.attempts import clip_text
from dispatcher.db.schema import tasks
from dispatcher.db.task_writes import ended
from dispatcher.states import DEFERRED, TaskState
from producer.job import Job
from producer.keys import Priority


def due_deferred(conn: Connection, *, now: datetime, limit: int = 200) -> list[Job]:
    """Retrying and scheduled tasks whose time has come, as jobs to put back in Redis.

    A task recorded under older, looser rules that no longer makes a valid job (its data too deep, a time
    out of range) fails here with the reason, instead of stopping housekeeping at every tick."""
    rows = conn.execute(
        select(tasks)
        .where(tasks.c.state.in_([s.value for s in DEFERRED]), tasks.c.run_after <= now)
        .order_by(tasks.c.run_after)
        .limit(limit)
    )
    jobs = []
    for r in rows:
        try:
            jobs.append(
                Job(
                    task_id=r.task_id,
                    type=r.type,
                    data=json.loads(r.data),
                    queue=r.queue,
                    priority=Priority(r.priority),
                    attempt=r.attempt,
                    enqueued_at=r.enqueued_at or r.created_at,
                )
            )
        except (ValueError, RecursionError) as exc:  # ValidationError is a ValueError
            conn.execute(
                update(tasks)
                .where(tasks.c.task_id == r.task_id, tasks.c.state.in_([s.value for s in DEFERRED]))
                .values(**ended(TaskState.FAILED, now, clip_text(f"cannot be put back in a queue: {exc}")))
            )
    return jobs


def claim_due(conn: Connection, *, now: datetime, claim: timedelta, limit: int = 200) -> list[Job]:
    """``due_deferred``, keeping only the tasks this call claimed: their ``run_after`` moved to ``now +
    claim`` if it was still due (another process's claim, a cancel or a placement in between: not ours).
    One conditional UPDATE per task, so two concurrent callers never both claim one."""
    claimed = []
    for job in due_deferred(conn, now=now, limit=limit):
        res = conn.execute(_still_deferred(job).where(tasks.c.run_after <= now).values(run_after=now + claim))
        if res.rowcount == 1:
            claimed.append(job)
    return claimed


def mark_queued(conn: Connection, *, jobs: list[Job], now: datetime) -> list[str]:
    """Note that these deferred tasks are back in Redis (a no-op for any that a dispatcher took already, or
    that another dispatcher requeued first); the ids this call moved to ``queued`` (for tests).

    A task whose priority an operator changed after the claim read it (``gpuq task priority``: the task
    was still ``retrying``, so the command left Redis alone) stays deferred and due at once: the next claim
    pushes it at its new priority, and of the two copies whichever is taken first runs, the other is dropped
    as a copy. Marked ``queued``, it stayed in the old priority's list while the database said the new one."""
    moved = []
    for job in jobs:
        res = conn.execute(
            _still_deferred(job)
            .where(tasks.c.priority == job.priority.value)
            .values(state=TaskState.QUEUED.value, run_after=None, updated_at=now)
        )
        if res.rowcount == 1:
            moved.append(job.task_id)
        else:
            conn.execute(_still_deferred(job).values(run_after=now))
    return moved


def _still_deferred(job: Job) -> Update:
    """An UPDATE of the job's task row while it still waits in the database at that attempt."""
    return update(tasks).where(
        tasks.c.task_id == job.task_id,
        tasks.c.attempt == job.attempt,
        tasks.c.state.in_([s.value for s in DEFERRED]),
    )
