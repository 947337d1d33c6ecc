"""Tasks whose job was dead-lettered while the database counted on it being in Redis.

A task is ``queued`` while its job waits in Redis, and the database keeps no copy of the job's place: a retry
or a scheduled task that housekeeping put back there (``due_deferred``, ``mark_queued``). When a dispatcher
then refuses that job (a rule of ``producer/job.py`` it breaks under today's settings, say MAX_JOB_BYTES
lowered since the task was accepted) the job goes to the dead-letter list, and no one would ever take the
task: it stayed ``queued`` forever. It ends ``failed`` instead, its error saying why.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection

from dispatcher.db.attempts import clip_text
from dispatcher.db.task_writes import ended, update_at
from dispatcher.states import TaskState


def fail_dead_lettered(conn: Connection, *, items: list[tuple[str, int, str]], now: datetime) -> list[str]:
    """``items``: (task id, attempt, reason) of dead-lettered jobs. A task waiting ``queued`` at that very
    attempt (its job was the one refused) ends ``failed``; any other task is left alone: running, deferred
    (its job is in the database) or ended, the dead copy was not the one it waits for. Returns the ids
    failed here."""
    failed = []
    for task_id, attempt, why in items:
        failure = ended(TaskState.FAILED, now, clip_text(f"dead-lettered: {why}"))
        res = conn.execute(update_at(task_id, attempt, [TaskState.QUEUED]).values(**failure))
        if res.rowcount == 1:
            failed.append(task_id)
    return failed
