"""Ending attempts: callbacks, synchronous answers, failed requests, lease expiry, cancellation.

Every path goes through ``finish_attempt``, which locks the task row, checks that the attempt is still the
current one, frees the slot and moves the task on, all in one transaction. Whichever of a callback, a GPU
answer and a lease expiry comes first wins; the others find the attempt over and change nothing. A task
left retrying comes back to Redis through ``deferred.py``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, TypeGuard

from sqlalchemy import Connection, Text, bindparam, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from dispatcher.db.batch import end_attempts, end_final_attempts
from dispatcher.db.cancels import cancel_running
from dispatcher.db.promote import DEFAULT_LEASE_SECONDS, PROMOTE_SETS, promote_params, promote_tasks
from dispatcher.db.schema import Timestamp, slots, tasks
from dispatcher.db.snapshot import free_slot
from dispatcher.db.task_writes import ended, locked_task
from dispatcher.states import TERMINAL, Outcome, TaskState

Code = Literal["applied", "repeat", "stale", "unknown"]

#: Bytes a TEXT column (``tasks.error``, ``attempts.error``) holds on MySQL/MariaDB.
TEXT_BYTES = 65535


class EncodedJson(str):
    """A result already serialised (and size-checked) by the caller: stored as it is."""


def clip_text(value: str, max_bytes: int = TEXT_BYTES) -> str:
    """``value`` as a TEXT column takes it: valid UTF-8 (a lone surrogate from a GPU's JSON becomes "?"), cut
    to ``max_bytes`` with a marker saying how long it was. A 65,536-character error was a 500 per callback."""
    raw = value.encode("utf-8", "replace")
    if len(raw) <= max_bytes:
        return raw.decode()
    marker = f" [... truncated: {len(raw)} bytes in all]"
    return raw[: max_bytes - len(marker)].decode("utf-8", "ignore") + marker


@dataclass(frozen=True, slots=True)
class Finish:
    code: Code
    state: str | None = None
    freed: bool = False
    held: bool = False  # cancelled while running: the slot waits for the GPU to confirm (db/cancels.py)


@dataclass(frozen=True, slots=True)
class Backoff:
    base: float = 2.0
    cap: float = 300.0

    def delay(self, attempt: int) -> float:
        # The exponent is clamped: any cap is reached long before 2 ** 64, and 2.0 ** 1024 overflows.
        raw: float = min(self.base * 2.0 ** min(max(attempt - 1, 0), 64), self.cap)
        return raw * (0.9 + 0.2 * random.random())  # noqa: S311 - jitter spreads retries of a burst


_END = text(
    """
    UPDATE tasks SET
      state = CASE WHEN :retry = 1 AND (:refund = 1 OR attempt < max_attempts)
                   THEN 'retrying' ELSE :final END,
      run_after = NULL,
      finished_at = CASE WHEN :retry = 1 AND (:refund = 1 OR attempt < max_attempts)
                         THEN NULL ELSE :now END,
      result = COALESCE(:result, result), error = :error, last_callback = :reported, updated_at = :now,
      max_attempts = max_attempts + :refund
    WHERE task_id = :task_id AND attempt = :attempt AND state = 'processing'
      AND (:expiry = 0 OR EXISTS (SELECT 1 FROM slots s WHERE s.task_id = tasks.task_id
                                  AND s.attempt = tasks.attempt AND s.lease_expires_at < :now))
    """
).bindparams(bindparam("now", type_=Timestamp), bindparam("result", type_=Text))
# The backoff of a retry, set once the attempt is known to be the current one: its number comes from the
# callback's token, and arithmetic on an attempt that never ran (5000, say) must never decide anything.
_RUN_AFTER = text(
    "UPDATE tasks SET run_after = :run_after WHERE task_id = :task_id AND state = 'retrying'"
).bindparams(bindparam("run_after", type_=Timestamp))
_HISTORY = text(
    "INSERT INTO attempts (task_id, attempt, gpu_id, slot_index, started_at, ended_at, outcome, error)"
    " SELECT task_id, attempt, gpu_id, slot_index, started_at, :now, :outcome, :error"
    " FROM tasks WHERE task_id = :task_id"
).bindparams(bindparam("now", type_=Timestamp))
# Gives each slot to its standby, if it has one (db/promote.py); ``promote_tasks``'s statement follows it.
FREE_MANY = text(f"UPDATE slots SET {PROMOTE_SETS} WHERE task_id IN :ids").bindparams(  # noqa: S608
    bindparam("ids", expanding=True), bindparam("now", type_=Timestamp), bindparam("lease", type_=Timestamp)
)
_HISTORY_MANY = text(
    "INSERT INTO attempts (task_id, attempt, gpu_id, slot_index, started_at, ended_at, outcome, error)"
    " SELECT task_id, attempt, gpu_id, slot_index, started_at, :now, :outcome, error"
    " FROM tasks WHERE task_id IN :ids"
).bindparams(bindparam("now", type_=Timestamp), bindparam("ids", expanding=True))
_FINAL_STATE = {
    Outcome.FINISHED: TaskState.FINISHED,
    Outcome.FAILED: TaskState.FAILED,
    Outcome.FAILED_RETRY: TaskState.FAILED,
    Outcome.EXPIRED: TaskState.FAILED,
    Outcome.CANCELLED: TaskState.CANCELLED,
    Outcome.GPU_REFUSED: TaskState.FAILED,  # never reached: a refused attempt always waits again
    Outcome.NOT_SENT: TaskState.FAILED,  # never reached: as a refused attempt
    Outcome.NEVER_SENT: TaskState.FAILED,  # never reached: as a refused attempt
}


#: Attempts given back: no attempt used, the job waits again.
_GIVEN_BACK = (Outcome.GPU_REFUSED, Outcome.NOT_SENT, Outcome.NEVER_SENT)


def _params(
    *,
    task_id: str,
    attempt: int,
    outcome: Outcome,
    now: datetime,
    backoff: Backoff,
    result: Any,
    error: str | None,
    reported: str | None,
) -> dict[str, Any]:
    retry = outcome in (*_GIVEN_BACK, Outcome.FAILED_RETRY, Outcome.EXPIRED)
    # A GPU that refused the request (wrong URL, token, method) says nothing about the job: the attempt is
    # given back (one more allowed) and the job waits again at once (_retry_at), for a GPU that takes it.
    # A request this process could not send is given back too, but waits its backoff (_retry_at): nothing
    # takes a GPU out of rotation for it, and at once it went round four times a second per job.
    # An attempt its dead dispatcher never sent (recovery.py) is given back and waits again at once.
    refund = outcome in _GIVEN_BACK
    return {
        "task_id": task_id,
        "attempt": attempt,
        "retry": 1 if retry else 0,
        "refund": 1 if refund else 0,
        # A lease expiry applies only if the lease is still expired: a heartbeat may have renewed it
        # between the look for expired leases and this update.
        "expiry": 1 if outcome is Outcome.EXPIRED else 0,
        "final": _FINAL_STATE[outcome].value,
        "now": now,
        "result": result
        if isinstance(result, EncodedJson) or result is None
        else json.dumps(result, separators=(",", ":")),
        "error": clip_text(error) if error is not None and outcome is not Outcome.FINISHED else None,
        "reported": reported,
    }


def current_rows(conn: Connection, ids: list[str]) -> dict[str, Any]:
    """The task rows of ``ids`` as this transaction sees them after a set-based end: which endings applied
    (``ended_here``), and why the others did not (``_classify``)."""
    return {
        r.task_id: r
        for r in conn.execute(
            select(
                tasks.c.task_id, tasks.c.state, tasks.c.attempt, tasks.c.last_callback, tasks.c.updated_at
            ).where(tasks.c.task_id.in_(ids))
        )
    }


def ended_here(row: Any, attempt: int, now: datetime) -> TypeGuard[Any]:
    """This transaction's end statement changed the row (stamped ``now``) at that attempt."""
    return row is not None and row.updated_at == now and row.attempt == attempt


def _classify(row: Any, attempt: int, reported: str | None) -> Finish:
    """Why an attempt ending did not apply: a repeat of the report that ended it, or stale."""
    if row is None:
        return Finish("unknown")
    if reported is not None and row.attempt == attempt and row.last_callback == reported:
        return Finish("repeat", row.state)
    return Finish("stale", row.state)


def finish_attempt(
    conn: Connection,
    *,
    task_id: str,
    attempt: int,
    outcome: Outcome,
    now: datetime,
    backoff: Backoff,
    result: Any = None,
    error: str | None = None,
    reported: str | None = None,
    free: bool = True,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> Finish:
    """End ``attempt`` of ``task_id`` with ``outcome``: one conditional UPDATE decides, so of a callback, a
    GPU answer and a lease expiry racing for one attempt exactly one applies.

    ``reported`` is the status a GPU reported (callback or synchronous answer); the same report coming again
    for an attempt it already ended is a repeat (200, applied false), anything else for a finished attempt is
    stale (409). ``free`` False: the slot is left to the caller, which frees it or hands it to the next job
    in the same transaction (``db/handoff.py``).
    """
    params = _params(
        task_id=task_id,
        attempt=attempt,
        outcome=outcome,
        now=now,
        backoff=backoff,
        result=result,
        error=error,
        reported=reported,
    )
    retry = bool(params["retry"])
    if conn.execute(_END, params).rowcount != 1:
        row = conn.execute(
            select(tasks.c.state, tasks.c.attempt, tasks.c.last_callback).where(tasks.c.task_id == task_id)
        ).first()
        return _classify(row, attempt, reported)
    freed = True
    if free:
        freed = free_slot(conn, task_id=task_id, attempt=attempt, now=now, lease_seconds=lease_seconds)
    conn.execute(
        _HISTORY, {"task_id": task_id, "now": now, "outcome": outcome.value, "error": params["error"]}
    )
    state = params["final"]
    at = _retry_at(task_id, attempt, now, backoff, outcome=outcome)
    if retry and conn.execute(_RUN_AFTER, at).rowcount == 1:
        state = TaskState.RETRYING.value
    return Finish("applied", str(state), freed)


def _retry_at(
    task_id: str, attempt: int, now: datetime, backoff: Backoff, *, outcome: Outcome
) -> dict[str, Any]:
    """When a retrying task is due again: after its backoff, or at once for an attempt a GPU refused. A
    request not sent waits the first backoff step whatever its attempt: its number grows with each round,
    and says nothing of how long to wait."""
    if outcome in (Outcome.GPU_REFUSED, Outcome.NEVER_SENT):
        delay = 0.0
    else:
        delay = backoff.delay(1 if outcome is Outcome.NOT_SENT else attempt)
    return {"task_id": task_id, "run_after": now + timedelta(seconds=delay)}


def finish_many(
    conn: Connection,
    *,
    items: list[dict[str, Any]],
    now: datetime,
    backoff: Backoff,
    free: bool = True,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> list[Finish]:
    """Several attempt endings in one transaction (group commit), set-based: a handful of statements for the
    whole burst instead of three per callback. Same outcomes as ``finish_attempt`` one by one (``free``:
    see there; the slots of the attempts applied are then the caller's to free)."""
    ids = [item["task_id"] for item in items]
    if len(items) == 1 or len(set(ids)) != len(ids):  # repeats within a burst: in order, one at a time
        return [
            finish_attempt(conn, now=now, backoff=backoff, free=free, lease_seconds=lease_seconds, **item)
            for item in items
        ]
    prepared = [_params(now=now, backoff=backoff, **item) for item in items]
    final = not any(p["retry"] or p["refund"] or p["expiry"] for p in prepared)
    changed = (end_final_attempts if final else end_attempts)(conn, items=prepared, now=now)
    rows: dict[str, Any] = {}
    if changed != len(items) or any(p["retry"] for p in prepared):
        rows = current_rows(conn, ids)
    results: list[Finish] = []
    applied: dict[Outcome, list[str]] = {}
    retrying: list[dict[str, Any]] = []
    for item, p in zip(items, prepared, strict=True):
        row = rows.get(item["task_id"])
        if changed == len(items) or ended_here(row, item["attempt"], now):
            applied.setdefault(item["outcome"], []).append(item["task_id"])
            results.append(Finish("applied", row.state if row is not None else p["final"], True))
            if row is not None and row.state == TaskState.RETRYING:
                outcome = item["outcome"]
                retrying.append(_retry_at(item["task_id"], item["attempt"], now, backoff, outcome=outcome))
        else:
            results.append(_classify(row, item["attempt"], item["reported"]))
    if retrying:
        conn.execute(_RUN_AFTER, retrying)
    done = [task_id for group in applied.values() for task_id in group]
    if done and free:
        free_slots(conn, task_ids=done, now=now, lease_seconds=lease_seconds)
    for outcome, group in applied.items():
        conn.execute(_HISTORY_MANY, {"ids": group, "now": now, "outcome": outcome.value})
    return results


def free_slots(
    conn: Connection, *, task_ids: list[str], now: datetime, lease_seconds: float = DEFAULT_LEASE_SECONDS
) -> None:
    """Free every slot these tasks hold (their attempts just ended in this transaction): a slot with a
    standby goes to it, for a lease of ``lease_seconds``."""
    params = promote_params(now, lease_seconds)
    conn.execute(FREE_MANY, {"ids": task_ids} | params)
    conn.execute(*promote_tasks(conn, params))


def extend_lease(
    conn: Connection, *, task_id: str, attempt: int, lease_seconds: float, now: datetime
) -> Finish:
    """A ``running`` heartbeat: the attempt keeps its slot for another lease period. A cancelled attempt
    whose slot is still held is not renewed: its lease is the last bound on a GPU that never confirms."""
    running = (
        select(tasks.c.task_id)
        .where(tasks.c.task_id == task_id, tasks.c.state == TaskState.PROCESSING.value)
        .exists()
    )
    res = conn.execute(
        update(slots)
        .where(slots.c.task_id == task_id, slots.c.attempt == attempt, running)
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
    )
    if res.rowcount == 1:
        return Finish("applied", TaskState.PROCESSING.value)
    row = conn.execute(select(tasks.c.state).where(tasks.c.task_id == task_id)).first()
    return Finish("unknown") if row is None else Finish("stale", row.state)


def expired_leases(conn: Connection, *, now: datetime, limit: int = 200) -> list[tuple[str, int]]:
    rows = conn.execute(
        select(slots.c.task_id, slots.c.attempt)
        .where(slots.c.task_id.is_not(None), slots.c.lease_expires_at < now)
        .limit(limit)
    )
    return [(r.task_id, r.attempt) for r in rows]


def cancel_task(conn: Connection, *, task_id: str, now: datetime, backoff: Backoff) -> Finish:
    """Cancel a task wherever it is. One still in Redis gets a tombstone row, so it never runs."""
    row = locked_task(conn, task_id, tasks.c.state, tasks.c.attempt)
    if row is None:
        try:
            with conn.begin_nested():
                conn.execute(
                    insert(tasks).values(
                        task_id=task_id,
                        queue="",
                        type="",
                        state=TaskState.CANCELLED.value,
                        data="{}",
                        max_attempts=0,
                        created_at=now,
                        finished_at=now,
                        updated_at=now,
                        error="cancelled before a dispatcher took it",
                    )
                )
            return Finish("applied", TaskState.CANCELLED.value)
        except IntegrityError:
            # A dispatcher recorded the job (or another cancel its tombstone) between our look and our insert:
            # cancelled as the row it is now. Before: a 500, and the job ran (an outside trial: 38 of 3,800).
            row = locked_task(conn, task_id, tasks.c.state, tasks.c.attempt)
            if row is None:
                raise
    if row.state in TERMINAL:
        # A repeated cancel still says whether the GPU has confirmed the stop (``slot_held``).
        held = row.state == TaskState.CANCELLED and (
            conn.execute(
                select(slots.c.gpu_id).where(slots.c.task_id == task_id, slots.c.attempt == row.attempt)
            ).first()
            is not None
        )
        return Finish("repeat", row.state, held=held)
    if row.state == TaskState.PROCESSING:
        # Ended for the user now; the slot stays held until the GPU confirms the stop (db/cancels.py).
        cancel_running(conn, task_id=task_id, attempt=row.attempt, now=now, error="cancelled by an operator")
        return Finish("applied", TaskState.CANCELLED.value, held=True)
    conn.execute(update(tasks).where(tasks.c.task_id == task_id).values(**ended(TaskState.CANCELLED, now)))
    return Finish("applied", TaskState.CANCELLED.value)


def slot_drift(conn: Connection) -> list[tuple[str, int, str]]:
    """Slots held by a task that is not processing at that attempt: must always be empty. A cancelled
    attempt waiting for its GPU to confirm the stop (a pending cancel, db/cancels.py) is not drift."""
    rows = conn.execute(
        select(slots.c.gpu_id, slots.c.slot_index, slots.c.task_id)
        .select_from(slots.outerjoin(tasks, tasks.c.task_id == slots.c.task_id))
        .where(
            slots.c.task_id.is_not(None),
            (tasks.c.task_id.is_(None))
            | (tasks.c.state.not_in([TaskState.PROCESSING.value, TaskState.CANCELLED.value]))
            | (tasks.c.attempt != slots.c.attempt),
        )
    )
    return [(r.gpu_id, r.slot_index, r.task_id) for r in rows]
