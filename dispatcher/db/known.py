"""A job whose task id the database may already know: a copy of that task's own job, or a new job reusing
its id, and what a dispatcher will make of it.

The dispatch (``dispatch._triage``) decides this for every job it takes; ``gpuq queue requeue`` asks the same
question before it puts a dead letter back on its queue, so that it can tell the operator the truth (the
job will run, be dropped as a copy of a task that ran, or be dead-lettered again) instead of a requeue that
quietly comes to nothing. ``tests/operators/test_dead_requeue.py`` holds ``verdict`` to the dispatch's
answers, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select

from dispatcher.db.engine import naive_utc
from dispatcher.db.schema import tasks
from dispatcher.states import RUNNABLE, TERMINAL
from producer.job import Job, task_id_problem


def data_json(job: Job) -> str:
    """``data`` as the ``tasks`` table stores it (and compares it)."""
    return json.dumps(job.data, separators=(",", ":"))


def copy_of(row: Any, job: Job) -> bool:
    """Is this new-looking job (attempt 0) the very job the task was recorded from? A swept-back copy, a
    scheduled job put back in its queue and a duplicate of it are; a job that reuses the id of a task that
    ran before (its idempotency mark expired) is not: it has its own enqueue time, and maybe its own data.
    A tombstone (cancelled before any dispatcher took it) has no enqueue time: its job is a copy."""
    if row.enqueued_at is None:
        return True
    same_time: bool = row.enqueued_at == naive_utc(job.enqueued_at)
    return same_time and row.type == job.type and row.data == data_json(job)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a dispatcher meeting a job would do instead of running it."""

    outcome: str  # "dropped" (a copy of a task that ran or runs) or "dead-lettered" (refused again)
    reason: str  # the dispatcher's own words
    state: str | None = None  # the known task's state, when there is one


def known_rows(conn: Connection, task_ids: list[str]) -> dict[str, Any]:
    """The rows ``verdict`` reads, of the tasks among ``task_ids`` the database knows."""
    if not task_ids:
        return {}
    rows = conn.execute(
        select(
            tasks.c.task_id, tasks.c.state, tasks.c.attempt, tasks.c.type, tasks.c.data, tasks.c.enqueued_at
        ).where(tasks.c.task_id.in_(task_ids))
    )
    return {r.task_id: r for r in rows}


def verdict(row: Any | None, job: Job) -> Verdict | None:
    """Why a dispatcher taking ``job`` would not run it, given its task's row (None: no such task); None
    when it would run it (or schedule it, for a ``not_before`` in the future). The same rules, in the same
    order, as ``dispatch._triage`` for a job that is not one of the taking dispatcher's own attempts."""
    if row is None:
        if job.attempt > 0 and (problem := task_id_problem(job.task_id)):
            return Verdict(
                "dead-lettered", f"task_id: {problem} (attempt {job.attempt} of a task never recorded)"
            )
        return None
    if job.attempt == 0 and not copy_of(row, job):
        return Verdict(
            "dead-lettered", f"task id already used: task {job.task_id} exists ({row.state})", row.state
        )
    if row.state not in RUNNABLE or row.attempt != job.attempt:
        return Verdict("dropped", f"task is already {row.state} at attempt {row.attempt}", row.state)
    return None


def advice(v: Verdict, task_id: str) -> str:
    """What the operator can do instead, in words."""
    if v.outcome == "dead-lettered":
        return "submit it again under a new task id"
    if v.state in TERMINAL and v.state != "finished":
        return f"`gpuq task retry {task_id}` runs the task again from its stored job"
    return "nothing to do: the task ran or runs"
