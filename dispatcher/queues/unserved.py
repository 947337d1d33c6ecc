"""Jobs left in a queue that no running dispatcher serves any more: said, not left to wait in silence.

A queue taken out of every dispatcher's TASK_QUEUES (or a dispatcher of its own stopped for good) keeps its
jobs: those already in its Redis lists, and its scheduled and retrying tasks, which come due into those
lists. Nothing took them and nothing said so (an outside review). Each heartbeat records when its queues
were last served (``Keys.queues_seen``); housekeeping looks once a minute at the queues served within the
not for a minute now (a restart's gap is not an alarm), and logs a warning per such queue that holds jobs
(in its lists, parked or set aside, or scheduled in the database), every ten minutes while it lasts, with
``gpuq_unserved_jobs{queue}``. A queue is forgotten a week after it was last served if it holds nothing.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, select

from dispatcher.db.schema import gpus, tasks
from dispatcher.gpus.endpoints import DEFAULT_POOL
from dispatcher.queues.presence import as_str
from dispatcher.states import DEFERRED
from producer.keys import PRIORITY_ORDER, Keys, queue_lists

#: A queue not served for this long is looked at (shorter: a dispatcher's restart).
UNSERVED_AFTER_SECONDS = 60.0
#: A queue last served longer ago than this that holds nothing is forgotten (one that holds jobs never is).
FORGET_AFTER_SECONDS = 7 * 86400.0


@dataclass(frozen=True, slots=True)
class Unserved:
    queue: str
    waiting: int  # jobs in its Redis lists
    deferred: int  # its scheduled and retrying tasks (the database)
    since: float  # when a running dispatcher last served it (unix seconds)


async def served_by_the_running(redis: Any, keys: Keys) -> set[str]:
    """The queues of the dispatchers whose heartbeat is alive."""
    served: set[str] = set()
    for who, raw in (await redis.hgetall(keys.owner_queues)).items():
        if not await redis.exists(keys.alive(as_str(who))):
            continue
        try:
            names = json.loads(raw)
        except ValueError:
            continue
        if isinstance(names, list):
            served.update(q for q in names if isinstance(q, str))
    return served


async def find_unserved(redis: Any, keys: Keys, db: Any, now: float | None = None) -> list[Unserved]:
    """Queues once served and not for UNSERVED_AFTER_SECONDS, that hold jobs. ``db`` runs a store function
    (``Runtime.db``)."""
    now = time.time() if now is None else now
    seen, unreadable = _read_seen(await redis.hgetall(keys.queues_seen))
    if unreadable:
        await redis.hdel(keys.queues_seen, *unreadable)
    candidates = {q: t for q, t in seen.items() if now - t > UNSERVED_AFTER_SECONDS}
    if not candidates:
        return []
    served = await served_by_the_running(redis, keys)
    candidates = {q: t for q, t in candidates.items() if q not in served}
    if not candidates:
        return []
    deferred, pools = await db(deferred_counts, queues=sorted(candidates))
    found, forgotten = [], []
    for queue, since in sorted(candidates.items()):
        waiting = await _waiting(redis, keys, queue, pools)
        if waiting or deferred.get(queue):
            found.append(Unserved(queue, waiting, deferred.get(queue, 0), since))
        elif now - since > FORGET_AFTER_SECONDS:
            forgotten.append(queue)
    if forgotten:
        await redis.hdel(keys.queues_seen, *forgotten)
    return found


def _read_seen(raw: dict[Any, Any]) -> tuple[dict[str, float], list[Any]]:
    """The hash as queue -> unix seconds, and the fields that are not that (removed): one value that is not a
    number stopped every dispatcher's housekeeping, and so the dispatchers (an outside trial)."""
    seen: dict[str, float] = {}
    unreadable: list[Any] = []
    for field, value in raw.items():
        try:
            name = field.decode() if isinstance(field, bytes) else field
            when = float(value.decode() if isinstance(value, bytes) else value)
        except ValueError:  # UnicodeDecodeError too: a name that is not UTF-8 is no queue's
            unreadable.append(field)
            continue
        if not math.isfinite(when):
            unreadable.append(field)
            continue
        seen[name] = when
    return seen, unreadable


async def _waiting(redis: Any, keys: Keys, queue: str, pools: list[str]) -> int:
    """Jobs of ``queue`` in Redis: its lists, and what dispatchers parked or set aside per pool (``pools``:
    every pool the database knows) that only a dispatcher serving the queue takes back."""
    names = list(queue_lists(queue))
    for pool in pools:
        names.append(keys.parked(queue, pool))
        names.extend(keys.aside(queue, priority, pool) for priority in PRIORITY_ORDER)
    pipe = redis.pipeline(transaction=False)  # one round trip (a cluster client's splits it per node)
    for name in names:
        pipe.llen(name)
    return sum(int(n) for n in await pipe.execute())


def deferred_counts(conn: Connection, *, queues: list[str]) -> tuple[dict[str, int], list[str]]:
    """Scheduled and retrying tasks of these queues, and the pools of the fleet (with ``default``)."""
    rows = conn.execute(
        select(tasks.c.queue, func.count())
        .where(tasks.c.state.in_([s.value for s in DEFERRED]), tasks.c.queue.in_(queues))
        .group_by(tasks.c.queue)
    )
    counts = {r[0]: int(r[1]) for r in rows}
    pools = {r[0] for r in conn.execute(select(gpus.c.pool).distinct())}
    return counts, sorted(pools | {DEFAULT_POOL})


def message(u: Unserved, served: list[str]) -> str:
    """The warning's line: what waits, since when, and what to do."""
    held = []
    if u.waiting:
        held.append(f"{u.waiting} waiting job{'s' if u.waiting != 1 else ''}")
    if u.deferred:
        held.append(f"{u.deferred} scheduled or retrying task{'s' if u.deferred != 1 else ''}")
    minutes = max(1, round((time.time() - u.since) / 60))
    return (
        f"queue {u.queue!r} holds {' and '.join(held)}, but no running dispatcher has served it for"
        f" {minutes} min (this one serves {', '.join(served)}): add it to a dispatcher's TASK_QUEUES,"
        " or they never run"
    )
