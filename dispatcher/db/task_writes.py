"""The shapes every write to one task row takes, written once: the guard, the lock and the end.

- ``update_at``: an UPDATE that applies only while the task is still at the attempt (and in the states) the
  writer read. Of two writers racing for one task (two dispatchers placing a copy, a cancel and a callback,
  a dead letter and a placement) exactly one sees ``rowcount == 1``; the other learns it lost.
- ``locked_task``: the task's row read ``FOR UPDATE`` before an operator's change decides on it.
- ``ended``: the columns of a task that ends for good (its final state, when, no more ``run_after``).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Column, Connection, Row, Update, select, update

from dispatcher.db.schema import tasks
from dispatcher.states import TaskState


def update_at(task_id: str, attempt: int, states: Iterable[TaskState]) -> Update:
    """UPDATE ``task_id`` only while it is at ``attempt`` in one of ``states`` (add ``.values(...)``)."""
    return update(tasks).where(
        tasks.c.task_id == task_id,
        tasks.c.attempt == attempt,
        tasks.c.state.in_([s.value for s in states]),
    )


def locked_task(conn: Connection, task_id: str, *columns: Column[Any]) -> Row[Any] | None:
    """``columns`` of ``task_id``'s row, locked until the transaction ends; None for an unknown task."""
    return conn.execute(select(*columns).where(tasks.c.task_id == task_id).with_for_update()).first()


def ended(state: TaskState, now: datetime, error: str | None = None) -> dict[str, Any]:
    """The values of a task ending ``state`` at ``now``; ``error`` (already clipped) replaces the last one
    when given, otherwise the task keeps what its attempts said."""
    values: dict[str, Any] = {"state": state.value, "finished_at": now, "updated_at": now, "run_after": None}
    if error is not None:
        values["error"] = error
    return values
