"""Ending attempts and starting the next jobs on the freed slots in one transaction (slot hand-off).

The attempts end exactly as in ``finish_many``, their slots still held. One snapshot of the eligible GPUs
(active, healthy, with a free slot) is read in the same transaction, counting the slots of the attempts just
ended as free (``snapshot_ending``), and the candidate jobs are placed by ``dispatch`` on it: least-loaded
GPU first, each claim the conditional ``UPDATE … WHERE task_id IS NULL`` of any placement, which also takes
a slot still held by an attempt this transaction ended (``claim_slots(takeover=…)``). A freed slot thus goes
from one job to the next in one statement, and only slots no job took are freed after it: at saturation the
transaction is end, history, snapshot, claim, insert, COMMIT (it was also a free before the snapshot).
When jobs wait, every GPU of the pool is full, so the freed slots are the free ones and the job lands on one
of them; when the pool is not saturated (a GPU just
added, another dispatcher's slot freed) it lands where the loop would have put it. Drained and unhealthy
GPUs are not in the snapshot, so they get nothing.

One COMMIT then covers the end of one job and the start of the next.

Round trips (issue 12: on a loaded box each one waits for a MariaDB thread to be scheduled). When every
attempt of the batch ends for good (the ``finished`` callbacks of a saturated fleet), the end, its history
rows and the snapshot go out in one round trip (``db/pipeline.py``): the snapshot is read as if every attempt
of the batch ended, and the history rows are those of the attempts this transaction did end (``updated_at``
is ``now`` exactly, the test ``finish_many`` uses). When the end changed every row, that is exactly what
ended and the snapshot is right; otherwise (a stale or repeated callback in the batch) the snapshot is thrown
away and read again for the attempts that did end, so a slot still held by a live attempt is never taken
over. Fresh jobs are then placed by ``handoff_claims.place_fresh``: the claim, the new tasks' INSERT, the
free of ended slots no job took, the read of who won and the COMMIT in one more round trip (two in all, at
saturation); other jobs go through ``dispatch``. A batch with no job to hand off sends the end, history, the
free of the slots this transaction ended (checked the same way), the snapshot that counts the room left and,
on the hot thread, its COMMIT as one query.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, text

from dispatcher.db.attempts import (
    Backoff,
    Finish,
    _classify,
    _params,
    current_rows,
    ended_here,
    finish_many,
    free_slots,
)
from dispatcher.db.batch import case_by, end_final_statement, statement
from dispatcher.db.dispatch import DispatchResult, dispatch
from dispatcher.db.handoff_claims import FOLD_BYTES, fits, place_fresh
from dispatcher.db.pipeline import Outcome, may_commit, pipeline
from dispatcher.db.promote import PROMOTE_SETS, promote_params, promote_tasks
from dispatcher.db.schema import Timestamp
from dispatcher.db.snapshot import (
    ENDING_TOTAL,
    SNAPSHOT,
    SNAPSHOT_ENDING,
    EndingView,
    ending_view,
    free_view,
    snapshot,
    snapshot_ending,
)
from dispatcher.db.standby import Bound, NextBind, bind_next_statements, next_bound
from dispatcher.loop.placement import capacity
from producer.job import Job


@dataclass(slots=True)
class HandOff:
    finishes: list[Finish]
    result: DispatchResult | None = None  # what became of the candidates placed (None: none tried)
    # Free slots per pool once the candidates were placed: room the dispatch loop should fill. Empty when
    # nothing was freed (then nobody needs to look).
    free: dict[str, int] = field(default_factory=dict)
    # Pools that had a free slot right after the attempts ended: slots are being freed there.
    freed_pools: set[str] = field(default_factory=set)
    # The next standbys recorded on slots this transaction gave to standbys sent early (``binds``).
    bound: list[Bound] = field(default_factory=list)
    more_rows: list[Any] = field(default_factory=list)  # what the last statement sent after the free read


def end_and_hand_off(
    conn: Connection,
    *,
    items: list[dict[str, Any]],
    now: datetime,
    backoff: Backoff,
    candidates: list[tuple[Job, str]],
    check_existing: bool,
    dispatcher_id: str,
    lease_seconds: float,
    max_attempts: int,
    rng: random.Random,
    fold: bool = True,
    fold_bytes: int = FOLD_BYTES,
    binds: Sequence[NextBind] = (),
) -> HandOff:
    """End ``items`` (see ``finish_many``); then, if a slot was freed, place as many ``candidates``
    ((job, pool), oldest first) as the pools have room for. Candidates not placed are in ``result.unplaced``
    or not in the result at all (their pool had no room): the caller keeps them. ``fold`` False: the end,
    its history, the free and the snapshot one after the other, as before ``_end_folded`` (benchmarks,
    tests). ``binds``: standbys to record on the slots of standbys sent early, once this transaction has
    promoted those (``db/standby.py``): after the free, in its round trip where it can."""
    more, more_bytes = (
        bind_next_statements(conn, binds, dispatcher_id=dispatcher_id, max_attempts=max_attempts, now=now)
        if binds
        else ([], 0)
    )
    if not candidates:  # nothing to hand off: end, free, and count the room for the loop
        out = _end_and_free(
            conn, items=items, now=now, backoff=backoff, fold=fold, lease_seconds=lease_seconds, more=more
        )
        out.bound = next_bound(binds, out.more_rows) if binds else []
        return out
    seen: EndingView | None = None
    ids = [item["task_id"] for item in items]
    after = [(SNAPSHOT_ENDING, {"ending": ids})]
    folded = _end_folded(conn, items=items, now=now, backoff=backoff, after=after) if fold else None
    if folded is not None:
        finishes, ending, res = folded
        if len(ending) == len(ids):  # every attempt ended here: the snapshot read is the right one
            seen = _seen(conn, res[0].rows, ids)
    else:
        finishes = finish_many(
            conn, items=items, now=now, backoff=backoff, free=False, lease_seconds=lease_seconds
        )
        done = zip(items, finishes, strict=True)
        ending = list(dict.fromkeys(item["task_id"] for item, f in done if f.freed))
    out = HandOff(finishes)
    if not ending:  # nothing ended here (a rerun of a batch whose first run committed unanswered, ...)
        out.bound = _bind_after(conn, binds, more)  # what such a first run bound
        return out
    if seen is None:
        seen = snapshot_ending(conn, ending=ending)
    free = capacity(seen.gpus)
    out.freed_pools = {pool for pool, n in free.items() if n > 0}
    chosen = _choose(candidates, free, set(ending))
    taken_over = 0
    freed = False  # the slots no job took are free already (``place_fresh``)
    if chosen:
        if fold and fits(conn, chosen, check_existing=check_existing, now=now):
            out.result = place_fresh(
                conn,
                chosen=chosen,
                seen=seen,
                ending=ending,
                dispatcher_id=dispatcher_id,
                lease_seconds=lease_seconds,
                max_attempts=max_attempts,
                now=now,
                rng=rng,
                max_bytes=fold_bytes,
                more=more,
                more_bytes=more_bytes,
            )
            freed = out.result is not None
            if out.result is not None and more:  # sent with the placement
                out.bound, more = next_bound(binds, out.result.more_rows), []
        if out.result is None:
            out.result = dispatch(
                conn,
                items=chosen,
                dispatcher_id=dispatcher_id,
                lease_seconds=lease_seconds,
                max_attempts=max_attempts,
                now=now,
                view=seen.gpus,
                check_existing=check_existing,
                rng=rng,
                takeover=ending,
            )
        started = Counter(p.pool for p in out.result.placed)
        free = {pool: n - started.get(pool, 0) for pool, n in free.items()}
        taken_over = sum((p.gpu_id, p.slot_index) in seen.ending_slots for p in out.result.placed)
    if taken_over < seen.ending_total and not freed:  # slots no job took (no candidate, GPU drained, ...)
        free_slots(conn, task_ids=ending, now=now, lease_seconds=lease_seconds)
    out.bound += _bind_after(conn, binds, more)  # not sent with the placement: after it, on their own
    out.free = {pool: n for pool, n in free.items() if n > 0}
    return out


def _bind_after(conn: Connection, binds: Sequence[NextBind], more: list[Any]) -> list[Bound]:
    """Send ``more`` (``bind_next_statements``) on its own; what is bound. Safe to run twice (the binding
    needs a slot with no standby, the INSERT an unknown id): its last statement reports both runs' binds."""
    return next_bound(binds, pipeline(conn, more)[-1].rows) if more else []


def _choose(
    candidates: list[tuple[Job, str]], free: dict[str, int], ended: set[str]
) -> list[tuple[Job, str]]:
    """The candidates, oldest first, that the pools' room takes. A copy of a task ending here stays out: its
    slot would be freed with the ending attempt's."""
    room = dict(free)
    chosen = []
    for job, pool in candidates:
        if room.get(pool, 0) > 0 and job.task_id not in ended:
            room[pool] -= 1
            chosen.append((job, pool))
    return chosen


def _end_folded(
    conn: Connection,
    *,
    items: list[dict[str, Any]],
    now: datetime,
    backoff: Backoff,
    after: list[tuple[Any, dict[str, Any]]],
    commit: bool = False,
) -> tuple[list[Finish], list[str], list[Outcome]] | None:
    """End a batch of final attempts (distinct tasks), write their history rows and run ``after`` in one
    round trip; returns the finishes, the tasks whose attempts ended, and the outcomes of ``after``. None
    when the batch is not of that kind (a retry, refund or lease expiry, or one task twice): ``finish_many``
    handles it. What ``after`` read assumed every attempt ended unless it checks itself (``_free_ended``).
    ``commit``: the transaction ends with that round trip (``pipeline``), the rows that tell which attempts
    ended read in it too, so nothing is sent after it."""
    ids = [item["task_id"] for item in items]
    if len(set(ids)) != len(ids):
        return None
    prepared = [_params(now=now, backoff=backoff, **item) for item in items]
    if any(p["retry"] or p["refund"] or p["expiry"] for p in prepared):
        return None
    end = end_final_statement(items=prepared, now=now)
    reads = [(CURRENT, {"ids": ids})] if commit else []
    res = pipeline(conn, [end, _history_of_ended(items, prepared, now), *after, *reads], commit=commit)
    outcomes = res[2 : 2 + len(after)]
    if res[0].rowcount == len(items):  # every attempt ended here
        return [Finish("applied", str(p["final"]), True) for p in prepared], ids, outcomes
    current = {r.task_id: r for r in res[-1].rows} if commit else current_rows(conn, ids)
    finishes, ending = [], []
    for item in items:
        row = current.get(item["task_id"])
        if ended_here(row, item["attempt"], now):
            finishes.append(Finish("applied", str(row.state), True))
            ending.append(item["task_id"])
        else:
            finishes.append(_classify(row, item["attempt"], item["reported"]))
    return finishes, ending, outcomes


def _seen(conn: Connection, rows: list[Any], ending: list[str]) -> EndingView:
    """``snapshot_ending`` from the rows of ``SNAPSHOT_ENDING`` read already."""
    if not rows:  # no eligible GPU with room (all drained, say): count the slots to free on their own
        return EndingView([], set(), int(conn.execute(ENDING_TOTAL, {"ending": ending}).scalar_one()))
    return ending_view(rows, int(rows[0].ending_total))


#: ``current_rows`` as a statement of a pipeline.
CURRENT = text(
    "SELECT task_id, state, attempt, last_callback, updated_at FROM tasks WHERE task_id IN :ids"
).bindparams(bindparam("ids", expanding=True))

_FREE_ENDED = text(
    f"UPDATE slots SET {PROMOTE_SETS} WHERE task_id IN :ids AND EXISTS (SELECT 1 FROM tasks t"  # noqa: S608
    " WHERE t.task_id = slots.task_id AND t.attempt = slots.attempt AND t.updated_at = :now"
    " AND t.state <> 'processing')"
).bindparams(
    bindparam("ids", expanding=True), bindparam("now", type_=Timestamp), bindparam("lease", type_=Timestamp)
)


def _end_and_free(
    conn: Connection,
    *,
    items: list[dict[str, Any]],
    now: datetime,
    backoff: Backoff,
    fold: bool,
    lease_seconds: float,
    more: list[tuple[Any, dict[str, Any]]],
) -> HandOff:
    """A batch with no job to hand off: end the attempts, free their slots and count the room left for the
    loop. Folded: the end, history, free and snapshot in one round trip; the free, like the history, only
    touches what this transaction ended, so the snapshot after it is right whatever applied. ``more`` go
    out after them, in the same round trip (the rows of the last in ``more_rows``)."""
    free = _free_ended(items, now, lease_seconds)
    after = [free, promote_tasks(conn, free[1]), (SNAPSHOT, {}), *more]
    folded = (
        _end_folded(conn, items=items, now=now, backoff=backoff, after=after, commit=may_commit(conn))
        if fold
        else None
    )
    if folded is not None:
        out = HandOff(folded[0])
        view = free_view(folded[2][2].rows)
        if more:
            out.more_rows = folded[2][-1].rows
    else:
        out = HandOff(finish_many(conn, items=items, now=now, backoff=backoff, lease_seconds=lease_seconds))
        view = snapshot(conn) if any(f.freed for f in out.finishes) else []
        if more:
            out.more_rows = pipeline(conn, more)[-1].rows
    if any(f.freed for f in out.finishes):
        out.free = {pool: n for pool, n in capacity(view).items() if n > 0}
        out.freed_pools = set(out.free)
    return out


def _free_ended(
    items: list[dict[str, Any]], now: datetime, lease_seconds: float
) -> tuple[Any, dict[str, Any]]:
    """Free the slots of the attempts of ``items`` that this transaction ended (sent before knowing which
    did: the task's row says it, as for the history rows), and only those: a stale callback's task keeps
    its live slot."""
    return _FREE_ENDED, {"ids": [item["task_id"] for item in items]} | promote_params(now, lease_seconds)


def _history_of_ended(
    items: list[dict[str, Any]], prepared: list[dict[str, Any]], now: datetime
) -> tuple[Any, dict[str, Any]]:
    """The history rows (``attempts``) of the attempts of ``items`` that this transaction ended, sent before
    knowing which did: a task's row says it (changed at ``now`` exactly, at that attempt, no longer
    processing), as ``finish_many`` tells them apart when not all applied."""
    ids = [item["task_id"] for item in items]
    params: dict[str, Any] = {"now": now, "ids": ids}
    for i, task_id in enumerate(ids):
        params[f"k_{i}"] = task_id
    outcome = case_by("task_id", [str(item["outcome"].value) for item in items], "outcome", params)
    attempt = case_by("task_id", [p["attempt"] for p in prepared], "attempt", params)
    # Only this module's fragments and :placeholders go into the SQL; values are bound.
    sql = (
        "INSERT INTO attempts (task_id, attempt, gpu_id, slot_index, started_at, ended_at, outcome, error)"  # noqa: S608
        f" SELECT task_id, attempt, gpu_id, slot_index, started_at, :now, {outcome}, error"
        f" FROM tasks WHERE task_id IN :ids AND attempt = {attempt} AND updated_at = :now"
        " AND state <> 'processing'"
    )
    return statement(sql, stamps=("now",), lists=("ids",)), params
