"""Cancelling a running task: the task ends at once, its slot is given back only when the GPU has stopped.

A cancelled attempt whose GPU has not yet confirmed the stop keeps its slot row (``slots.task_id`` and
``slots.attempt`` still name it) while ``tasks.state`` is already ``cancelled``. Such a row is a *pending
cancel*: the slot is busy for placement (``/gpus`` ``busy``, the snapshot), but the seed's GPU-load query,
which counts ``processing`` tasks, no longer counts it (see the ``gpu_slots`` operator query for the
slots' view). It is given back by ``release_cancelled`` and only there, when one of these shows the GPU is
no longer running the attempt:

- a 2xx answer to ``POST <GPU url>/cancel``;
- a final callback or a final answer to the job's own request for that attempt (answered 409, as for any
  attempt no longer current);
- the lease running out (nothing renews it any more: a heartbeat for a cancelled attempt is refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, bindparam, select, text

from dispatcher.db.engine import utcnow
from dispatcher.db.promote import DEFAULT_LEASE_SECONDS
from dispatcher.db.schema import Timestamp, gpus, slots, tasks
from dispatcher.db.snapshot import free_slot
from dispatcher.db.task_writes import ended, locked_task, update_at
from dispatcher.states import Outcome, TaskState

_HISTORY = text(
    "INSERT INTO attempts (task_id, attempt, gpu_id, slot_index, started_at, ended_at, outcome, error)"
    " SELECT task_id, attempt, gpu_id, slot_index, started_at, :now, :outcome, :error"
    " FROM tasks WHERE task_id = :task_id"
).bindparams(bindparam("now", type_=Timestamp))


@dataclass(frozen=True, slots=True)
class PendingCancel:
    task_id: str
    attempt: int
    gpu_id: str
    url: str
    dispatcher_id: str | None  # the dispatcher that sent the attempt
    cancel_url: str | None = None  # where the GPU takes cancels, when not at <url>/cancel


def cancel_running(conn: Connection, *, task_id: str, attempt: int, now: datetime, error: str) -> bool:
    """End ``attempt`` for the user (``cancelled``, an ``attempts`` row) and keep its slot held until the GPU
    confirms; False when the attempt was no longer running."""
    res = conn.execute(
        update_at(task_id, attempt, [TaskState.PROCESSING]).values(**ended(TaskState.CANCELLED, now, error))
    )
    if res.rowcount != 1:
        return False
    params = {"task_id": task_id, "now": now, "outcome": Outcome.CANCELLED.value, "error": error}
    conn.execute(_HISTORY, params)
    return True


def release_cancelled(
    conn: Connection,
    *,
    task_id: str,
    attempt: int,
    lease_ended_by: datetime | None = None,
    now: datetime | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> bool:
    """Give back the slot a cancelled ``attempt`` still holds, now that its GPU has stopped it: the one
    place a pending cancel ends. True when this call freed it (False: not held, or the task runs again).

    ``lease_ended_by``: the stop is inferred from the lease, not reported by the GPU, so the slot is given
    back only if its lease still ended before that time. A sweep reads expired leases first and ends them
    later; a heartbeat may renew the lease in between and the task be cancelled after it: the GPU is then
    still at work on the attempt, and its slot must wait for the renewed lease or the GPU's word."""
    row = locked_task(conn, task_id, tasks.c.state, tasks.c.attempt)
    if row is None or (row.state == TaskState.PROCESSING.value and row.attempt == attempt):
        return False  # the attempt is current: only finish_attempt may end it
    if lease_ended_by is not None:
        lease = conn.execute(
            select(slots.c.lease_expires_at).where(slots.c.task_id == task_id, slots.c.attempt == attempt)
        ).scalar_one_or_none()
        if lease is None or lease >= lease_ended_by:
            return False
    now = utcnow() if now is None else now
    return free_slot(conn, task_id=task_id, attempt=attempt, now=now, lease_seconds=lease_seconds)


def pending_cancels(conn: Connection) -> list[PendingCancel]:
    """Cancelled attempts whose slot is still held (their GPU has not confirmed the stop)."""
    rows = conn.execute(
        select(
            slots.c.task_id,
            slots.c.attempt,
            slots.c.gpu_id,
            gpus.c.url,
            slots.c.dispatcher_id,
            gpus.c.cancel_url,
        )
        .select_from(
            slots.join(tasks, tasks.c.task_id == slots.c.task_id).join(gpus, gpus.c.gpu_id == slots.c.gpu_id)
        )
        .where(
            tasks.c.state == TaskState.CANCELLED.value,
            tasks.c.attempt == slots.c.attempt,
        )
        .limit(500)
    )
    return [PendingCancel(r.task_id, r.attempt, r.gpu_id, r.url, r.dispatcher_id, r.cancel_url) for r in rows]
