"""Set-based statements for the hot path: many slot claims, or many attempt endings, in one statement.

A job costs a few statements either way, but per statement the database, the driver and SQLAlchemy each
take ~0.1-0.2 ms of CPU on this class of machine, which capped throughput near 300 jobs/s. Joining the rows
to change against a derived table (``SELECT :a0 AS x UNION ALL SELECT :a1 …``) turns N statements into one.
MySQL/MariaDB spell it ``UPDATE t JOIN (…) c ON … SET …``; SQLite (3.33+) ``UPDATE t SET … FROM (…) AS c``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, TextClause, bindparam, text

from dispatcher.db.schema import Timestamp


def _rows(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> tuple[str, dict[str, Any], list[str]]:
    """A derived table of ``rows``: its SQL, its parameters, and the names of datetime parameters."""
    selects, params, stamps = [], {}, []
    for i, row in enumerate(rows):
        selects.append("SELECT " + ", ".join(f":{c}_{i} AS {c}" for c in columns))
        for c in columns:
            params[f"{c}_{i}"] = row[c]
            if isinstance(row[c], datetime):
                stamps.append(f"{c}_{i}")
    return " UNION ALL ".join(selects), params, stamps


def _update_join(
    conn: Connection, *, table: str, derived: str, on: str, sets: Sequence[tuple[str, str]], where: str
) -> str:
    """``UPDATE table t`` joined to ``derived c``; ``sets`` are (column, expression over t and c).

    Only constant fragments of this module and ``:name`` placeholders go into the SQL; values are bound."""
    if conn.dialect.name == "sqlite":
        assignments = ", ".join(f"{column} = {expr}" for column, expr in sets)
        return f"UPDATE {table} AS t SET {assignments} FROM ({derived}) AS c WHERE {on} AND {where}"  # noqa: S608
    assignments = ", ".join(f"t.{column} = {expr}" for column, expr in sets)
    return f"UPDATE {table} t JOIN ({derived}) c ON {on} SET {assignments} WHERE {where}"  # noqa: S608


#: Statements by their SQL and which parameters are timestamps or lists: ``text()`` runs a regex over the SQL
#: and makes a parameter object per value, about a sixth of a hand-off batch's CPU when done per batch. A
#: batch's SQL varies only with its size and which values its items share, so few are ever made.
_STATEMENTS: dict[tuple[str, tuple[str, ...], tuple[str, ...]], TextClause] = {}
_STATEMENTS_MAX = 512


def statement(sql: str, *, stamps: Sequence[str] = (), lists: Sequence[str] = ()) -> TextClause:
    """``text(sql)`` with ``stamps`` bound as timestamps and ``lists`` as lists (``IN :name``), made once."""
    key = (sql, tuple(stamps), tuple(lists))
    made = _STATEMENTS.get(key)
    if made is None:
        binds = [bindparam(name, type_=Timestamp) for name in stamps]
        binds += [bindparam(name, expanding=True) for name in lists]
        made = text(sql).bindparams(*binds)
        if len(_STATEMENTS) >= _STATEMENTS_MAX:
            _STATEMENTS.clear()
        _STATEMENTS[key] = made
    return made


OURS = text(
    "SELECT task_id FROM slots WHERE task_id IN :ids AND dispatcher_id = :dispatcher_id AND claimed_at = :now"
).bindparams(bindparam("ids", expanding=True), bindparam("now", type_=Timestamp))


def claim_slots(
    conn: Connection,
    *,
    picks: Sequence[dict[str, Any]],
    now: datetime,
    lease: datetime,
    dispatcher_id: str,
    takeover: Sequence[str] = (),
) -> set[str]:
    """Claim each ``{"gpu_id", "slot_index", "task_id", "attempt"}`` if its slot is still free, or still held
    by one of the tasks ``takeover`` (whose attempts the caller's transaction ended: the slot goes straight
    from the ended attempt to the next job, one statement instead of a free and a claim); returns the task
    ids that got their slot. Sorted by slot so concurrent claimers lock rows in one order."""
    if not picks:
        return set()
    claim, params, ids = claim_statement(
        conn, picks=picks, now=now, lease=lease, dispatcher_id=dispatcher_id, takeover=takeover
    )
    return claimed_of(conn, conn.execute(claim, params).rowcount, ids, dispatcher_id=dispatcher_id, now=now)


SAME_URL = " AND EXISTS (SELECT 1 FROM gpus g WHERE g.gpu_id = t.gpu_id AND g.url = c.url)"
SAME_URL_MYSQL = (
    " AND EXISTS (SELECT 1 FROM gpus g WHERE g.gpu_id = t.gpu_id AND BINARY g.url = BINARY c.url)"
)


def claim_statement(
    conn: Connection,
    *,
    picks: Sequence[dict[str, Any]],
    now: datetime,
    lease: datetime,
    dispatcher_id: str,
    takeover: Sequence[str] = (),
) -> tuple[TextClause, dict[str, Any], list[str]]:
    """``claim_slots``'s statement, its parameters and the task ids it claims for, in its order (to be sent
    with other statements: ``db/pipeline.py``); ``claimed_of`` reads its outcome. Picks that carry the
    ``url`` they were made for claim only while the GPU still has that URL."""
    ordered = sorted(picks, key=lambda p: (p["gpu_id"], p["slot_index"]))
    # With the URL each pick was made for: the GPU must still have it. A ``gpuq gpu set --url`` or a change of
    # kind (``gpuq gpu add NAME --pull``) committed since the snapshot would send the request to the old URL,
    # or POST a job the new agent is also handed (run twice). The check reads the GPU's row with a shared
    # lock held to the COMMIT, so a change made after the claim waits for it and then finds its job (the
    # change's own look at the jobs on the GPU, ``register_pull``, ``_unfetched_back``).
    guarded = all("url" in p for p in ordered)
    columns = ("gpu_id", "slot_index", "task_id", "attempt", *(("url",) if guarded else ()))
    derived, params, stamps = _rows(ordered, columns)
    # A slot taken over must have no standby: the end gives it to the standby (db/promote.py).
    takes = "(t.task_id IS NULL OR (t.task_id IN :takeover AND t.next_task_id IS NULL))"
    where = takes if takeover else "t.task_id IS NULL"
    if guarded:
        # Byte for byte: MariaDB's collation of ``url`` ignores case and trailing spaces, and a URL changed
        # only in those would still be taken for the old one (the case of its path matters to the service).
        where += SAME_URL_MYSQL if conn.dialect.name in ("mysql", "mariadb") else SAME_URL
    sql = _update_join(
        conn,
        table="slots",
        derived=derived,
        on="t.gpu_id = c.gpu_id AND t.slot_index = c.slot_index",
        sets=[
            ("task_id", "c.task_id"),
            ("attempt", "c.attempt"),
            ("claimed_at", ":now"),
            ("lease_expires_at", ":lease"),
            ("dispatcher_id", ":dispatcher_id"),
        ],
        where=where,
    )
    params |= {"now": now, "lease": lease, "dispatcher_id": dispatcher_id}
    if takeover:
        params["takeover"] = list(takeover)
    claim = statement(sql, stamps=[*stamps, "now", "lease"], lists=("takeover",) if takeover else ())
    return claim, params, [p["task_id"] for p in ordered]


def claimed_of(
    conn: Connection, claimed: int, ids: list[str], *, dispatcher_id: str, now: datetime
) -> set[str]:
    """The task ids of ``ids`` that got their slot, from the rows a claim changed (``claimed``)."""
    if claimed == len(ids):
        return set(ids)
    if claimed == 0:
        return set()
    # Which ones got theirs: a slot this statement set (our id, our claim time). Not just "a slot holds the
    # task": another dispatcher may hold one for another copy of the same task, committed since we read the
    # task as runnable (READ COMMITTED shows it); counting that claim as ours made the caller undo it by
    # freeing that dispatcher's live slot (issue 17: an oversubscribed GPU, or a task stuck with no slot).
    return set(conn.execute(OURS, {"ids": ids, "dispatcher_id": dispatcher_id, "now": now}).scalars())


def end_attempts(conn: Connection, *, items: Sequence[dict[str, Any]], now: datetime) -> int:
    """Apply each item (task_id, attempt, retry, refund, expiry, final, result, error, reported) to its
    task if still processing at that attempt (a lease expiry only while the lease is still expired); returns
    how many rows changed. Changed rows get ``updated_at = now`` exactly, which is how the caller tells them
    apart when not all did. A retry's ``run_after`` is left for the caller to set once it knows the attempt
    was current."""
    columns = ("task_id", "attempt", "retry", "refund", "expiry", "final", "result", "error", "reported")
    derived, params, stamps = _rows(items, columns)
    # A refunded attempt waits again whatever max_attempts says, so this reads max_attempts only where no
    # refund changes it: the order in which MySQL applies the SET below does not matter.
    again = "c.retry = 1 AND (c.refund = 1 OR t.attempt < t.max_attempts)"
    sql = _update_join(
        conn,
        table="tasks",
        derived=derived,
        on="t.task_id = c.task_id AND t.attempt = c.attempt",
        sets=[
            # MySQL may apply a multi-table SET in any order: no expression reads a column set here.
            ("state", f"CASE WHEN {again} THEN 'retrying' ELSE c.final END"),
            ("run_after", "NULL"),
            ("finished_at", f"CASE WHEN {again} THEN NULL ELSE :now END"),
            ("result", "COALESCE(c.result, t.result)"),
            ("error", "c.error"),
            ("last_callback", "c.reported"),
            ("updated_at", ":now"),
            ("max_attempts", "t.max_attempts + c.refund"),
        ],
        where="t.state = 'processing' AND (c.expiry = 0 OR EXISTS (SELECT 1 FROM slots s"
        " WHERE s.task_id = t.task_id AND s.attempt = t.attempt AND s.lease_expires_at < :now))",
    )
    params["now"] = now
    return int(conn.execute(statement(sql, stamps=[*stamps, "now"]), params).rowcount)


def case_by(key: str, values: Sequence[Any], name: str, params: dict[str, Any]) -> str:
    """``:value`` when every item has the same one, else ``CASE key WHEN :k0 THEN :v0 … END``."""
    if all(v == values[0] for v in values) and all(type(v) is type(values[0]) for v in values):
        params[name] = values[0]
        return f":{name}"
    whens = []
    for i, value in enumerate(values):
        params[f"{name}_{i}"] = value
        whens.append(f"WHEN :k_{i} THEN :{name}_{i}")
    return f"CASE {key} " + " ".join(whens) + " END"


def end_final_attempts(conn: Connection, *, items: Sequence[dict[str, Any]], now: datetime) -> int:
    """See ``end_final_statement``; returns how many rows changed."""
    update, params = end_final_statement(items=items, now=now)
    return int(conn.execute(update, params).rowcount)


def end_final_statement(
    *, items: Sequence[dict[str, Any]], now: datetime
) -> tuple[TextClause, dict[str, Any]]:
    """``end_attempts`` for items that all end their tasks for good (no retry, no refund, no lease expiry):
    the burst of ``finished`` callbacks at saturation. One single-table UPDATE by primary key with the
    per-item values in ``CASE task_id`` expressions (a column all items agree on is one parameter), instead
    of a join against a derived table of every column of every item, which MariaDB builds and joins row by
    row. Same rows changed, same values written."""
    assert not any(item["retry"] or item["refund"] or item["expiry"] for item in items)
    ids = [item["task_id"] for item in items]
    params: dict[str, Any] = {"now": now, "ids": ids}
    for i, task_id in enumerate(ids):
        params[f"k_{i}"] = task_id
    sets = {
        column: case_by("task_id", [item[field] for item in items], column, params)
        for column, field in (("state", "final"), ("error", "error"), ("last_callback", "reported"))
    }
    results = [item["result"] for item in items]
    result = (
        "result"
        if all(r is None for r in results)
        else f"COALESCE({case_by('task_id', results, 'result', params)}, result)"
    )
    attempt = case_by("task_id", [item["attempt"] for item in items], "attempt", params)
    sql = (
        f"UPDATE tasks SET state = {sets['state']}, run_after = NULL, finished_at = :now,"  # noqa: S608
        f" result = {result}, error = {sets['error']}, last_callback = {sets['last_callback']},"
        f" updated_at = :now WHERE task_id IN :ids AND state = 'processing' AND attempt = {attempt}"
    )
    return statement(sql, stamps=("now",), lists=("ids",)), params
