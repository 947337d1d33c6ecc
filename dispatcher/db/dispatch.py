"""Placing jobs: claim slots and record tasks in one transaction.

A claim is ``UPDATE slots SET task_id=… WHERE gpu_id=… AND slot_index=… AND task_id IS NULL``: one row, by
primary key, conditional. Two dispatchers racing for a slot both issue it; the second waits for the first
to commit, re-reads the row and matches nothing, then tries the next slot its Placer proposes. A claimer
only reports "no free slot" after a fresh snapshot (``snapshot.py``) shows none, so contention never looks
like "full".

The hot statements are prebuilt ``text()`` constants: building Core statements per call cost more CPU than
the round trips themselves (measured: ~5 ms of CPU per dispatched job before, see bench/RESULTS.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, insert, select, text

from dispatcher.db.attempts import extend_lease
from dispatcher.db.batch import claim_slots
from dispatcher.db.clock import server_now
from dispatcher.db.engine import naive_utc
from dispatcher.db.known import copy_of, data_json
from dispatcher.db.schema import gpus, tasks
from dispatcher.db.snapshot import free_slot, snapshot, snapshot_ending
from dispatcher.db.task_writes import update_at
from dispatcher.loop.placement import GpuFree, Pick, Placer
from dispatcher.states import RUNNABLE, TaskState
from producer.job import Job, task_id_problem

#: Fresh snapshots a claimer takes when its proposals keep losing races before it calls a pool full.
_REFRESHES = 3

_HELD_BY = text("SELECT COUNT(*) FROM slots WHERE dispatcher_id = :dispatcher_id")


@dataclass(frozen=True, slots=True)
class Placed:
    job: Job
    pool: str
    gpu_id: str
    slot_index: int
    url: str
    attempt: int


@dataclass(slots=True)
class DispatchResult:
    placed: list[Placed] = field(default_factory=list)
    dropped: list[tuple[Job, str]] = field(default_factory=list)  # already known: ack and forget
    deferred: list[Job] = field(default_factory=list)  # recorded as scheduled: ack
    unplaced: list[tuple[Job, str]] = field(default_factory=list)  # (job, pool) no slot: keep in Redis
    # Recorded as running by this very dispatcher in a transaction whose commit we never heard back
    # about: the request may not have been sent yet (the caller knows which it sent).
    mine: list[Placed] = field(default_factory=list)
    # A new job whose task id a different, known task has: dead-letter it ("task id already used").
    refused: list[tuple[Job, str]] = field(default_factory=list)
    # A "retry" (attempt > 0) of a task no dispatcher recorded, whose id today's rules refuse: dead-letter it.
    invalid: list[tuple[Job, str]] = field(default_factory=list)
    # The rows of the last of the statements a caller sent after the placement in its round trip
    # (``handoff_claims.place_fresh``'s ``more``).
    more_rows: list[Any] = field(default_factory=list)


def held_by(conn: Connection, *, dispatcher_id: str) -> int:
    """Slots held by attempts this dispatcher started."""
    return int(conn.execute(_HELD_BY, {"dispatcher_id": dispatcher_id}).scalar_one())


def _claim_all(
    conn: Connection,
    *,
    wanted: list[tuple[Job, str]],
    view: list[GpuFree] | None,
    rng: random.Random,
    now: datetime,
    lease: datetime,
    dispatcher_id: str,
    takeover: list[str],
    avoid: dict[str, str] | None = None,
) -> dict[str, Pick]:
    """Slots for as many of ``wanted`` (job, pool) as the pools have room for, claimed in one statement per
    round. A proposal that lost its slot to another dispatcher is retried on a fresh snapshot. ``takeover``:
    tasks whose attempts this transaction ended and whose slots count as free (see ``snapshot_ending``).
    ``avoid``: task -> the GPU of its last attempt, taken only when no other GPU of its pool has room."""
    avoid = avoid or {}

    def fresh() -> list[GpuFree]:
        return snapshot_ending(conn, ending=takeover).gpus if takeover else snapshot(conn)

    placer = Placer(view if view is not None else fresh(), rng)
    got: dict[str, Pick] = {}
    pending = wanted
    raced = False  # a proposal lost its slot since the last snapshot: "no room" may not be true
    refreshes = 0
    while pending:
        proposals: list[tuple[Job, Pick]] = []
        no_room: list[tuple[Job, str]] = []
        for job, pool in pending:
            pick = placer.take(pool, avoid.get(job.task_id))
            if pick is None:
                no_room.append((job, pool))
            else:
                proposals.append((job, pick))
        if not proposals:
            if not raced or refreshes == _REFRESHES:
                break  # a snapshot with no room left for them (and no race since): really full
            placer, raced, refreshes = Placer(fresh(), rng), False, refreshes + 1
            continue
        claimed = claim_slots(
            conn,
            picks=[
                {
                    "gpu_id": p.gpu_id,
                    "slot_index": p.slot_index,
                    "task_id": j.task_id,
                    "attempt": j.attempt + 1,
                    "url": p.url,
                }
                for j, p in proposals
            ],
            now=now,
            lease=lease,
            dispatcher_id=dispatcher_id,
            takeover=takeover,
        )
        got.update((j.task_id, p) for j, p in proposals if j.task_id in claimed)
        pool_of = {j.task_id: pool for j, pool in pending}
        lost = [(j, pool_of[j.task_id]) for j, _ in proposals if j.task_id not in claimed]
        raced = raced or bool(lost)
        pending = lost + no_room  # the lost ones try the next slots the placer proposes
    return got


def _live_copies_first(items: list[tuple[Job, str]], existing: dict[str, Any]) -> list[tuple[Job, str]]:
    """Copies of one task in one batch (one left behind with its first attempt, and the retry put back in
    Redis): the copy whose attempt the row has first, to be judged first and the rest as repeats of it.
    Judged in the batch's order, the stale copy was dropped and the live one with it as a repeat: the task
    stayed ``queued`` for good (a kill test with standbys on). The batch's order is kept otherwise."""
    first: dict[str, int] = {}
    for i, (job, _) in enumerate(items):
        first.setdefault(job.task_id, i)
    if len(first) == len(items):
        return items

    def key(item: tuple[Job, str]) -> tuple[int, bool]:
        row = existing.get(item[0].task_id)
        return first[item[0].task_id], row is not None and row.attempt != item[0].attempt

    return sorted(items, key=key)


def _triage(
    conn: Connection,
    out: DispatchResult,
    *,
    items: list[tuple[Job, str]],
    existing: dict[str, Any],
    dispatcher_id: str,
    max_attempts: int,
    now: datetime,
    lease_until: datetime,
) -> list[tuple[Job, str]]:
    """Sort out copies of known tasks, our own unacknowledged attempts and scheduled jobs; the rest run."""
    seen: dict[str, Job] = {}
    runnable: list[tuple[Job, str]] = []
    items = _live_copies_first(items, existing)
    for job, pool in items:
        row = existing.get(job.task_id)
        if row is None and job.attempt > 0 and not _as_new_task(job, out):
            continue
        first = seen.get(job.task_id)
        if first is not None:
            if job.attempt == 0 and not _same_job(job, first):
                out.refused.append(
                    (job, f"task id already used by another job in the same batch ({job.task_id})")
                )
            else:
                out.dropped.append((job, "the same task twice in one batch"))
            continue
        seen[job.task_id] = job
        if row is not None and job.attempt == 0 and not copy_of(row, job):
            out.refused.append((job, f"task id already used: task {job.task_id} exists ({row.state})"))
            continue
        if (
            row is not None
            and row.state == TaskState.PROCESSING
            and row.attempt == job.attempt + 1
            and row.dispatcher_id == dispatcher_id
        ):
            # Recorded by a transaction whose answer was lost, maybe seconds ago: its request may go out only
            # now, so the lease restarts now. Left as it was, it could run out while the GPU works on the job
            # and the slot go to a fifth job (test_db_drop: the POST 2.5 s after the claim, a 3 s lease).
            # The renewal is also the check that the attempt still holds its slot: the row above was a plain
            # read, and a sweep may have ended the attempt since; then this copy must not be sent.
            # From the server's time, not ``now``: this transaction may be a rerun after a lost answer,
            # seconds after the ``now`` it was given.
            renewed = extend_lease(
                conn,
                task_id=job.task_id,
                attempt=row.attempt,
                lease_seconds=(lease_until - now).total_seconds(),
                now=max(now, server_now(conn)),
            )
            if renewed.code != "applied":
                out.dropped.append((job, f"the attempt ended meanwhile (task {renewed.state or 'gone'})"))
                continue
            url = conn.execute(select(gpus.c.url).where(gpus.c.gpu_id == row.gpu_id)).scalar_one()
            out.mine.append(Placed(job, row.pool, row.gpu_id, row.slot_index, url, row.attempt))
            continue
        if row is not None and (row.state not in RUNNABLE or row.attempt != job.attempt):
            out.dropped.append((job, f"task is already {row.state} at attempt {row.attempt}"))
            continue
        if job.not_before is not None and naive_utc(job.not_before) > now:
            if _defer(conn, job=job, pool=pool, is_new=row is None, max_attempts=max_attempts, now=now):
                out.deferred.append(job)
            else:
                out.dropped.append((job, "the task changed while it was being rescheduled"))
            continue
        runnable.append((job, pool))
    return runnable


def _as_new_task(job: Job, out: DispatchResult) -> bool:
    """Make ``job``, which names attempts of a task never recorded, a new task (attempt 0); False when it
    cannot be one (its id breaks today's rules: then it is in ``out.invalid``).

    gpuq puts a retry back in Redis only for a task it recorded (``deferred.due_deferred``), so such a job
    was written by its sender (a raw RPUSH). Taken at its word, ``"attempt": 999`` ran as attempt 1000 of
    MAX_ATTEMPTS=3 with no retry left (an outside trial). Changed in place: the caller maps results back to
    its jobs by identity, and a copy parked from here (``to_redis``) then says 0 as well."""
    if problem := task_id_problem(job.task_id):
        # parse_redis_job spares retries the id rules (ids of earlier versions); with no task recorded this
        # is no retry but a new task, and ``a/b`` or ``x%2Fevents`` would be unreachable by id.
        out.invalid.append((job, f"task_id: {problem} (attempt {job.attempt} of a task never recorded)"))
        return False
    job.attempt = 0
    return True


def dispatch(
    conn: Connection,
    *,
    items: list[tuple[Job, str]],
    dispatcher_id: str,
    lease_seconds: float,
    max_attempts: int,
    now: datetime,
    view: list[GpuFree] | None = None,
    check_existing: bool = False,
    rng: random.Random | None = None,
    takeover: list[str] | None = None,
) -> DispatchResult:
    """Record ``items`` (job, pool) and give each a slot; see DispatchResult for what becomes of each.

    ``view`` is a recent ``snapshot`` (it may be stale: claims are checked). Fresh jobs (attempt 0) are
    inserted without looking first; if one turns out to be known the INSERT fails and the caller runs this
    again with ``check_existing`` (the rare path: duplicates, tombstones, unacknowledged commits).
    ``takeover``: see ``_claim_all`` (a hand-off; ``view`` then comes from ``snapshot_ending``).
    """
    out = DispatchResult()
    if check_existing or any(job.attempt > 0 for job, _ in items):
        existing = {
            r.task_id: r
            for r in conn.execute(
                select(
                    tasks.c.task_id,
                    tasks.c.state,
                    tasks.c.attempt,
                    tasks.c.dispatcher_id,
                    tasks.c.gpu_id,
                    tasks.c.slot_index,
                    tasks.c.pool,
                    tasks.c.type,
                    tasks.c.data,
                    tasks.c.enqueued_at,
                ).where(tasks.c.task_id.in_([job.task_id for job, _ in items]))
            )
        }
    else:
        existing = {}
    lease_until = now + timedelta(seconds=lease_seconds)
    new_rows: list[dict[str, object]] = []
    runnable = _triage(
        conn,
        out,
        items=items,
        existing=existing,
        dispatcher_id=dispatcher_id,
        max_attempts=max_attempts,
        now=now,
        lease_until=lease_until,
    )
    picks = _claim_all(
        conn,
        wanted=runnable,
        view=view,
        rng=rng or random.Random(),  # noqa: S311 - tie-breaking
        now=now,
        lease=lease_until,
        dispatcher_id=dispatcher_id,
        takeover=takeover or [],
        # a retry goes elsewhere where it can: the GPU that failed it may fail it again
        avoid={j.task_id: r.gpu_id for j, _ in runnable if (r := existing.get(j.task_id)) and r.gpu_id},
    )
    for job, pool in runnable:
        pick = picks.get(job.task_id)
        if pick is None:
            out.unplaced.append((job, pool))
            continue
        attempt = job.attempt + 1
        running = {
            "state": TaskState.PROCESSING.value,
            "attempt": attempt,
            "gpu_id": pick.gpu_id,
            "slot_index": pick.slot_index,
            "dispatcher_id": dispatcher_id,
            "started_at": now,
            "run_after": None,
            "last_callback": None,
            "updated_at": now,
        }
        if job.task_id not in existing:
            new_rows.append(new_row(job, pool, max_attempts, now) | running)
        else:
            res = conn.execute(update_at(job.task_id, job.attempt, RUNNABLE).values(**running))
            if res.rowcount != 1:  # another dispatcher got there between our read and this write
                free_slot(conn, task_id=job.task_id, attempt=attempt, now=now)
                out.dropped.append((job, "taken by another dispatcher"))
                continue
        out.placed.append(Placed(job, pool, pick.gpu_id, pick.slot_index, pick.url, attempt))
    if new_rows:
        conn.execute(insert(tasks), new_rows)
    return out


def _same_job(a: Job, b: Job) -> bool:
    return (a.enqueued_at, a.type, a.data) == (b.enqueued_at, b.type, b.data)


def new_row(job: Job, pool: str, max_attempts: int, now: datetime) -> dict[str, object]:
    return {
        "task_id": job.task_id,
        "queue": job.queue,
        "type": job.type,
        "pool": pool,
        "priority": job.priority.value,
        "data": data_json(job),
        "max_attempts": max_attempts,
        "enqueued_at": naive_utc(job.enqueued_at),
        "created_at": now,
    }


def _defer(conn: Connection, *, job: Job, pool: str, is_new: bool, max_attempts: int, now: datetime) -> bool:
    """Record a job whose time has not come as ``scheduled``; False when a known task changed meanwhile
    (cancelled, or placed by another dispatcher): then this copy is not the task's to reschedule."""
    assert job.not_before is not None
    values = {
        "state": TaskState.SCHEDULED.value,
        "attempt": job.attempt,
        "run_after": naive_utc(job.not_before),
        "updated_at": now,
    }
    if is_new:
        conn.execute(insert(tasks).values(**new_row(job, pool, max_attempts, now), **values))
        return True
    return conn.execute(update_at(job.task_id, job.attempt, RUNNABLE).values(**values)).rowcount == 1
