"""Jobs left in a queue that no running dispatcher serves any more: said, not left to wait in silence.

A queue taken out of every dispatcher's TASK_QUEUES (or a dispatcher of its own stopped for good) keeps its
jobs: those already in its Redis lists, and its scheduled and retrying tasks, which come due into those
lists. Nothing took them and nothing said so (an outside review). Each heartbeat records when its queues
were last served (``Keys.queues_seen``); housekeeping looks once a minute at the queues served within the
last week and not for a minute now (a restart's gap is not an alarm), and logs a warning per such queue
that holds jobs, every ten minutes while it lasts, with ``gpuq_unserved_jobs{queue}``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, select

from dispatcher.db.schema import tasks
from dispatcher.queues.presence import as_str
from dispatcher.states import DEFERRED
from producer.keys import Keys, queue_lists

#: A queue not served for this long is looked at (shorter: a dispatcher's restart).
UNSERVED_AFTER_SECONDS = 60.0
#: Queues last served longer ago than this are forgotten: what they hold was said for a week.
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
    """Queues served within the week and not for UNSERVED_AFTER_SECONDS, that hold jobs. ``db`` runs a
    store function (``Runtime.db``)."""
    now = time.time() if now is None else now
    seen = {as_str(q): float(t) for q, t in (await redis.hgetall(keys.queues_seen)).items()}
    forgotten = [q for q, t in seen.items() if now - t > FORGET_AFTER_SECONDS]
    if forgotten:
        await redis.hdel(keys.queues_seen, *forgotten)
    candidates = {q: t for q, t in seen.items() if UNSERVED_AFTER_SECONDS < now - t <= FORGET_AFTER_SECONDS}
    if not candidates:
        return []
    served = await served_by_the_running(redis, keys)
    candidates = {q: t for q, t in candidates.items() if q not in served}
    if not candidates:
        return []
    deferred = await db(deferred_counts, queues=sorted(candidates))
    found = []
    for queue, since in sorted(candidates.items()):
        waiting = 0
        for name in queue_lists(queue):
            waiting += int(await redis.llen(name))
        if waiting or deferred.get(queue):
            found.append(Unserved(queue, waiting, deferred.get(queue, 0), since))
    return found


def deferred_counts(conn: Connection, *, queues: list[str]) -> dict[str, int]:
    """Scheduled and retrying tasks of these queues."""
    rows = conn.execute(
        select(tasks.c.queue, func.count())
        .where(tasks.c.state.in_([s.value for s in DEFERRED]), tasks.c.queue.in_(queues))
        .group_by(tasks.c.queue)
    )
    return {r[0]: int(r[1]) for r in rows}


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
