"""How a slot is freed: given to its standby job when it has one (``db/standby.py``, ``docs/standby.md``).

Every statement that frees a slot uses ``PROMOTE_SETS`` and is followed, in the same transaction, by
``promote_tasks``'s statement; a slot with a standby thus never passes through "free", whoever frees it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, TextClause, bindparam, text

from dispatcher.db.schema import Timestamp

#: The lease of a standby promoted by a caller that was not told its dispatchers' TASK_TIMEOUT_SECONDS
#: (tests, tools): the setting's default.
DEFAULT_LEASE_SECONDS = 900.0

#: The SET clause of every statement that frees a slot: the slot's standby, if any, takes it (with a lease
#: from ``:now`` to ``:lease``); otherwise it is free. MariaDB assigns left to right, each expression seeing
#: the columns assigned before it, SQLite from the old row: ``next_*`` are read before they are cleared, last,
#: so both give the same row.
PROMOTE_SETS = (
    "task_id = next_task_id, attempt = next_attempt, dispatcher_id = next_dispatcher_id,"
    " claimed_at = CASE WHEN next_task_id IS NULL THEN NULL ELSE :now END,"
    " lease_expires_at = CASE WHEN next_task_id IS NULL THEN NULL ELSE :lease END,"
    " next_task_id = NULL, next_attempt = NULL, next_dispatcher_id = NULL"
)

#: After a free, in the same transaction: a standby row whose slot now holds it is ``processing`` (the seed's
#: load query counts exactly those). A cancelled standby stays cancelled: it holds its slot like any cancelled
#: running task until the GPU's word or its lease (``db/cancels.py``). SQLite's: it reads every standby row.
PROMOTE_TASKS = text(
    "UPDATE tasks SET state = 'processing', started_at = :now, updated_at = :now"
    " WHERE state = 'standby' AND EXISTS (SELECT 1 FROM slots s"
    " WHERE s.task_id = tasks.task_id AND s.attempt = tasks.attempt)"
).bindparams(bindparam("now", type_=Timestamp))

#: The same on MySQL/MariaDB, from the slots this transaction's free gave to their standbys: their lease is
#: ``:lease`` exactly (``PROMOTE_SETS``), found through ``idx_slots_lease``. No standby held a slot before the
#: free (each free is followed by this, in its transaction), so these are all there are to promote. Looking at
#: every standby row (``PROMOTE_TASKS``) was MariaDB's largest statement in the efficiency run: 20 % of its
#: query time, ~400 index entries read per free (the state index's entries of rows long promoted, not yet
#: purged, count too); in the 1,024-slot fleet ~1,000.
#: The join order is forced, slots first, through that index: left to itself, MariaDB 10.11 starts from the
#: tasks' state index once more slots carry the lease than there are standby rows (a hand-off's claims carry
#: it too), X-locking standby rows that other dispatchers' frees are about to promote: two such transactions
#: deadlocked where the statement that read every standby only waited (an outside review's reproduction).
PROMOTE_TASKS_JOINED = text(
    "UPDATE slots s FORCE INDEX (idx_slots_lease) STRAIGHT_JOIN tasks t"
    " ON t.task_id = s.task_id AND t.attempt = s.attempt"
    " SET t.state = 'processing', t.started_at = :now, t.updated_at = :now"
    " WHERE s.lease_expires_at = :lease AND t.state = 'standby'"
).bindparams(bindparam("now", type_=Timestamp), bindparam("lease", type_=Timestamp))


def promote_params(now: datetime, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> dict[str, Any]:
    """The parameters of ``PROMOTE_SETS``: a standby promoted at ``now`` holds its slot for a full lease."""
    return {"now": now, "lease": now + timedelta(seconds=lease_seconds)}


def promote_tasks(conn: Connection, params: dict[str, Any]) -> tuple[TextClause, dict[str, Any]]:
    """The statement that follows a free made with ``params`` (``promote_params``), for this connection's
    database, and its parameters."""
    joined = conn.dialect.name in ("mysql", "mariadb")
    return (PROMOTE_TASKS_JOINED, params) if joined else (PROMOTE_TASKS, {"now": params["now"]})
