"""The dispatcher's side of Redis: taking jobs reliably, settling them, sweeping, heartbeats and wake-ups.

A job never exists only in this process's memory: a Lua script moves it atomically from its list into this
dispatcher's processing list (``Keys.proc``), tagged with the list it came from (``<source>\\n<raw>``).
It leaves the processing list only after the database has recorded it (``settle``), or when it is
dead-lettered or handed back.

Take contract (``take``): a job is taken only for a pool that can start it now (``free``), so jobs for a
full pool stay in their queue lists, in priority order, visible and changeable (``gpuq task priority``,
``GET /tasks/{id}``) and counted in the queue-age metric. A job taken for a pool's ready buffer counts
against that pool's budget too (``dispatcher/placing.py`` passes room plus buffer deficit). A taken job that
then finds no slot (another dispatcher was faster) is buffered or parked by the placing pass;
``Settlement.back`` puts such a job back at the head of its list instead. Parked lists are served first for
their pool.

If the process dies, its heartbeat key expires and any other dispatcher puts the tagged jobs back at the head
of their lists (``sweep``). Key names live in ``producer.keys``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import cast

from redis.asyncio import Redis

from producer.keys import PRIORITY_ORDER, Keys, queue_key

log = logging.getLogger("gpuq.intake")

HEARTBEAT_TTL_SECONDS = 10

#: How deep into a list a take looks for a job whose pool has room, past jobs waiting for full pools. The
#: bound on head-of-line blocking in a queue that mixes pools (seed-style producers); queues named after
#: their pool (what the producer does with TASK_ROUTES) never need to look past the head.
SCAN_DEPTH = 256

# KEYS: processing list, then every source list.
# ARGV: want, scan depth, default pool, limited (1: only jobs whose pool has budget; 0: any job),
#       route count R, R x (type, pool), pool count P, P x (pool, budget),
#       then per group "<size>:<pool>" (pool empty: a queue, each job's pool by its type; else a parked list).
# Round-robin over groups, one job per visit; within a group the first priority list with a job whose pool
# has room wins, and within a list the first such job (up to the scan depth): jobs for a full pool stay where
# they are, in order, while jobs behind them for other pools are taken. A job that is not a JSON object with
# a string "type" is taken regardless (the dispatcher dead-letters it). Returns source, element, pool triples.
_TAKE = """
local proc = KEYS[1]
local want = tonumber(ARGV[1])
local depth = tonumber(ARGV[2])
local default_pool = ARGV[3]
local limited = ARGV[4] == '1'
local a = 5
local routes = {}
for _ = 1, tonumber(ARGV[a]) do routes[ARGV[a + 1]] = ARGV[a + 2]; a = a + 2 end
a = a + 1
local budget = {}
for _ = 1, tonumber(ARGV[a]) do budget[ARGV[a + 1]] = tonumber(ARGV[a + 2]); a = a + 2 end
a = a + 1
local groups, k = {}, 2
for i = a, #ARGV do
  local size, pool = string.match(ARGV[i], '^(%d+):(.*)$')
  local g = {keys = {}, pool = pool ~= '' and pool or nil, alive = true}
  for j = 1, tonumber(size) do g.keys[j] = KEYS[k]; k = k + 1 end
  groups[#groups + 1] = g
end

local function pool_of(el)
  local ok, obj = pcall(cjson.decode, el)
  if not ok or type(obj) ~= 'table' or type(obj['type']) ~= 'string' then return false end
  return routes[obj['type']] or default_pool
end

local function room(pool)
  if not limited or pool == false then return true end
  local b = budget[pool]
  return b ~= nil and b > 0
end

local lists = {}  -- per list: elements read so far (nil once taken), their pools, how many were removed
local function pick(key, fixed)
  local st = lists[key]
  if st == nil then st = {els = {}, pools = {}, removed = 0, ended = false}; lists[key] = st end
  local i = 1
  while i <= depth do
    if i > #st.els then
      if st.ended then return nil end
      local from = #st.els - st.removed
      local chunk = redis.call('LRANGE', key, from, from + 31)
      if #chunk == 0 then st.ended = true; return nil end
      for _, el in ipairs(chunk) do st.els[#st.els + 1] = el end
      if #chunk < 32 then st.ended = true end
    end
    local el = st.els[i]
    if el then
      local pool = st.pools[i]
      if pool == nil then pool = fixed or pool_of(el); st.pools[i] = pool end
      if room(pool) then
        redis.call('LREM', key, 1, el)
        st.els[i] = false
        st.removed = st.removed + 1
        if limited and pool ~= false then budget[pool] = budget[pool] - 1 end
        return el, pool
      end
    end
    i = i + 1
  end
  return nil
end

local out, got, active = {}, 0, #groups
while got < want and active > 0 do
  for _, g in ipairs(groups) do
    if got >= want then break end
    if g.alive then
      local found = false
      for _, key in ipairs(g.keys) do
        local el, pool = pick(key, g.pool)
        if el then
          redis.call('RPUSH', proc, key .. '\\n' .. el)
          out[#out + 1] = key; out[#out + 1] = el; out[#out + 1] = pool or ''
          got = got + 1; found = true
          break
        end
      end
      if not found then g.alive = false; active = active - 1 end
    end
  end
end
return out
"""

# KEYS: a processing list, the dispatchers set. ARGV: dispatcher id, "forget" (1 to drop it from the set).
# Newest first onto the head of each source list, so the original order is back at the head.
_SWEEP = """
local n = 0
while true do
  local el = redis.call('RPOP', KEYS[1])
  if not el then break end
  local nl = string.find(el, '\\n', 1, true)
  redis.call('LPUSH', string.sub(el, 1, nl - 1), string.sub(el, nl + 1))
  n = n + 1
end
if ARGV[2] == '1' then redis.call('SREM', KEYS[2], ARGV[1]) end
return n
"""


@dataclass(frozen=True, slots=True)
class Taken:
    element: str  # exactly as held in the processing list
    source: str  # the list it came from
    raw: str
    queue: str | None  # the queue it belongs to; None for a parked job (its body says)
    pool: str | None = None  # the pool it was taken for (its type's route); None when unknown or unparsable


@dataclass(slots=True)
class Settlement:
    """What to do with taken jobs once the database has decided, applied in one MULTI/EXEC."""

    ack: list[str] = field(default_factory=list)
    park: list[tuple[str, str, str]] = field(default_factory=list)  # (element, pool, job json)
    # (element, job json): back to the head of the list it came from, in this order (lost a slot race)
    back: list[tuple[str, str]] = field(default_factory=list)
    dead: list[tuple[str, str, str | None, str]] = field(default_factory=list)  # (element, raw, queue, why)
    restamp: list[tuple[str, str]] = field(default_factory=list)  # (old element, new element)


def weighted_order(queues: list[str], weights: dict[str, int] | None = None) -> list[str]:
    """One cycle of smooth weighted round-robin (nginx's): with weights a=3, b=1 -> a a b a. Each queue
    appears as often as its weight (default 1), spread out rather than in runs."""
    w = {q: (weights or {}).get(q, 1) for q in queues}
    current = dict.fromkeys(queues, 0)
    order = []
    for _ in range(sum(w.values())):
        for q in queues:
            current[q] += w[q]
        best = max(queues, key=lambda q: current[q])
        current[best] -= sum(w.values())
        order.append(best)
    return order


class Intake:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        dispatcher_id: str,
        queues: list[str],
        weights: dict[str, int] | None = None,
        *,
        routes: dict[str, str] | None = None,
        default_pool: str = "default",
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.dispatcher_id = dispatcher_id
        self.proc = keys.proc(dispatcher_id)
        self.queues = queues
        self.routes = dict(routes or {})  # task type -> pool (TASK_ROUTES)
        self.default_pool = default_pool
        self._order = weighted_order(queues, weights)
        self._queue_of = {queue_key(q, p): q for q in queues for p in PRIORITY_ORDER}
        self._take = redis.register_script(_TAKE)
        self._sweep = redis.register_script(_SWEEP)
        self._turn = 0

    async def take(self, want: int, free: dict[str, int] | None) -> list[Taken]:
        """Up to ``want`` jobs, never more for a pool than ``free`` gives it (pool -> slots it can start now;
        ``None``: no limit per pool). First the parked lists of pools with room, then the queues by weighted
        round-robin (QUEUE_WEIGHTS): one job per visit, a queue of weight w visited w times per cycle, each
        call starting one step further along the cycle, so the shares hold for small takes too. A job's pool
        is its type's route (TASK_ROUTES, else the default pool); a job whose pool is full stays in its list,
        in its place, while jobs behind it for pools with room are taken (within ``SCAN_DEPTH``)."""
        if want <= 0:
            return []
        keys: list[str] = [self.proc]
        args: list[str | int] = [want, SCAN_DEPTH, self.default_pool, 0 if free is None else 1]
        args += [len(self.routes), *(v for pair in self.routes.items() for v in pair)]
        budgets = {pool: n for pool, n in (free or {}).items() if n > 0}
        args += [len(budgets), *(v for pair in budgets.items() for v in pair)]
        for pool in budgets:
            keys.append(self.keys.parked(pool))
            args.append(f"1:{pool}")
        start = self._turn % len(self._order)
        self._turn += 1
        for q in self._order[start:] + self._order[:start]:
            keys.extend(queue_key(q, p) for p in PRIORITY_ORDER)
            args.append(f"{len(PRIORITY_ORDER)}:")
        flat = await self._take(keys=keys, args=args)
        out = []
        for i in range(0, len(flat), 3):
            source, raw = as_str(flat[i]), as_str(flat[i + 1])
            for_pool = as_str(flat[i + 2]) or None
            out.append(Taken(f"{source}\n{raw}", source, raw, self._queue_of.get(source), for_pool))
        return out

    async def held(self) -> list[Taken]:
        """What our processing list still holds: empty between passes unless one did not finish."""
        out = []
        for element in await self.redis.lrange(self.proc, 0, -1):
            source, _, raw = as_str(element).partition("\n")
            out.append(Taken(f"{source}\n{raw}", source, raw, self._queue_of.get(source)))
        return out

    async def settle(self, s: Settlement) -> None:
        pipe = self.redis.pipeline(transaction=True)
        for el in s.ack:
            pipe.lrem(self.proc, 1, _b(el))
        # Jobs taken from a parked list go back to its head (LPUSH in reverse keeps their order); jobs newly
        # parked go to its tail, behind those parked before them: a pool's parked jobs keep their order.
        for el, pool, body in reversed(s.park):
            if el.startswith(self.keys.parked(pool) + "\n"):
                pipe.lrem(self.proc, 1, _b(el))
                pipe.lpush(self.keys.parked(pool), body)
        for el, pool, body in s.park:
            if not el.startswith(self.keys.parked(pool) + "\n"):
                pipe.lrem(self.proc, 1, _b(el))
                pipe.rpush(self.keys.parked(pool), body)
        for el, body in reversed(s.back):
            pipe.lrem(self.proc, 1, el)
            pipe.lpush(el.partition("\n")[0], body)
        now = datetime.now(UTC).isoformat()
        for el, raw, queue, why in s.dead:
            pipe.lrem(self.proc, 1, _b(el))
            # json.dumps writes bytes that were not UTF-8 (kept as surrogate escapes) as \udcXX escapes
            pipe.rpush(self.keys.dead, json.dumps({"raw": raw, "reason": why, "queue": queue, "at": now}))
        for old, new in s.restamp:
            pipe.lrem(self.proc, 1, _b(old))
            pipe.rpush(self.proc, new)
        if len(pipe):
            await pipe.execute()

    async def hand_back(self) -> int:
        """Put every job still in our processing list back where it came from (stop, or after an error)."""
        return int(await self._sweep(keys=[self.proc, self.keys.dispatchers], args=[self.dispatcher_id, "0"]))

    async def heartbeat(self, redis: Redis | None = None) -> None:
        """``redis``: a client of the heartbeat's own, so that nothing queued on the loop's delays it."""
        pipe = (redis or self.redis).pipeline(transaction=False)
        pipe.set(self.keys.alive(self.dispatcher_id), "1", ex=HEARTBEAT_TTL_SECONDS)
        pipe.sadd(self.keys.dispatchers, self.dispatcher_id)
        await pipe.execute()

    async def is_alive(self, dispatcher_id: str) -> bool:
        """Does this dispatcher still refresh its heartbeat? (A stopped one retires its key at once.)"""
        return bool(await self.redis.exists(self.keys.alive(dispatcher_id)))

    async def retire(self) -> None:
        await self.redis.delete(self.keys.alive(self.dispatcher_id))
        await self.redis.srem(self.keys.dispatchers, self.dispatcher_id)

    async def sweep_dead(self) -> int:
        """Give back the jobs of dispatchers whose heartbeat is gone; returns how many were put back."""
        moved = 0
        for raw_id in await self.redis.smembers(self.keys.dispatchers):
            other = as_str(raw_id)
            if other == self.dispatcher_id or await self.redis.exists(self.keys.alive(other)):
                continue
            n = int(await self._sweep(keys=[self.keys.proc(other), self.keys.dispatchers], args=[other, "1"]))
            if n:
                log.warning(
                    "put back jobs of a dispatcher that is gone",
                    extra={"action": "sweep", "dead_dispatcher": other, "jobs": n},
                )
            moved += n
        return moved

    async def requeue(self, jobs: list[tuple[str, str]]) -> None:
        """Push (list key, job json) at the head of their lists: retries whose backoff is over, first due
        first (LPUSH in reverse keeps their order at the head)."""
        pipe = self.redis.pipeline(transaction=True)
        for key, body in reversed(jobs):
            pipe.lpush(key, body)
        await pipe.execute()

    async def wake_others(self, what: str) -> None:
        await self.redis.publish(self.keys.wake, what)

    async def depths(self) -> dict[str, int]:
        pipe = self.redis.pipeline(transaction=False)
        names = [queue_key(q, p) for q in self.queues for p in PRIORITY_ORDER]
        for name in names:
            pipe.llen(name)
        pipe.llen(self.keys.dead)
        counts = await pipe.execute()
        return dict(zip([*names, self.keys.dead], (int(c) for c in counts), strict=True))


def as_str(value: bytes | str) -> str:
    """Text of a Redis value. Bytes that are not UTF-8 (anyone can RPUSH anything) become surrogate escapes,
    so the job can still be dead-lettered and its element removed by ``_b`` of the same text."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def _b(element: str) -> str:
    """The exact bytes of a processing-list element read through ``_s`` (redis-py takes bytes as well as
    str where its stubs say str)."""
    return cast(str, element.encode("utf-8", "surrogateescape"))
