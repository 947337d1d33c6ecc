"""Store side of ``gpuq task priority``: a waiting task's priority column."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import Connection, update

from dispatcher.db.schema import tasks
from dispatcher.db.task_writes import locked_task
from dispatcher.states import RUNNABLE
from producer.keys import Priority


@dataclass(frozen=True, slots=True)
class Reprioritized:
    code: Literal["applied", "unknown", "refused"]
    state: str | None = None
    queue: str | None = None
    previous: str | None = None


def set_priority(conn: Connection, *, task_id: str, priority: Priority, now: datetime) -> Reprioritized:
    """Change the priority of a task that waits (queued, retrying or scheduled).

    A retrying or scheduled task goes back to Redis through ``due_deferred``, which reads this column, so
    the change is all it takes; a queued task's copy in Redis must also be moved
    (``dispatcher.queues.reprioritize``).
    A running or ended task is refused: its priority no longer decides anything.
    """
    row = locked_task(conn, task_id, tasks.c.state, tasks.c.queue, tasks.c.priority)
    if row is None:
        return Reprioritized("unknown")
    if row.state not in RUNNABLE:
        return Reprioritized("refused", row.state, row.queue, row.priority)
    conn.execute(
        update(tasks).where(tasks.c.task_id == task_id).values(priority=priority.value, updated_at=now)
    )
    return Reprioritized("applied", row.state, row.queue, row.priority)
