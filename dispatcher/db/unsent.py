"""What a dispatcher holds in the database, for the journal of its sent requests (``sent_journal.py``) and
for giving back, after it died, what it recorded but never sent (``loop/recovery.py``).

It holds a slot's attempt when the slot's ``dispatcher_id`` is its own (it placed the job, or a standby of its
was promoted there: only it sends), and a standby when the slot's ``next_dispatcher_id`` is. Pull GPUs are
left out: their agents fetch their jobs, nothing is POSTed.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, bindparam, text

from dispatcher.db.schema import Timestamp
from dispatcher.db.standby import UNBIND_SLOTS
from dispatcher.gpus.pull import PULL_SCHEME

Pair = tuple[str, int]

# A job an agent fetched is not judged here (its GPU may have been turned from pull to push since): only
# a request POSTed is in a journal.
_HELD_SQL = (
    "SELECT s.task_id, s.attempt, t.state FROM slots s JOIN gpus g ON g.gpu_id = s.gpu_id"
    " JOIN tasks t ON t.task_id = s.task_id"
    " WHERE s.dispatcher_id = :me AND s.task_id IS NOT NULL AND g.url NOT LIKE :pull"
    " AND (t.fetched_attempt IS NULL OR t.fetched_attempt <> s.attempt)"
)
_BOUND_SQL = (
    "SELECT s.next_task_id, s.next_attempt FROM slots s JOIN gpus g ON g.gpu_id = s.gpu_id"
    " WHERE s.next_dispatcher_id = :me AND s.next_task_id IS NOT NULL AND g.url NOT LIKE :pull"
)
_HELD = text(_HELD_SQL)
_BOUND = text(_BOUND_SQL)
# One statement, so one snapshot: read as two, a standby promoted in between (its holder's end committing
# under MariaDB's READ COMMITTED) was in neither, and a rotation dropped it from the journal (an outside
# review reproduced it; the dead dispatcher's standby, sent, was then given back and run twice).
_HOLDINGS = text(  # constants only
    "SELECT h.task_id, h.attempt FROM (" + _HELD_SQL + ") h"  # noqa: S608
    " UNION ALL SELECT b.next_task_id, b.next_attempt FROM (" + _BOUND_SQL + ") b"
)
# Due at once from the database, as a first attempt never made: the job is pushed back into Redis from the
# row (``deferred.py``), whatever became of the copies the dead process had in its buffer.
_DUE_AGAIN = text(
    "UPDATE tasks SET state = 'retrying', attempt = 0, gpu_id = NULL, slot_index = NULL,"
    " dispatcher_id = NULL, fetched_attempt = NULL, run_after = :now, updated_at = :now"
    " WHERE task_id IN :ids AND state = 'standby'"
    " AND NOT EXISTS (SELECT 1 FROM slots s WHERE s.task_id = tasks.task_id)"
).bindparams(bindparam("ids", expanding=True), bindparam("now", type_=Timestamp))


def _pull() -> dict[str, str]:
    return {"pull": PULL_SCHEME + "%"}


def held_by(conn: Connection, *, dispatcher_id: str) -> list[tuple[str, int, str]]:
    """(task_id, attempt, task state) of each slot of a push GPU this dispatcher holds."""
    rows = conn.execute(_HELD, {"me": dispatcher_id, **_pull()})
    return [(r.task_id, int(r.attempt), str(r.state)) for r in rows]


def bound_to(conn: Connection, *, dispatcher_id: str) -> list[Pair]:
    """(task_id, attempt) of each standby this dispatcher has bound on a push GPU's slot."""
    return [
        (r.next_task_id, int(r.next_attempt)) for r in conn.execute(_BOUND, {"me": dispatcher_id, **_pull()})
    ]


def holdings(conn: Connection, *, dispatcher_id: str) -> set[Pair]:
    """Every attempt this dispatcher holds or has bound: those it sent and whose end is still to come."""
    rows = conn.execute(_HOLDINGS, {"me": dispatcher_id, **_pull()})
    return {(r[0], int(r[1])) for r in rows}


def unbind_unsent(conn: Connection, *, task_ids: list[str], dispatcher_id: str, now: datetime) -> list[str]:
    """Standbys of a dead dispatcher that it never sent: off their slots, due again at once. Those promoted
    meanwhile (their slot's job ended) are left held: ``finish_attempt`` gives them back. Returns the ids
    made due."""
    if not task_ids:
        return []
    conn.execute(UNBIND_SLOTS, {"ids": task_ids, "me": dispatcher_id})
    conn.execute(_DUE_AGAIN, {"ids": task_ids, "now": now})
    rows = conn.execute(
        text(
            "SELECT task_id FROM tasks WHERE task_id IN :ids AND state = 'retrying' AND attempt = 0"
        ).bindparams(bindparam("ids", expanding=True)),
        {"ids": task_ids},
    )
    return [r.task_id for r in rows]
