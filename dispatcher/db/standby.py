"""Standby jobs: the next job recorded on a busy slot, so it can be sent the moment the slot's holder ends.

Issue 12: a hand-off (``db/handoff.py``) starts the next job in the transaction that ends an attempt, so the
next request waits for that COMMIT (15-40 ms from the GPU's callback on this machine). SPEC §4 wants the
database, not a process, to say who holds a slot, so the request cannot simply go out before the COMMIT. A
standby is recorded first (design: ``docs/standby.md``):

- **bind** (``bind``): a dispatcher records a fresh job of the pool on one of *its own* busy slots
  (``slots.next_task_id``/``next_attempt``/``next_dispatcher_id``) and the job's row as ``standby`` with that
  GPU and slot, before anything is sent. A job whose id the database knows is refused there and then.
- **promote** (``PROMOTE_SETS`` in every statement that frees a slot, then ``promote_tasks`` in the same
  transaction): the slot goes from its holder straight to its standby, with a fresh lease, whoever frees
  it (a callback to another dispatcher, a lease sweep, a confirmed cancel). A slot with a standby therefore
  never passes through "free", so nothing else can be placed on it.
- **send**: only the owner POSTs the standby, at most once: on the holder's final callback (before that
  callback's transaction, the one thing that makes it fast), or when it learns another process promoted it
  (``promoted``). A dead owner's promoted standby is never sent; its lease runs out and it is retried, as for
  a crash between a COMMIT and a POST.
- **unbind** (``unbind``, owner only, never once sent): the row goes back to ``queued`` (attempt 0) and the
  job to the owner's buffer, the binding is cleared.

Invariant: ``next_task_id IS NOT NULL`` only on a slot whose ``task_id IS NOT NULL`` (a free slot's standby
would be stranded); every free statement keeps it by moving ``next_*`` into the slot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, text

from dispatcher.db.batch import SAME_URL, SAME_URL_MYSQL, _rows, _update_join, statement
from dispatcher.db.cancels import release_cancelled
from dispatcher.db.dispatch import new_row
from dispatcher.db.schema import Timestamp, tasks
from dispatcher.gpus.pull import is_pull
from dispatcher.states import TaskState
from producer.job import Job


@dataclass(slots=True, frozen=True)
class Bound:
    """A standby recorded: ``job`` takes slot (``gpu_id``, ``slot_index``) when attempt ``holder_attempt`` of
    ``holder`` ends."""

    job: Job
    pool: str
    gpu_id: str
    slot_index: int
    url: str
    holder: str
    holder_attempt: int


@dataclass(slots=True)
class BindResult:
    bound: list[Bound]
    known: list[Job]  # ids the database knows: not bound, to be looked up by a pass


_TARGETS = text(
    "SELECT s.gpu_id, s.slot_index, s.task_id, s.attempt, g.url, g.pool FROM slots s"
    " JOIN gpus g ON g.gpu_id = s.gpu_id"
    " WHERE s.dispatcher_id = :me AND s.task_id IS NOT NULL AND s.next_task_id IS NULL"
    " AND g.state = 'active' AND g.healthy = 1 AND s.slot_index < g.slots AND g.pool IN :pools"
    " ORDER BY s.claimed_at, s.gpu_id, s.slot_index"
).bindparams(bindparam("pools", expanding=True))

_KNOWN = text("SELECT task_id FROM tasks WHERE task_id IN :ids").bindparams(bindparam("ids", expanding=True))

_WON = text(
    "SELECT next_task_id, gpu_id, slot_index, task_id, attempt FROM slots"
    " WHERE next_task_id IN :ids AND next_dispatcher_id = :me"
).bindparams(bindparam("ids", expanding=True))


def bind(
    conn: Connection,
    *,
    candidates: list[tuple[Job, str]],
    dispatcher_id: str,
    max_attempts: int,
    now: datetime,
    avoid: Sequence[tuple[str, int]] = (),
) -> BindResult:
    """Record ``candidates`` ((job, pool), oldest first; fresh first attempts) as standbys of this
    dispatcher's busy slots of their pools, the slots whose holders started first taken first, except those
    of the holders (task, attempt) in ``avoid`` (running long: a standby there was overtaken). Jobs not bound
    (no slot left, or younger than a known job of their pool) are in neither list: the caller keeps them."""
    out = BindResult([], [])
    if not candidates:
        return out
    ids = [job.task_id for job, _ in candidates]
    known = set(conn.execute(_KNOWN, {"ids": ids}).scalars())
    out.known = [job for job, _ in candidates if job.task_id in known]
    fresh, stopped = [], set()
    for job, pool in candidates:  # of each pool, those before its first known job: none overtakes it
        if job.task_id in known:
            stopped.add(pool)
        elif pool not in stopped:
            fresh.append((job, pool))
    if not fresh:
        return out
    targets: dict[str, list[Any]] = {}
    skip = set(avoid)
    for row in conn.execute(_TARGETS, {"me": dispatcher_id, "pools": sorted({p for _, p in fresh})}):
        if not is_pull(row.url) and (row.task_id, row.attempt) not in skip:
            targets.setdefault(row.pool, []).append(row)
    picks: list[dict[str, Any]] = []
    chosen: dict[str, tuple[Job, str, Any]] = {}
    for job, pool in fresh:
        free = targets.get(pool)
        if not free or job.task_id in chosen:
            continue
        row = free.pop(0)
        chosen[job.task_id] = (job, pool, row)
        picks.append(
            {
                "gpu_id": row.gpu_id,
                "slot_index": row.slot_index,
                "holder": row.task_id,
                "holder_attempt": row.attempt,
                "task_id": job.task_id,
                "url": row.url,
            }
        )
    if not picks:
        return out
    picks.sort(key=lambda p: (p["gpu_id"], p["slot_index"]))  # one lock order for every claimer
    columns = ("gpu_id", "slot_index", "holder", "holder_attempt", "task_id", "url")
    derived, params, stamps = _rows(picks, columns)
    mysql = conn.dialect.name in ("mysql", "mariadb")
    sql = _binding(
        conn,
        derived,
        "t.task_id = c.holder AND t.attempt = c.holder_attempt AND t.next_task_id IS NULL"
        + (SAME_URL_MYSQL if mysql else SAME_URL),
    )
    conn.execute(statement(sql, stamps=stamps), params | {"me": dispatcher_id})
    won = conn.execute(_WON, {"ids": list(chosen), "me": dispatcher_id}).all()
    rows = []
    for w in won:
        job, pool, target = chosen[w.next_task_id]
        rows.append(
            new_row(job, pool, max_attempts, now)
            | {
                "state": TaskState.STANDBY.value,
                "attempt": 1,
                "gpu_id": w.gpu_id,
                "slot_index": w.slot_index,
                "dispatcher_id": dispatcher_id,
                "updated_at": now,
            }
        )
        out.bound.append(Bound(job, pool, w.gpu_id, w.slot_index, target.url, w.task_id, w.attempt))
    if rows:
        conn.execute(insert(tasks), rows)
    order = {job.task_id: i for i, (job, _) in enumerate(candidates)}
    out.bound.sort(key=lambda b: order[b.job.task_id])
    return out


def _binding(conn: Connection, derived: str, where: str) -> str:
    """The UPDATE that records each job of ``derived`` (``c.task_id``) as the standby of its slot of ours,
    where ``where`` holds (over the slot ``t`` and the pick ``c``)."""
    return _update_join(
        conn,
        table="slots",
        derived=derived,
        on="t.gpu_id = c.gpu_id AND t.slot_index = c.slot_index",
        sets=[("next_task_id", "c.task_id"), ("next_attempt", "1"), ("next_dispatcher_id", ":me")],
        where=where,
    )


UNBIND_SLOTS = text(
    "UPDATE slots SET next_task_id = NULL, next_attempt = NULL, next_dispatcher_id = NULL"
    " WHERE next_task_id IN :ids AND next_dispatcher_id = :me"
).bindparams(bindparam("ids", expanding=True))
# Back to waiting as a first attempt never made: a copy of the job (the owner's buffer, or one swept from its
# processing list) finds a runnable row and is placed by the usual path, exactly once.
_UNBIND_TASKS = text(
    "UPDATE tasks SET state = 'queued', attempt = 0, gpu_id = NULL, slot_index = NULL, dispatcher_id = NULL,"
    " fetched_attempt = NULL, updated_at = :now WHERE task_id IN :ids AND state = 'standby'"
    " AND NOT EXISTS (SELECT 1 FROM slots s WHERE s.task_id = tasks.task_id)"
).bindparams(bindparam("ids", expanding=True), bindparam("now", type_=Timestamp))
_STATES = text("SELECT task_id, state, attempt FROM tasks WHERE task_id IN :ids").bindparams(
    bindparam("ids", expanding=True)
)


def unbind(
    conn: Connection, *, task_ids: list[str], dispatcher_id: str, now: datetime
) -> dict[str, tuple[str, int]]:
    """Take back standbys of this dispatcher that it has not sent; returns each one's state and attempt
    after: ``queued`` at 0 (taken back: place it again), ``processing`` at 1 (promoted first: the owner must
    send it), ``cancelled`` (promoted or not, it is the cancel's), another (the database took it over: its
    lease ran out), or absent (not ours)."""
    if not task_ids:
        return {}
    conn.execute(UNBIND_SLOTS, {"ids": task_ids, "me": dispatcher_id})
    conn.execute(_UNBIND_TASKS, {"ids": task_ids, "now": now})
    return states(conn, task_ids=task_ids)


def taken_back(after: Mapping[str, tuple[str | None, int]], task_id: str) -> bool:
    """Did ``unbind`` (whose answer is ``after``) take this one back (queued at attempt 0: its job to the
    owner's buffer)? Queued later is the database's retry, in Redis already (buffered too, a pass met both
    copies and dropped both: a kill test)."""
    state, attempt = after.get(task_id, (None, 0))
    return state is None or (state == TaskState.QUEUED.value and attempt == 0)


def drop_cancelled(
    conn: Connection, *, task_id: str, dispatcher_id: str, now: datetime, lease_seconds: float
) -> bool:
    """A cancelled standby of ours that we never sent: its binding cleared and, if it was promoted, its slot
    given back (to the slot's next standby, if any), in one transaction: whichever side of it the holder's
    end falls, the slot ends up free of it. True when a slot was freed."""
    conn.execute(UNBIND_SLOTS, {"ids": [task_id], "me": dispatcher_id})
    return release_cancelled(conn, task_id=task_id, attempt=1, now=now, lease_seconds=lease_seconds)


def states(conn: Connection, *, task_ids: list[str]) -> dict[str, tuple[str, int]]:
    """The state and attempt of each of these tasks (an owner's look at its standbys: promoted elsewhere?)."""
    if not task_ids:
        return {}
    return {r.task_id: (r.state, r.attempt) for r in conn.execute(_STATES, {"ids": task_ids})}


_ELIGIBLE = text(
    "SELECT s.gpu_id, s.slot_index, g.url FROM slots s JOIN gpus g ON g.gpu_id = s.gpu_id"
    " WHERE s.gpu_id IN :gpus AND g.state = 'active' AND g.healthy = 1 AND s.slot_index < g.slots"
).bindparams(bindparam("gpus", expanding=True))


def eligible_slots(conn: Connection, *, slots_of: list[tuple[str, int, str]]) -> set[tuple[str, int]]:
    """Which of these (gpu_id, slot_index, url) may still get a job: active, healthy, within the GPU's slot
    count, at the URL the standby was bound for (byte for byte)."""
    if not slots_of:
        return set()
    rows = conn.execute(_ELIGIBLE, {"gpus": sorted({g for g, _, _ in slots_of})})
    ok = {(r.gpu_id, r.slot_index): r.url for r in rows}
    return {(g, i) for g, i, url in slots_of if ok.get((g, i)) == url}


@dataclass(slots=True, frozen=True)
class NextBind:
    """A standby to record, in the transaction that promotes ``holder`` (a standby sent early) onto slot
    (``gpu_id``, ``slot_index``), as that slot's next one: bound the moment its holder starts, never late."""

    job: Job
    pool: str
    gpu_id: str
    slot_index: int
    holder: str
    url: str


_NEXT_COLUMNS = ("gpu_id", "slot_index", "holder", "task_id", "url")
_ROW_COLUMNS = ("task_id", "queue", "type", "pool", "priority", "data", "enqueued_at")


def bind_next_statements(
    conn: Connection, binds: Sequence[NextBind], *, dispatcher_id: str, max_attempts: int, now: datetime
) -> tuple[list[tuple[Any, dict[str, Any]]], int]:
    """``bind`` for standbys whose slots are known, as statements to send after the free that promotes their
    holders, in its transaction (in the same round trip where the connection allows it): the binding (only
    where the holder got the slot, the slot has no standby, the GPU is eligible at the URL it was sent to,
    and the job's id is unknown), the task rows of the jobs bound, and which were (``_WON``'s rows, last).
    No answer is needed between them, so nothing here waits for the database. Also returns the bytes of the
    jobs' data they carry, which count against the bound of the statement they go out with."""
    mysql = conn.dialect.name in ("mysql", "mariadb")
    picks = [
        {
            "gpu_id": b.gpu_id,
            "slot_index": b.slot_index,
            "holder": b.holder,
            "task_id": b.job.task_id,
            "url": b.url,
        }
        for b in sorted(binds, key=lambda b: (b.gpu_id, b.slot_index))  # one lock order for every claimer
    ]
    derived, params, stamps = _rows(picks, _NEXT_COLUMNS)
    binary = "BINARY " if mysql else ""  # byte for byte, as the claim's URL check (batch.SAME_URL_MYSQL)
    bind_sql = _binding(
        conn,
        derived,
        "t.task_id = c.holder AND t.attempt = 1 AND t.next_task_id IS NULL"  # noqa: S608 - see below
        " AND t.dispatcher_id = :me AND NOT EXISTS (SELECT 1 FROM tasks k WHERE k.task_id = c.task_id)"
        f" AND EXISTS (SELECT 1 FROM gpus g WHERE g.gpu_id = t.gpu_id AND {binary}g.url = {binary}c.url"
        " AND g.state = 'active' AND g.healthy = 1 AND t.slot_index < g.slots)",
    )
    rows = [new_row(b.job, b.pool, max_attempts, now) for b in binds]
    row_derived, row_params, row_stamps = _rows(rows, _ROW_COLUMNS)
    # Only this module's column names and :placeholders go into the SQL; values are bound.
    insert_sql = (
        "INSERT INTO tasks (task_id, queue, type, pool, priority, data, enqueued_at, max_attempts,"  # noqa: S608
        " created_at, state, attempt, gpu_id, slot_index, dispatcher_id, updated_at)"
        " SELECT c.task_id, c.queue, c.type, c.pool, c.priority, c.data, c.enqueued_at, :max_attempts, :now,"
        f" '{TaskState.STANDBY.value}', 1, s.gpu_id, s.slot_index, :me, :now FROM ({row_derived}) c"
        " JOIN slots s ON s.next_task_id = c.task_id AND s.next_dispatcher_id = :me"
        " WHERE NOT EXISTS (SELECT 1 FROM tasks k WHERE k.task_id = c.task_id)"
    )
    ids = [b.job.task_id for b in binds]
    data_bytes = sum(len(str(row["data"])) for row in rows)
    return [
        (statement(bind_sql, stamps=stamps), params | {"me": dispatcher_id}),
        (
            statement(insert_sql, stamps=[*row_stamps, "now"]),
            row_params | {"me": dispatcher_id, "max_attempts": max_attempts, "now": now},
        ),
        (_UNBIND_ROWLESS, {"ids": ids, "me": dispatcher_id}),
        (_WON, {"ids": ids, "me": dispatcher_id}),
    ], data_bytes


# A binding whose task row is not our standby on that slot: the id got a row between the binding and the
# INSERT (a cancel's tombstone, a copy placed elsewhere; both read committed rows), so the INSERT skipped it.
# Left bound, the slot would go to a job that is not ours to send (an outside review). A rerun after a lost
# answer finds its first run's binding with its row, and keeps it.
_UNBIND_ROWLESS = text(
    "UPDATE slots SET next_task_id = NULL, next_attempt = NULL, next_dispatcher_id = NULL"
    " WHERE next_task_id IN :ids AND next_dispatcher_id = :me AND NOT EXISTS (SELECT 1 FROM tasks k"
    " WHERE k.task_id = slots.next_task_id AND k.state = 'standby' AND k.dispatcher_id = :me"
    " AND k.gpu_id = slots.gpu_id AND k.slot_index = slots.slot_index)"
).bindparams(bindparam("ids", expanding=True))


def next_bound(binds: Sequence[NextBind], won_rows: Any) -> list[Bound]:
    """The ``Bound`` of each of ``binds`` that ``bind_next_statements`` bound (its last statement's rows)."""
    won = {r.next_task_id: r for r in won_rows}
    out = []
    for b in binds:
        w = won.get(b.job.task_id)
        if w is not None:
            out.append(Bound(b.job, b.pool, w.gpu_id, w.slot_index, b.url, w.task_id, w.attempt))
    return out
