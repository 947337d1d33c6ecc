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

    def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any: ...


#: Elements looked at from the head of each processing list (a dispatcher's ready buffers, HANDOFF_BUFFER per
#: pool, oldest taken first) to count the taken jobs of each list and read how long they waited.
TAKEN_SCAN = 128

#: One processing list's taken jobs by the list each came from, read in Redis: a look moves a few stamps, not
#: the jobs (up to TAKEN_SCAN of up to 256 KiB each, at every scrape), and parses one job per source, the
#: first taken of it (the next when it has no readable ``enqueued_at``, up to 4: a poison job or a producer
#: without the field costs a bounded parse). Reply: {length, source, count, enqueued_at or nil, ...}.
TAKEN_BY_SOURCE = r"""
local len = redis.call('LLEN', KEYS[1])
local order, count, stamp = {}, {}, {}
for _, el in ipairs(redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)) do
  local nl = string.find(el, '\n', 1, true)
  local src = nl and string.sub(el, 1, nl - 1) or ''
  if count[src] == nil then
    order[#order + 1] = src
    count[src] = 0
    stamp[src] = false
  end
  if nl and not stamp[src] and count[src] < 4 then
    local ok, job = pcall(cjson.decode, string.sub(el, nl + 1))
    local at = ok and type(job) == 'table' and job.enqueued_at
    if type(at) == 'string' and string.find(at, '^%d%d%d%d%-%d%d%-%d%d') then
      stamp[src] = at
    end
  end
  count[src] = count[src] + 1
end
local out = {len}
for _, src in ipairs(order) do
  out[#out + 1] = src
  out[#out + 1] = count[src]
  out[#out + 1] = stamp[src]
end
return out
"""


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
                pipe.eval(TAKEN_BY_SOURCE, 1, self.keys.proc(queue, owner), TAKEN_SCAN)

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
        counts: dict[int, int] = {}
        for reply in it:  # each processing list: its length, then (source, count, stamp) per source
            taken += int(reply[0])
            for src, count, stamp in zip(*[iter(reply[1:])] * 3, strict=True):
                age = _stamp_age(as_str(stamp), now) if stamp is not None else None
                taken_ages.append(age)
                if (at := source.get(as_str(src))) is not None:
                    per_list.setdefault(at, []).append(age)
                    counts[at] = counts.get(at, 0) + int(count)
        queues = []
        for i, (queue, priority, key, depths, ages) in enumerate(lists):
            known_ages = [a for a in ages + per_list.get(i, []) if a is not None]
            age = max(known_ages) if known_ages else None
            aside, taken_here = sum(depths[1:]), counts.get(i, 0)
            queues.append(QueueDepth(queue, priority, key, sum(depths), age, aside, taken_here))
        known = [a for a in taken_ages if a is not None]
        return RedisView(queues, parked, dead, parked_age, taken, max(known) if known else None)


def _age(head: bytes | str | None, now: datetime) -> float | None:
    """Seconds since the job's ``enqueued_at``; None for a job without one (the seed's producers)."""
    if head is None:
        return None
    try:
        return _stamp_age(str(json.loads(head).get("enqueued_at")), now)
    # Whatever sits at the head (a poison job not yet dead-lettered: 5,000 nested brackets) must not break
    # /metrics or `gpuq status`.
    except (ValueError, TypeError, AttributeError, RecursionError):
        return None


def _stamp_age(stamp: str, now: datetime) -> float | None:
    """Seconds since ``stamp`` (an ``enqueued_at``); None when it is not a time, or one that overflows."""
    try:
        when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, (now - when).total_seconds())
    except (ValueError, OverflowError):
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
