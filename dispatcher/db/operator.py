"""Store functions only operators call (``gpuq task retry``): putting an ended task back in line."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import ColumnElement, Connection, select, update

from dispatcher.db.schema import slots, tasks
from dispatcher.db.task_writes import locked_task
from dispatcher.states import TaskState

#: States an operator may send back for another try.
RETRIABLE = frozenset({TaskState.FAILED, TaskState.CANCELLED})


@dataclass(frozen=True, slots=True)
class Retried:
    code: Literal["applied", "unknown", "refused"]
    state: str | None = None
    reason: str = ""
    max_attempts: int = 0


def retry_task(conn: Connection, *, task_id: str, now: datetime, extra_attempts: int = 1) -> Retried:
    """Make a failed or cancelled task ``retrying`` now, with ``extra_attempts`` more attempts allowed.

    The dispatchers' housekeeping puts every due ``retrying`` task back in Redis within a fraction of a
    second, exactly as after a backoff; the attempt counter goes on, so callbacks of the old attempts stay
    stale (409) and cannot touch the new one.
    """
    row = locked_task(conn, task_id, tasks.c.state, tasks.c.attempt, tasks.c.max_attempts, tasks.c.type)
    if row is None:
        return Retried("unknown")
    if row.state not in RETRIABLE:
        return Retried("refused", row.state, f"it is {row.state}; only failed or cancelled tasks are retried")
    if not row.type:
        return Retried(
            "refused",
            row.state,
            "it was cancelled before a dispatcher recorded it, so its job was never stored: submit it again",
        )
    if conn.execute(select(slots.c.gpu_id).where(slots.c.task_id == task_id)).first() is not None:
        # A cancel its GPU has not confirmed yet (db/cancels.py): a task holds one slot at most.
        return Retried(
            "refused",
            row.state,
            "its GPU has not confirmed the cancel yet (the slot is still held); try again once it has, "
            "or after the lease (TASK_TIMEOUT_SECONDS)",
        )
    bound = conn.execute(
        select(slots.c.gpu_id, slots.c.slot_index).where(slots.c.next_task_id == task_id)
    ).first()
    if bound is not None:
        # Cancelled as a standby (docs/standby.md): its binding stays until its owner clears it, for the owner
        # may have sent it early. Retried now, it would be placed elsewhere while that slot still passes to
        # it when its job ends: a task on two slots, or a slot given to a task that waits in Redis.
        return Retried(
            "refused",
            row.state,
            f"it is still the standby of slot {bound.slot_index} of GPU {bound.gpu_id} (its dispatcher may"
            " have sent it already); try again once that slot's job has ended and the slot is free, or after"
            " the lease (TASK_TIMEOUT_SECONDS)",
        )
    max_attempts = max(row.max_attempts, row.attempt + max(1, extra_attempts))
    conn.execute(
        update(tasks)
        .where(tasks.c.task_id == task_id)
        .values(
            state=TaskState.RETRYING.value,
            run_after=now,
            finished_at=None,
            max_attempts=max_attempts,
            updated_at=now,
        )
    )
    return Retried("applied", TaskState.RETRYING.value, max_attempts=max_attempts)


def retry_candidates(
    conn: Connection,
    *,
    states: tuple[str, ...],
    since: datetime | None = None,
    gpu_id: str | None = None,
    queue: str | None = None,
    task_type: str | None = None,
    limit: int = 1000,
) -> list[str]:
    """Ids of tasks ``gpuq task retry --state … [--since … --gpu …]`` brings back, oldest end first: in
    ``states`` (failed and/or cancelled), ended at or after ``since``, last placed on ``gpu_id``."""
    conds: list[ColumnElement[bool]] = [tasks.c.state.in_(states)]
    if since is not None:
        conds.append(tasks.c.finished_at >= since)
    for column, value in ((tasks.c.gpu_id, gpu_id), (tasks.c.queue, queue), (tasks.c.type, task_type)):
        if value is not None:
            conds.append(column == value)
    rows = conn.execute(
        select(tasks.c.task_id).where(*conds).order_by(tasks.c.finished_at, tasks.c.task_id).limit(limit)
    )
    return list(rows.scalars())
