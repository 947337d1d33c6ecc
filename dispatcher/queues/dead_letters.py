"""Jobs that cannot run go to the dead-letter list with their reason (SPEC §7), whatever made them fail: a
rule of ``producer/job.py`` they break, a task id already used, or an exception no rule foresaw. One job's
content never stops the dispatch loop, nor blocks the jobs behind it, nor comes back after a restart."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import cast

import orjson
from redis import Redis as SyncRedis

from dispatcher.errors import TRANSIENT
from dispatcher.metrics import Metrics
from dispatcher.queues.intake import Settlement, Taken
from producer.errors import InvalidJob
from producer.job import Job, parse_redis_job
from producer.keys import Keys

log = logging.getLogger("gpuq.dispatcher")


def dead_letter(
    s: Settlement, metrics: Metrics, element: str, queue: str | None, reason: str, *, reused: bool = False
) -> None:
    """Add the job held as ``element`` to ``s``'s dead letters: off the processing list, with its reason."""
    s.dead.append((element, element.partition("\n")[2], queue, reason))
    metrics.dead_letters.inc()
    if reused:
        metrics.task_ids_reused.inc()
    log.error(
        "job moved to the dead-letter list", extra={"action": "dead_letter", "queue": queue, "reason": reason}
    )


def reason(exc: BaseException) -> str:
    if isinstance(exc, InvalidJob):
        return exc.message
    return f"{type(exc).__name__}: {str(exc)[:500]}"


async def isolate(
    held: list[Taken],
    alone: Callable[[Taken], Awaitable[object]],
    settle: Callable[[Settlement], Awaitable[None]],
    metrics: Metrics,
) -> None:
    """After a pass failed in a way no rule foresaw: run its jobs (still held) one by one; the one that fails
    alone is dead-lettered with the exception as its reason. A store error stops this: the stores, not a job,
    are at fault, and the next pass isolates what is left."""
    for t in held:
        try:
            await alone(t)
        except TRANSIENT:
            raise
        except Exception as exc:
            log.exception("a job failed alone", extra={"action": "isolate"})
            bad = Settlement()
            dead_letter(bad, metrics, t.element, t.queue, f"could not be dispatched: {reason(exc)}")
            await settle(bad)


def prepare(
    taken: list[Taken], *, max_bytes: int, pool_for: Callable[[str], str], metrics: Metrics
) -> tuple[list[tuple[Job, str, str]], Settlement]:
    """Parse taken jobs: (job, pool, processing-list element) for each good one; the settlement moves
    bad ones to the dead-letter list and writes made-up ids into Redis before the database sees them."""
    prepared = Settlement()
    items: list[tuple[Job, str, str]] = []
    for t in taken:
        try:
            queue = t.queue or queue_in_body(t.raw)
            job, made_up = parse_redis_job(t.raw, queue or "unknown", max_bytes=max_bytes)
            element = t.element
            if made_up:  # give it its id (and enqueue time) in Redis before the database hears of it
                element = f"{t.source}\n{job.to_redis()}"
            item = (job, pool_for(job.type), element)
        except Exception as exc:  # InvalidJob, or whatever else this one job's content provokes
            dead_letter(prepared, metrics, t.element, t.queue, reason(exc))
            continue
        if element != t.element:
            prepared.restamp.append((t.element, element))
        items.append(item)
    return items, prepared


#: Characters of the biggest job a dispatcher writes: MAX_JOB_BYTES' upper bound and the rewrite allowance.
_LARGEST_JOB = 8 * 1024 * 1024 + 2048


def claimed(raw: str) -> tuple[str, int] | None:
    """The task id and attempt a dead-lettered job's body names, read as leniently as the dispatcher wrote
    them (``task_id`` at the top or in ``data``, ``attempt`` 0 when absent); None when it names none, or
    is bigger than any job a dispatcher writes (MAX_JOB_BYTES is at most 8 MiB): a hostile 20 MB job is
    not parsed for this."""
    if len(raw) > _LARGEST_JOB:
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(value, dict):
        return None
    data = value.get("data")
    task_id = value.get("task_id") or (data.get("task_id") if isinstance(data, dict) else None)
    attempt = value.get("attempt", 0)
    if not isinstance(task_id, str) or type(attempt) is not int:
        return None
    return task_id, attempt


def queue_in_body(raw: str) -> str | None:
    """The ``queue`` a job's body names (a parked job's dead letter records no list): None when none."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    queue = value.get("queue") if isinstance(value, dict) else None
    return queue if isinstance(queue, str) else None


def listed(client: SyncRedis, keys: Keys) -> list[bytes]:
    """Every entry of the dead-letter list, oldest first (``gpuq queue list --dead``)."""
    return cast(list[bytes], client.lrange(keys.dead, 0, -1))


def purge(client: SyncRedis, keys: Keys) -> list[bytes]:
    """Empty the dead-letter list and return what it held: read and delete in one MULTI, so an entry added
    meanwhile is either returned or kept, never lost unseen (``gpuq queue purge --dead --yes``)."""
    pipe = client.pipeline(transaction=True)
    pipe.lrange(keys.dead, 0, -1)
    pipe.delete(keys.dead)
    entries, _ = pipe.execute()
    return cast(list[bytes], entries)
