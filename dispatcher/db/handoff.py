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
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from dispatcher.db.attempts import Backoff, Finish, finish_many, free_slots
from dispatcher.db.dispatch import DispatchResult, dispatch
from dispatcher.db.snapshot import snapshot, snapshot_ending
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
) -> HandOff:
    """End ``items`` (see ``finish_many``); then, if a slot was freed, place as many ``candidates``
    ((job, pool), oldest first) as the pools have room for. Candidates not placed are in ``result.unplaced``
    or not in the result at all (their pool had no room): the caller keeps them."""
    if not candidates:  # nothing to hand off: end, free, and count the room for the loop
        out = HandOff(finish_many(conn, items=items, now=now, backoff=backoff))
        if any(f.freed for f in out.finishes):
            out.free = {pool: n for pool, n in capacity(snapshot(conn)).items() if n > 0}
            out.freed_pools = set(out.free)
        return out
    out = HandOff(finish_many(conn, items=items, now=now, backoff=backoff, free=False))
    done = zip(items, out.finishes, strict=True)
    ending = list(dict.fromkeys(item["task_id"] for item, f in done if f.freed))
    if not ending:
        return out
    seen = snapshot_ending(conn, ending=ending)
    free = capacity(seen.gpus)
    out.freed_pools = {pool for pool, n in free.items() if n > 0}
    room = dict(free)
    chosen = []
    ended = set(ending)
    for job, pool in candidates:
        # A copy of a task ending here stays out: its slot would be freed with the ending attempt's below.
        if room.get(pool, 0) > 0 and job.task_id not in ended:
            room[pool] -= 1
            chosen.append((job, pool))
    taken_over = 0
    if chosen:
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
    if taken_over < seen.ending_total:  # slots not handed to a job (no candidate, GPU out of rotation, ...)
        free_slots(conn, task_ids=ending)
    out.free = {pool: n for pool, n in free.items() if n > 0}
    return out
