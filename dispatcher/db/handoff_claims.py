"""A hand-off's claim, INSERT, free and COMMIT in one round trip (issue 12: fewer round trips per batch).

A hand-off at saturation places fresh jobs (first attempts, not known to the database) on the slots its
transaction just ended. ``dispatch`` claims the slots, learns which claims won, then inserts the task rows of
the winners; a third round trip frees any ended slot no job took, and the COMMIT is a fourth. Here they go out
as one query (``db/pipeline.py``), none depending on an answer the client must read first:

1. the claim (``claim_slots``'s conditional UPDATE, taking over the slots this transaction ended);
2. ``INSERT INTO tasks … SELECT`` of the proposed jobs joined to the slots the claim gave them (ours, claimed
   at this transaction's ``now``): a job whose claim lost (another dispatcher took a free slot first) gets no
   row, so nothing is recorded for it, exactly as ``dispatch`` does;
3. the free of the slots the ended attempts still hold after the claim: those no job was proposed for, and
   those whose claim failed (a slot handed off holds its new job by then, untouched);
4. which jobs got a slot (read, as ``claimed_of`` does, only to tell the caller);
5. COMMIT, when the caller's transaction allows it (the hot thread's, where nothing follows: ``may_commit``).

A job that lost its race is not tried again on a fresh snapshot here (``dispatch`` would): it goes back to the
buffer and the next batch or pass places it. A failed statement (a job's id known after all) fails the whole
query and the transaction, as the INSERT of ``dispatch`` did: the caller ends the attempts without the
hand-off and looks the jobs up before placing them.

Only for the kind of batch this is for: the connection takes several statements per query (MariaDB's hot
connection), no job needs looking up first (``check_existing``), every job is a first attempt, due now, and
in the batch once. Anything else goes through ``dispatch`` unchanged.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, TextClause, bindparam, text

from dispatcher.db.attempts import FREE_MANY
from dispatcher.db.batch import OURS, claim_statement
from dispatcher.db.dispatch import DispatchResult, Placed, new_row
from dispatcher.db.engine import naive_utc
from dispatcher.db.pipeline import may_commit, multi_statements, pipeline
from dispatcher.db.promote import promote_params, promote_tasks
from dispatcher.db.schema import Timestamp
from dispatcher.db.snapshot import EndingView
from dispatcher.loop.placement import Pick, Placer
from dispatcher.states import TaskState
from producer.job import Job

log = logging.getLogger("gpuq.db")

#: The jobs' data one query may carry at most. The query must stay under MariaDB's max_allowed_packet (a
#: bigger one drops the connection: every callback of the batch would fail, again at each retry), which
#: ``Limits`` sizes for statements of at most ~1 MB (PyMySQL splits ``dispatch``'s multi-row INSERT there).
#: The data is ASCII JSON; escaping may double it. Over it, ``dispatch`` places the jobs.
FOLD_BYTES = 512 * 1024


def fits(conn: Connection, chosen: list[tuple[Job, str]], *, check_existing: bool, now: datetime) -> bool:
    """Whether ``place_fresh`` takes these jobs (see the module docstring); else ``dispatch`` does."""
    if check_existing or not chosen or not multi_statements(conn):
        return False
    ids = {job.task_id for job, _ in chosen}
    return len(ids) == len(chosen) and all(
        job.attempt == 0 and (job.not_before is None or naive_utc(job.not_before) <= now) for job, _ in chosen
    )


def place_fresh(
    conn: Connection,
    *,
    chosen: list[tuple[Job, str]],
    seen: EndingView,
    ending: list[str],
    dispatcher_id: str,
    lease_seconds: float,
    max_attempts: int,
    now: datetime,
    rng: random.Random,
    max_bytes: int = FOLD_BYTES,
    more: Sequence[tuple[Any, dict[str, Any]]] = (),
    more_bytes: int = 0,
) -> DispatchResult | None:
    """``dispatch(items=chosen, view=seen.gpus, takeover=ending)`` for jobs ``fits`` took, in one round
    trip (see the module docstring). Unlike ``dispatch``, every slot the attempts ``ending`` held and no job
    took is free when it returns, and the transaction is committed when ``may_commit``: the caller sends
    nothing more in it. None, having sent nothing: the jobs' data is too large for one query (over
    ``max_bytes`` or ``FOLD_BYTES``; the caller passes half what ``Limits`` allows a statement, as escaping
    may double it): ``dispatch`` places them. ``more``: statements to send after the free (so after the
    promotions it makes), before the COMMIT, carrying ``more_bytes`` of jobs' data within the same bound;
    the rows of the last are ``more_rows`` of the result."""
    placer = Placer(seen.gpus, rng)
    proposals: list[tuple[Job, str, Pick]] = []
    out = DispatchResult()
    for job, pool in chosen:
        pick = placer.take(pool)
        if pick is None:
            out.unplaced.append((job, pool))
        else:
            proposals.append((job, pool, pick))
    rows = [new_row(job, pool, max_attempts, now) for job, pool, _ in proposals]
    if sum(len(str(row["data"])) for row in rows) + more_bytes > min(max_bytes, FOLD_BYTES):
        return None
    statements: list[tuple[Any, dict[str, Any]]] = []
    if proposals:
        picks = [
            {"gpu_id": p.gpu_id, "slot_index": p.slot_index, "task_id": j.task_id, "attempt": 1, "url": p.url}
            for j, _, p in proposals
        ]
        lease = now + timedelta(seconds=lease_seconds)
        claim, params, ids = claim_statement(
            conn, picks=picks, now=now, lease=lease, dispatcher_id=dispatcher_id, takeover=ending
        )
        statements += [(claim, params), _insert_won(rows, dispatcher_id, max_attempts, now)]
    if ending:
        # Every slot an ended attempt still holds after the claim: one no job was proposed for (no candidate,
        # a drained GPU), and one whose claim failed (its GPU's URL changed since the snapshot: a proposal is
        # not a win). Counting proposals left such a slot held by a finished task for good (an outside
        # review). A slot taken over holds its new task by now, which this does not touch.
        promoted = promote_params(now, lease_seconds)
        statements.append((FREE_MANY, {"ids": ending} | promoted))
        statements.append(promote_tasks(conn, promoted))
    if proposals:
        statements.append((OURS, {"ids": ids, "dispatcher_id": dispatcher_id, "now": now}))
    ours = len(statements) - 1
    statements += more
    res = pipeline(conn, statements, commit=may_commit(conn)) if statements else []
    if proposals:
        _sort_out(out, proposals, inserted=res[1].rowcount, won={row.task_id for row in res[ours].rows})
    if more:
        out.more_rows = res[-1].rows
    return out


def _sort_out(
    out: DispatchResult, proposals: list[tuple[Job, str, Pick]], *, inserted: int, won: set[str]
) -> None:
    """The proposals whose claims won are placed, the others go back."""
    if inserted != len(won):  # rows for exactly the jobs that got a slot; committed: said, not raised
        log.error(
            "a hand-off recorded a different number of tasks than slots it claimed",
            extra={"action": "handoff_mismatch", "recorded": inserted, "claimed": len(won)},
        )
    for job, pool, pick in proposals:
        if job.task_id in won:
            out.placed.append(Placed(job, pool, pick.gpu_id, pick.slot_index, pick.url, 1))
        else:
            out.unplaced.append((job, pool))


#: The INSERT's statement per row count (its SQL and bound types depend on nothing else): building a
#: ``text()`` costs a regex over its SQL and a parameter object per value, per batch otherwise.
_INSERTS: dict[int, TextClause] = {}
_DERIVED = ("task_id", "queue", "type", "pool", "priority", "data", "enqueued_at")


def _insert_won(
    rows: list[dict[str, Any]], dispatcher_id: str, max_attempts: int, now: datetime
) -> tuple[TextClause, dict[str, Any]]:
    """The task rows (``new_row``) of the jobs holding a slot claimed by this transaction, as ``dispatch``
    records them."""
    n = len(rows)
    statement = _INSERTS.get(n)
    if statement is None:
        derived = " UNION ALL ".join(
            "SELECT " + ", ".join(f":{c}_{i} AS {c}" for c in _DERIVED) for i in range(n)
        )
        # Only this module's column names and :placeholders go into the SQL; values are bound.
        sql = (
            "INSERT INTO tasks (task_id, queue, type, pool, priority, data, enqueued_at, max_attempts,"  # noqa: S608
            " created_at, state, attempt, gpu_id, slot_index, dispatcher_id, started_at, run_after,"
            " last_callback, updated_at)"
            " SELECT c.task_id, c.queue, c.type, c.pool, c.priority, c.data, c.enqueued_at, :max_attempts,"
            f" :now, '{TaskState.PROCESSING.value}', 1, s.gpu_id, s.slot_index, :dispatcher_id, :now, NULL,"
            f" NULL, :now FROM ({derived}) c JOIN slots s ON s.task_id = c.task_id AND s.attempt = 1"
            " AND s.dispatcher_id = :dispatcher_id AND s.claimed_at = :now"
        )
        stamps = [bindparam("now", type_=Timestamp)]
        stamps += [bindparam(f"enqueued_at_{i}", type_=Timestamp) for i in range(n)]
        statement = text(sql).bindparams(*stamps)
        if len(_INSERTS) >= 256:
            _INSERTS.clear()
        _INSERTS[n] = statement
    params: dict[str, Any] = {"now": now, "dispatcher_id": dispatcher_id, "max_attempts": max_attempts}
    for i, row in enumerate(rows):
        for c in _DERIVED:
            params[f"{c}_{i}"] = row[c]
    return statement, params
