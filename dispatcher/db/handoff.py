"""Ending attempts and starting the next jobs on the freed slots in one transaction (slot hand-off).

The attempts end exactly as in ``finish_many``. If that freed a slot, one snapshot of the eligible GPUs
(active, healthy, with a free slot) is read in the same transaction, so it sees the slots just freed, and
the candidate jobs are placed by ``dispatch`` on it: least-loaded GPU first, each claim the conditional
``UPDATE … WHERE task_id IS NULL`` of any placement. When jobs wait, every GPU of the pool is full, so the
freed slots are the free ones and the job lands on one of them; when the pool is not saturated (a GPU just
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

from dispatcher.db.attempts import Backoff, Finish, finish_many
from dispatcher.db.dispatch import DispatchResult, dispatch, snapshot
from dispatcher.placement import capacity
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
    out = HandOff(finish_many(conn, items=items, now=now, backoff=backoff))
    if not any(f.freed for f in out.finishes):
        return out
    view = snapshot(conn)
    free = capacity(view)
    out.freed_pools = {pool for pool, n in free.items() if n > 0}
    room = dict(free)
    chosen = []
    for job, pool in candidates:
        if room.get(pool, 0) > 0:
            room[pool] -= 1
            chosen.append((job, pool))
    if chosen:
        out.result = dispatch(
            conn,
            items=chosen,
            dispatcher_id=dispatcher_id,
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
            now=now,
            view=view,
            check_existing=check_existing,
            rng=rng,
        )
        started = Counter(p.pool for p in out.result.placed)
        free = {pool: n - started.get(pool, 0) for pool, n in free.items()}
    out.free = {pool: n for pool, n in free.items() if n > 0}
    return out
