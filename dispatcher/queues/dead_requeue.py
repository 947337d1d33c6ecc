"""The operator's side of the dead-letter list (``Keys.dead``): its entries read back one by one, and put back
on the queue they came from once what refused them is fixed (``gpuq queue list --dead``, ``gpuq queue
requeue``).

A requeued job goes where a fresh job of its queue and priority goes: to the tail of that list, as the
producer's ``RPUSH`` puts it, with the same wake-up. An entry leaves the dead-letter list and its job enters
the queue in one step, so no crash loses it or runs it twice:

- on one Redis, one Lua script removes the entry (``LREM`` of its exact bytes) and pushes the job, or does
  nothing when the entry has gone meanwhile (purged, or requeued by another operator);
- on a Redis Cluster the dead-letter list (a key of no queue) and the queue's list live in different slots
  and no script may touch both. As in ``Intake.settle``, the queue's side is written first and the entry
  removed after, so a crash in between leaves the job in both places, never in neither; what keeps the
  second copy from running is an idempotency mark in the queue's slot, written with the push by the
  producer's own script (``PUSH_LUA``): running the requeue again finds the mark, pushes nothing and only
  removes the entry. With ``REDIS_WAIT_REPLICAS`` the entry is removed only once that many replicas hold
  the push: a failover of the queue's shard cannot lose a job whose dead letter is already gone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, cast

from redis import Redis as SyncRedis

from dispatcher.queues.dead_letters import claimed, queue_in_body
from producer.connect import wait_options
from producer.enqueue import PUSH_LUA
from producer.errors import InvalidJob
from producer.job import Job, parse_redis_job
from producer.keys import Keys, queue_key

# KEYS[1] the dead-letter list, KEYS[2] the queue's list; ARGV[1] the entry, ARGV[2] the job, ARGV[3] the
# wake channel. 1: moved; 0: the entry was no longer there (nothing pushed). The queue key's type is checked
# before the first write: an error half way through a script does not undo the writes before it.
MOVE_LUA = """
local qtype = redis.call('TYPE', KEYS[2])['ok']
if qtype ~= 'none' and qtype ~= 'list' then
  return redis.error_reply('WRONGTYPE queue key ' .. KEYS[2] .. ' holds a ' .. qtype .. ', not a list')
end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  return 0
end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], 'job')
return 1
"""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One entry of the dead-letter list, as far as it can be read."""

    index: int  # its place in the list now (0 = the oldest, as LINDEX counts)
    entry: bytes  # exactly as stored: removing it matches these bytes
    raw: str | None  # the job's text; None when the entry is not one a dispatcher wrote
    queue: str | None  # the queue it was taken from (a parked job's entry names none)
    reason: str
    at: datetime | None  # when it was dead-lettered
    task_id: str | None  # what its job names, read leniently (``claimed``)
    attempt: int | None

    def age(self, now: datetime) -> float | None:
        return (now - self.at).total_seconds() if self.at is not None else None

    def to_json(self, now: datetime) -> dict[str, Any]:
        return {
            "index": self.index,
            "queue": self.queue,
            "task_id": self.task_id,
            "attempt": self.attempt,
            "reason": self.reason,
            "at": self.at.isoformat() if self.at is not None else None,
            "age_seconds": self.age(now),
            "raw": self.raw if self.raw is not None else self.entry.decode(errors="replace"),
        }


def read(client: SyncRedis, keys: Keys) -> list[DeadLetter]:
    """Every entry of the dead-letter list, oldest first."""
    entries = cast(list[bytes], client.lrange(keys.dead, 0, -1))
    return [_letter(i, entry) for i, entry in enumerate(entries)]


def _letter(index: int, entry: bytes) -> DeadLetter:
    try:
        value = json.loads(entry)
    except (ValueError, RecursionError):
        value = None
    raw = value.get("raw") if isinstance(value, dict) else None
    if not isinstance(value, dict) or not isinstance(raw, str):
        return DeadLetter(index, entry, None, None, "not an entry a dispatcher wrote", None, None, None)
    queue = value.get("queue")
    owner = claimed(raw)
    return DeadLetter(
        index=index,
        entry=entry,
        raw=raw,
        queue=queue if isinstance(queue, str) else None,
        reason=str(value.get("reason")),
        at=_time(value.get("at")),
        task_id=owner[0] if owner else None,
        attempt=owner[1] if owner else None,
    )


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Requeue:
    """A dead letter whose job today's rules accept, and where it goes."""

    letter: DeadLetter
    job: Job
    key: str  # the list a fresh job of its queue and priority goes to
    body: str  # the job as pushed: its own text, or with the task id and enqueue time a dispatcher would add


def plan(letter: DeadLetter, *, queues: list[str], max_bytes: int) -> Requeue | str:
    """Where ``letter``'s job would go, or why it cannot go back (its entry then stays): read by the rules
    a dispatcher applies when it takes the job, so a job refused for a reason that still holds is not
    requeued only to be dead-lettered again. A job with no task id or enqueue time gets them here, as a
    dispatcher would give them, so the id the operator is told is the one the task will have."""
    if letter.raw is None:
        return "the entry holds no job (not written by a dispatcher)"
    queue = letter.queue or queue_in_body(letter.raw)
    if queue is None:
        return "its queue is not known: the entry names none, nor does the job"
    if queue not in queues:
        return f"its queue {queue!r} is not one this deployment serves (TASK_QUEUES, TASK_ROUTES)"
    try:
        job, made_up = parse_redis_job(letter.raw, queue, max_bytes=max_bytes)
    except InvalidJob as exc:
        return f"its job still cannot run: {exc.message}"
    except Exception as exc:  # whatever else this one job's content provokes, as the dispatcher's isolate
        return f"its job cannot be read: {type(exc).__name__}: {str(exc)[:200]}"
    return Requeue(letter, job, queue_key(queue, job.priority), job.to_redis() if made_up else letter.raw)


class Moved(StrEnum):
    MOVED = "moved"  # off the dead-letter list and onto its queue, now
    EARLIER = "earlier"  # a requeue interrupted before removing the entry had pushed it: entry removed now
    GONE = "gone"  # the entry had left the list meanwhile (purged, or requeued by another run): nothing done
    UNREPLICATED = "unreplicated"  # pushed (cluster), but too few replicas hold it yet: the entry stays


def move(
    client: SyncRedis,
    keys: Keys,
    r: Requeue,
    *,
    cluster: bool,
    mark_ttl: int,
    wait_replicas: int = 0,
    wait_timeout_ms: int = 1000,
) -> Moved:
    """Take ``r``'s entry off the dead-letter list and push its job onto its queue (see the module's
    docstring for how each mode keeps that one step)."""
    if not cluster:
        done = client.eval(MOVE_LUA, 2, keys.dead, r.key, r.letter.entry, r.body, keys.wake)
        return Moved.MOVED if int(cast(int, done)) else Moved.GONE
    pushed = push_once(client, keys, r, mark_ttl=mark_ttl)
    if wait_replicas:
        either: Any = client  # redis-py's stubs leave execute_command untyped
        acked = either.execute_command("WAIT", wait_replicas, wait_timeout_ms, **wait_options(client, r.key))
        if int(acked) < wait_replicas:
            return Moved.UNREPLICATED
    # the entry's exact bytes (redis-py takes bytes where its stubs say str)
    removed = int(client.lrem(keys.dead, 1, cast(str, r.letter.entry)))
    if pushed:
        return Moved.MOVED
    return Moved.EARLIER if removed else Moved.GONE


def push_once(client: SyncRedis, keys: Keys, r: Requeue, *, mark_ttl: int) -> bool:
    """The cluster's first step: push ``r``'s job unless this very entry was pushed before (its mark, in
    the queue's slot, lives ``mark_ttl`` seconds); True when pushed now."""
    mark = keys.idem(r.job.queue, f"requeue:{hashlib.sha256(r.letter.entry).hexdigest()}")
    replies = cast(
        list[list[Any]],
        client.eval(PUSH_LUA, 3, r.key, mark, mark, keys.wake, mark_ttl, r.job.task_id, r.body),
    )
    return int(replies[0][1]) == 1
