"""What waits in Redis, for operators (``gpuq status``, the dashboard, ``/metrics``): depth of every queue at
every priority, how long its oldest job has waited, parked jobs per pool, dead letters.

Read-only. The CLI uses a blocking Redis client and the HTTP edge an asyncio one; both queue the same
commands on a pipeline with ``plan`` and read the replies with ``read``, so the two views cannot disagree
and each costs one round trip. Key names come from ``producer.keys``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
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


@dataclass(frozen=True, slots=True)
class QueueDepth:
    queue: str
    priority: str
    key: str  # the Redis list
    depth: int  # with the jobs set aside from it (``Keys.aside``): they still wait in this queue and priority
    # Seconds the oldest job of this queue and priority has waited; None when none or times unknown. Jobs
    # waiting for a full pool count (SPEC §4 "Order"): set aside, parked (by their priority), taken by a
    # dispatcher and not started (the head of each processing list; ``read``'s ``held``: every job a
    # process holds in its ready buffer). ``depth`` counts the list and its set-aside jobs only.
    oldest_age: float | None
    aside: int = 0  # of ``depth``: set aside, their pool had no room (a queue that mixes pools)


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
                pipe.lindex(self.keys.proc(queue, owner), 0)

    def read(
        self,
        replies: list[Any],
        now: datetime | None = None,
        held: Iterable[tuple[str, datetime]] = (),
    ) -> RedisView:
        """The view from ``replies``; ``held``: jobs the reading process has taken and holds (its ready
        buffer), as (processing-list element, ``enqueued_at``), each counted in the age of its list.
        Reading every processing list whole instead moved the jobs themselves (up to 256 KiB each) at each
        scrape, or, in a script, held Redis a quarter of a second per 32 MiB (an outside review)."""
        now = now or datetime.now(UTC)
        it = iter(replies)
        lists = self.lists()
        at: dict[str, int] = {}  # a list jobs are taken from -> its place in ``lists``
        for i, (queue, priority, key) in enumerate(lists):
            at[key] = i
            at.update(dict.fromkeys(self.aside(queue, priority), i))
        ages: list[list[float]] = [[] for _ in lists]
        depths: list[list[int]] = [[] for _ in lists]
        for i in range(len(lists)):
            for _ in range(1 + len(self.pools)):  # the list, then what was set aside from it per pool
                depth, head = int(next(it)), next(it)
                depths[i].append(depth)
                _add(ages[i], _age(head, now) if depth else None)
        parked, parked_age = {}, {}
        for pool in self.pools:
            pool_ages: list[float] = []
            parked[pool] = 0
            for queue in self.queues:
                depth, head = int(next(it)), next(it)
                parked[pool] += depth
                job = _job(head) if depth else None
                age = _stamp_age(job.get("enqueued_at"), now) if job is not None else None
                _add(pool_ages, age)
                waits_in = at.get(queue_key(queue, _priority(job))) if job is not None else None
                if waits_in is not None and age is not None:  # waits for its pool, at its priority
                    ages[waits_in].append(age)
            parked_age[pool] = max(pool_ages) if pool_ages else None
        dead = int(next(it))
        taken = 0
        taken_ages: list[float] = []
        for depth, head in zip(it, it, strict=True):
            taken += int(depth)
            if head is not None:  # "<source list>\n<job>": the oldest a dispatcher took
                source, _, raw = as_str(head).partition("\n")
                age = _age(raw, now)
                _add(taken_ages, age)
                if source in at and age is not None:
                    ages[at[source]].append(age)
        for element, enqueued_at in held:
            source = element.partition("\n")[0]
            if source in at:
                ages[at[source]].append(_since(enqueued_at, now))
        queues = [
            QueueDepth(q, p, key, sum(depths[i]), max(ages[i]) if ages[i] else None, sum(depths[i][1:]))
            for i, (q, p, key) in enumerate(lists)
        ]
        return RedisView(queues, parked, dead, parked_age, taken, max(taken_ages) if taken_ages else None)


def _add(ages: list[float], age: float | None) -> None:
    if age is not None:
        ages.append(age)


def _job(head: bytes | str | None) -> dict[str, Any] | None:
    """A list's head as a JSON object, or None (nothing there, or not an object: a poison job). Whatever sits
    at a head (5,000 nested brackets) must not break /metrics or `gpuq status`."""
    if head is None:
        return None
    try:
        job = json.loads(head)
    except (ValueError, RecursionError):
        return None
    return job if isinstance(job, dict) else None


def _priority(job: dict[str, Any]) -> Priority:
    try:
        return Priority(job.get("priority", "normal"))
    except ValueError:
        return Priority.NORMAL


def _age(head: bytes | str | None, now: datetime) -> float | None:
    """Seconds since the job's ``enqueued_at``; None for a job without one (the seed's producers)."""
    job = _job(head)
    return _stamp_age(job.get("enqueued_at"), now) if job is not None else None


def _stamp_age(stamp: Any, now: datetime) -> float | None:
    """Seconds since ``stamp`` (an ``enqueued_at``); None when it is not a time, or one that overflows."""
    try:
        return _since(datetime.fromisoformat(str(stamp).replace("Z", "+00:00")), now)
    except (ValueError, OverflowError):
        return None


def _since(when: datetime, now: datetime) -> float:
    """Seconds from ``when`` (naive: UTC) to ``now``; 0 for a time ahead of ours."""
    aware = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    return max(0.0, (now - aware).total_seconds())


def read_sync(client: Any, plan: Plan) -> RedisView:
    """One look through a blocking ``redis.Redis``."""
    owners = [as_str(o) for o in client.smembers(plan.keys.dispatchers)]
    pipe = client.pipeline(transaction=False)
    plan.queue_on(pipe, owners)
    return plan.read(pipe.execute())


async def read_async(client: Any, plan: Plan, held: Iterable[tuple[str, datetime]] = ()) -> RedisView:
    """One look through a ``redis.asyncio.Redis``; ``held``: what this dispatcher buffers (``read``)."""
    owners = [as_str(o) for o in await client.smembers(plan.keys.dispatchers)]
    pipe = client.pipeline(transaction=False)
    plan.queue_on(pipe, owners)
    return plan.read(await pipe.execute(), held=held)


def pools_of(gpus: list[dict[str, Any]], routes: dict[str, str]) -> list[str]:
    """Pools whose parked list may hold jobs: those of the GPUs, of TASK_ROUTES, and the default one."""
    return sorted({g["pool"] for g in gpus} | set(routes.values()) | {"default"})


async def ping(redis: Redis) -> None:
    """Raises when Redis does not answer (``GET /readyz``)."""
    await redis.ping()
