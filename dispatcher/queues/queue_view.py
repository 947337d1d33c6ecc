"""What waits in Redis, for operators (``gpuq status``, the dashboard, ``/metrics``): depth of every queue at
every priority, how long its oldest job has waited, parked jobs per pool, dead letters.

Read-only. The CLI uses a blocking Redis client and the HTTP edge an asyncio one; both queue the same
commands on a pipeline with ``plan`` and read the replies with ``read``, so the two views cannot disagree
and each costs one round trip. Key names come from ``producer.keys``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from redis.asyncio import Redis

from dispatcher.queues.presence import as_str
from producer.keys import PRIORITY_ORDER, Keys, Priority, queue_key


class Pipeline(Protocol):
    """The part of a redis-py pipeline (sync or asyncio) that ``plan`` uses."""

    def llen(self, name: str) -> Any: ...

    def lindex(self, name: str, index: int) -> Any: ...

    def lrange(self, name: str, start: int, end: int) -> Any: ...


#: Jobs read from the head of each processing list to see how long the taken ones have waited, per queue and
#: priority (a list holds this process's ready buffers, HANDOFF_BUFFER per pool, oldest first): bounds a
#: scrape's reply when a dispatcher took many large jobs.
TAKEN_SCAN = 128


@dataclass(frozen=True, slots=True)
class QueueDepth:
    queue: str
    priority: str
    key: str  # the Redis list
    depth: int  # with the jobs set aside from it (``Keys.aside``): they still wait in this queue and priority
    # seconds the oldest job has waited, taken ones included (``taken``); None when none or times unknown
    oldest_age: float | None
    aside: int = 0  # of ``depth``: set aside, their pool had no room (a queue that mixes pools)
    # taken from this list by dispatchers, not started yet (a ready buffer: SPEC §4 "Order", a job waiting
    # for a full pool counts in the queue-age metric), of the first TAKEN_SCAN of each processing list;
    # ``RedisView.taken`` counts them all, ``depth`` none
    taken: int = 0


@dataclass(frozen=True, slots=True)
class RedisView:
    queues: list[QueueDepth]
    parked: dict[str, int]  # pool -> jobs taken while the pool was full (dispatchers before issue 14)
    dead: int
    parked_age: dict[str, float | None] = field(default_factory=dict)  # pool -> oldest parked job's wait
    # Jobs dispatchers have taken and not yet recorded (a pass under way, or a hand-off's ready buffer):
    # still waiting to start, so they count as waiting (the dashboard's "waiting" once missed them).
    taken: int = 0
    taken_age: float | None = None  # the oldest of them (a processing list's head is its oldest)

    def oldest_age(self) -> float | None:
        """How long the longest-waiting job (queued or parked) has waited."""
        ages = [q.oldest_age for q in self.queues] + list(self.parked_age.values()) + [self.taken_age]
        known = [a for a in ages if a is not None]
        return max(known) if known else None

    def waiting(self) -> int:
        return sum(q.depth for q in self.queues) + sum(self.parked.values()) + self.taken

    def to_json(self) -> dict[str, Any]:
        return {
            "queues": [
                {
                    "queue": q.queue,
                    "priority": q.priority,
                    "key": q.key,
                    "depth": q.depth,
                    "set_aside": q.aside,
                    "oldest_age": q.oldest_age,
                    "taken": q.taken,
                }
                for q in self.queues
            ],
            "parked": self.parked,
            "parked_oldest_age": self.parked_age,
            "dead": self.dead,
            "taken": self.taken,
            "waiting": self.waiting(),
            "oldest_age": self.oldest_age(),
        }


@dataclass(frozen=True, slots=True)
class Plan:
    """The commands of one look at the queues ``queues`` and the parked lists of ``pools``."""

    keys: Keys
    queues: list[str]
    pools: list[str]

    def lists(self) -> list[tuple[str, str, str]]:
        return [(q, p.value, queue_key(q, p)) for q in self.queues for p in PRIORITY_ORDER]

    def aside(self, queue: str, priority: str) -> list[str]:
        return [self.keys.aside(queue, Priority(priority), pool) for pool in self.pools]

    def queue_on(self, pipe: Pipeline, owners: list[str] = []) -> None:  # noqa: B006 - never mutated
        for queue, priority, key in self.lists():
            for name in (key, *self.aside(queue, priority)):
                pipe.llen(name)
                pipe.lindex(name, 0)  # the oldest: producers RPUSH, dispatchers take from the head
        for pool in self.pools:
            for queue in self.queues:
                pipe.llen(self.keys.parked(queue, pool))
                pipe.lindex(self.keys.parked(queue, pool), 0)
        pipe.llen(self.keys.dead)
        for owner in owners:  # the dispatchers' processing lists
            for queue in self.queues:
                pipe.llen(self.keys.proc(queue, owner))
                pipe.lrange(self.keys.proc(queue, owner), 0, TAKEN_SCAN - 1)

    def read(self, replies: list[Any], now: datetime | None = None) -> RedisView:
        now = now or datetime.now(UTC)
        it = iter(replies)
        lists = []
        for queue, priority, key in self.lists():
            depths, ages = [], []
            for _ in range(1 + len(self.pools)):  # the list, then what was set aside from it per pool
                depth, head = int(next(it)), next(it)
                depths.append(depth)
                ages.append(_age(head, now) if depth else None)
            lists.append((queue, priority, key, depths, ages))
        parked, parked_age = {}, {}
        for pool in self.pools:
            ages = []
            parked[pool] = 0
            for _ in self.queues:
                depth, head = int(next(it)), next(it)
                parked[pool] += depth
                ages.append(_age(head, now) if depth else None)
            known_ages = [a for a in ages if a is not None]
            parked_age[pool] = max(known_ages) if known_ages else None
        dead = int(next(it))
        source = {}  # a list jobs are taken from -> its place in ``lists``
        for i, (queue, priority, key) in enumerate(self.lists()):
            source[key] = i
            source.update(dict.fromkeys(self.aside(queue, priority), i))
        taken, taken_ages = 0, []
        per_list: dict[int, list[float | None]] = {}
        for depth, elements in zip(it, it, strict=True):
            taken += int(depth)
            for element in elements:  # "<source list>\n<job>", oldest first
                src, _, job = as_str(element).partition("\n")
                age = _age(job, now)
                taken_ages.append(age)
                if src in source:
                    per_list.setdefault(source[src], []).append(age)
        queues = []
        for i, (queue, priority, key, depths, ages) in enumerate(lists):
            known_ages = [a for a in ages + per_list.get(i, []) if a is not None]
            age = max(known_ages) if known_ages else None
            queues.append(
                QueueDepth(queue, priority, key, sum(depths), age, sum(depths[1:]), len(per_list.get(i, [])))
            )
        known = [a for a in taken_ages if a is not None]
        return RedisView(queues, parked, dead, parked_age, taken, max(known) if known else None)


def _age(head: bytes | str | None, now: datetime) -> float | None:
    """Seconds since the job's ``enqueued_at``; None for a job without one (the seed's producers)."""
    if head is None:
        return None
    try:
        stamp = json.loads(head).get("enqueued_at")
        when = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, (now - when).total_seconds())
    # Whatever sits at the head (a poison job not yet dead-lettered: 5,000 nested brackets, a year-1 time
    # that overflows) must not break /metrics or `gpuq status`.
    except (ValueError, TypeError, AttributeError, OverflowError, RecursionError):
        return None


def read_sync(client: Any, plan: Plan) -> RedisView:
    """One look through a blocking ``redis.Redis``."""
    owners = [as_str(o) for o in client.smembers(plan.keys.dispatchers)]
    pipe = client.pipeline(transaction=False)
    plan.queue_on(pipe, owners)
    return plan.read(pipe.execute())


async def read_async(client: Any, plan: Plan) -> RedisView:
    """One look through a ``redis.asyncio.Redis``."""
    owners = [as_str(o) for o in await client.smembers(plan.keys.dispatchers)]
    pipe = client.pipeline(transaction=False)
    plan.queue_on(pipe, owners)
    return plan.read(await pipe.execute())


def pools_of(gpus: list[dict[str, Any]], routes: dict[str, str]) -> list[str]:
    """Pools whose parked list may hold jobs: those of the GPUs, of TASK_ROUTES, and the default one."""
    return sorted({g["pool"] for g in gpus} | set(routes.values()) | {"default"})


async def ping(redis: Redis) -> None:
    """Raises when Redis does not answer (``GET /readyz``)."""
    await redis.ping()
