"""Moving a job that waits in Redis to another priority list of its queue (``gpuq task priority``).

Two small scripts: ``_FIND`` looks for the job by task id in the given lists, server-side, and returns the
list and the element; the new body (its ``priority`` rewritten, every other field kept byte for byte as
Python's json keeps them) is made here; ``_MOVE`` then removes exactly that element and pushes the new one
in one step, or does nothing when the element is gone (a dispatcher took it meanwhile). So a job is never
lost or doubled: it is either moved or left to the dispatcher that took it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis
from redis.asyncio import Redis as AsyncRedis

from dispatcher.queues.presence import as_str
from producer.errors import InvalidJob
from producer.job import parse_redis_job
from producer.keys import PRIORITY_ORDER, Keys, Priority, queue_key, queue_lists, scope_problem

# KEYS: lists to search. ARGV: task id, then the position (1-based) of the first processing list in KEYS
# (their elements are "<source>\n<job>"; 0: none). Chunks of 500, one atomic call. Returns {1, list, element,
# index} for a job whose id is that string; else {0, list, element, index, ...}: the jobs that may run under
# that id although their data.task_id is a number, boolean or object (the seed's {"task_id": 123}): the
# dispatcher runs them under Python's str() of it ("1.0", "True", a 64-bit integer exactly), which Lua cannot
# write, so ``_pick`` reads them as the dispatcher does. Only those that may match are handed over: a number
# equal to the id read as a number, a boolean for "True" or "False", an object or array for an id starting
# with { or [ (at most 200); or nil. A top-level id that is no string is the dispatcher's refusal, not an id.
_FIND = """
local id = ARGV[1]
local first_proc = tonumber(ARGV[2] or '0')
local as_number = tonumber(id)
local first = string.sub(id, 1, 1)
local maybe = {}
local function empty(v)  -- what Python's `or` passes over: None, '', 0, false, [] and {}
  if v == nil or v == cjson.null or v == false or v == '' or v == 0 then return true end
  return type(v) == 'table' and next(v) == nil
end
local function may_be(v)  -- may Python's str(v) be the id?
  local t = type(v)
  if t == 'number' then return as_number ~= nil and v == as_number end
  if t == 'boolean' then return id == 'True' or id == 'False' end
  return first == '{' or first == '['
end
for k, key in ipairs(KEYS) do
  local n = redis.call('LLEN', key)
  local i = 0
  while i < n do
    for j, el in ipairs(redis.call('LRANGE', key, i, i + 499)) do
      local body = el
      if first_proc > 0 and k >= first_proc then
        local nl = string.find(el, '\\n', 1, true)
        if nl then body = string.sub(el, nl + 1) end
      end
      local ok, obj = pcall(cjson.decode, body)
      if ok and type(obj) == 'table' then
        local tid = obj['task_id']
        if empty(tid) then
          tid = nil
          if type(obj['data']) == 'table' then tid = obj['data']['task_id'] end
          if tid == cjson.null or tid == '' then
            tid = nil
          elseif tid ~= nil and type(tid) ~= 'string' then
            if #maybe < 600 and may_be(tid) then
              table.insert(maybe, key)
              table.insert(maybe, el)
              table.insert(maybe, i + j - 1)
            end
            tid = nil
          end
        elseif type(tid) ~= 'string' then
          tid = nil
        end
        if tid == id then
          return {1, key, el, i + j - 1}
        end
      end
    end
    i = i + 500
  end
end
if #maybe > 0 then
  return {0, unpack(maybe)}
end
return nil
"""


def _pick(hit: Any, task_id: str) -> list[Any] | None:
    """The (list, element, index) of ``_FIND``'s answer whose job a dispatcher would run as ``task_id``."""
    if not hit:
        return None
    values = [as_str(v) if isinstance(v, bytes) else v for v in hit]
    if int(values[0]) == 1:
        return values[1:4]
    for source, element, index in zip(values[1::3], values[2::3], values[3::3], strict=True):
        bodies = [element, element.partition("\n")[2]] if "\n" in element else [element]
        for body in bodies:  # as queued, or as taken (``<source>\n<job>``)
            try:
                job, _ = parse_redis_job(body, "lookup", max_bytes=_ANY_SIZE)  # the size is not the question
            except InvalidJob:
                continue
            if job.task_id == task_id:
                return [source, element, index]
            break
    return None


def _find_in(rds: redis.Redis, lists: list[str], first_proc: int, task_id: str) -> list[Any] | None:
    return _pick(rds.eval(_FIND, len(lists), *lists, task_id, first_proc), task_id)


async def _find_in_async(
    rds: AsyncRedis, lists: list[str], first_proc: int, task_id: str
) -> list[Any] | None:
    return _pick(await rds.eval(_FIND, len(lists), *lists, task_id, first_proc), task_id)


_ANY_SIZE = 1 << 30


# KEYS: source list, target list. ARGV: element as found, new element. 1 if moved, 0 if it was gone.
_MOVE = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Moved:
    found: bool
    source: str | None = None
    target: str | None = None


def _priority_lists(keys: Keys | None, queue: str, pools: list[str]) -> dict[str, Priority]:
    """A queue's priority lists and the lists set aside from them (``Keys.aside``), each with its priority."""
    lists = {queue_key(queue, p): p for p in PRIORITY_ORDER}
    if keys is not None:
        lists |= {keys.aside(queue, p, pool): p for p in PRIORITY_ORDER for pool in pools}
    return lists


def move_job(
    rds: redis.Redis,
    *,
    task_id: str,
    queues: list[str],
    priority: Priority,
    keys: Keys | None = None,
    pools: list[str] = [],  # noqa: B006 - never mutated
) -> Moved:
    """Move the job with ``task_id`` waiting in one of ``queues`` to the back of its ``priority`` list. With
    ``keys``, also a job set aside for one of ``pools`` (its pool had no room): already of ``priority``, it
    stays where it is (its place is ahead of that list's jobs of its pool)."""
    if keys is not None:  # where show and cancel look: the queues and pools of every dispatcher too
        queues = list(dict.fromkeys([*queues, *_names(rds.hgetall(keys.owner_queues), queues=True)]))
        pools = list(dict.fromkeys([*pools, *_names(rds.hgetall(keys.owner_pools))]))
    for _ in range(3):
        hit, lists, queue = None, {}, ""
        for queue in queues:  # one queue (one cluster slot) per script
            lists = _priority_lists(keys, queue, pools)
            hit = _find_in(rds, list(lists), 0, task_id)
            if hit:
                break
        if not hit:
            return Moved(False)
        source, element = hit[0], hit[1]  # text already (``_pick``)
        target = queue_key(queue, priority)
        if lists[source] is priority:
            return Moved(True, source, source)
        body = json.loads(element)
        body["priority"] = priority.value
        moved = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        # The element's own bytes (surrogate escapes of bytes that are not UTF-8 back to those bytes).
        if rds.eval(_MOVE, 2, source, target, _raw(element), _raw(moved)):
            return Moved(True, source, target)
    return Moved(False)


def _waiting_lists(keys: Keys, queue: str, pools: list[str]) -> list[str]:
    """Where a job of ``queue`` waits: its priority lists, the lists set aside from them, then its parked
    lists (all in one slot)."""
    aside = [keys.aside(queue, p, pool) for p in PRIORITY_ORDER for pool in pools]
    return [*queue_lists(queue), *aside, *(keys.parked(queue, pool) for pool in pools)]


def _waiting(task_id: str, hit: list[Any], queue_of: dict[str, str]) -> dict[str, Any]:
    """A job found waiting in Redis, shaped like GET /tasks/{id} answers a recorded task."""
    source, element = hit[0], hit[1]  # text already (``_pick``)
    position = int(hit[2])
    if source not in queue_of and "\n" in element:
        # Taken by a dispatcher (its processing list or ready buffer), not yet recorded: about to start.
        source, _, element = element.partition("\n")
        position = 0
    try:
        body = json.loads(element)
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    data = body.get("data")
    return {
        "task_id": task_id,
        "state": "queued",
        "type": body.get("type"),
        "queue": queue_of.get(source) or body.get("queue"),
        "priority": body.get("priority") or "normal",
        "list": source,
        "position": position,  # jobs ahead of it in that list
        # Not recorded yet, so none made: a body's own "attempt" counts for nothing (dispatch._triage).
        "attempts": 0,
        "enqueued_at": body.get("enqueued_at"),
        "gpu_id": None,
        "slot_index": None,
        "data": data if isinstance(data, dict) else None,
    }


def find_waiting(
    rds: redis.Redis, *, keys: Keys, task_id: str, queues: list[str], pools: list[str]
) -> dict[str, Any] | None:
    """The job with ``task_id`` if it waits in Redis (its queues' lists, a parked list, or a dispatcher's
    processing list: taken, not yet recorded), else None. See ``find_waiting_async``."""
    plan = _Search(
        keys,
        queues=queues,
        pools=pools,
        members=rds.smembers(keys.dispatchers),
        owner_queues=rds.hgetall(keys.owner_queues),
        owner_pools=rds.hgetall(keys.owner_pools),
    )
    for lists, first_proc in plan.scripts():
        hit = _find_in(rds, lists, first_proc, task_id)
        if hit:
            return _waiting(task_id, hit, plan.queue_of)
    return None


async def find_waiting_async(
    rds: AsyncRedis, *, keys: Keys, task_id: str, queues: list[str], pools: list[str]
) -> dict[str, Any] | None:
    """``find_waiting`` through an asyncio client (the HTTP edge). It also looks in the dispatchers'
    processing lists: a job taken but not yet recorded (a pass under way, or held in a hand-off buffer) is
    neither waiting in its queue nor in the database, and must not look unknown meanwhile (404)."""
    plan = _Search(
        keys,
        queues=queues,
        pools=pools,
        members=await rds.smembers(keys.dispatchers),
        owner_queues=await rds.hgetall(keys.owner_queues),
        owner_pools=await rds.hgetall(keys.owner_pools),
    )
    for lists, first_proc in plan.scripts():
        hit = await _find_in_async(rds, lists, first_proc, task_id)
        if hit:
            return _waiting(task_id, hit, plan.queue_of)
    return None


class _Search:
    """Where a job may wait: the queues this process knows of and those the running dispatchers serve (a
    cancel from a CLI or a dispatcher serving other queues must find it too), and the processing lists of
    every dispatcher registered either way."""

    def __init__(
        self,
        keys: Keys,
        *,
        queues: list[str],
        pools: list[str],
        members: Any,
        owner_queues: dict[Any, Any],
        owner_pools: dict[Any, Any],
    ) -> None:
        self.keys = keys
        self.queues = list(dict.fromkeys([*queues, *_names(owner_queues, queues=True)]))
        # Another dispatcher's routes may name pools ours do not: its jobs set aside or parked for them.
        self.pools = list(dict.fromkeys([*pools, *_names(owner_pools)]))
        owners = {as_str(v) for v in members} | {as_str(k) for k in owner_queues}
        self.owners = sorted(o for o in owners if _utf8(o))  # any other is not a dispatcher's
        self.queue_of = {key: q for q in self.queues for key in _waiting_lists(keys, q, self.pools)}

    def scripts(self) -> list[tuple[list[str], int]]:
        """One script per queue (one cluster slot each): its lists, then the processing lists (position)."""
        out = []
        for queue in self.queues:
            lists = _waiting_lists(self.keys, queue, self.pools)
            procs = [self.keys.proc(queue, o) for o in self.owners]
            out.append(([*lists, *procs], len(lists) + 1 if procs else 0))
        return out


def _names(records: dict[Any, Any], *, queues: bool = False) -> list[str]:
    """The names in a dispatchers' hash (dispatcher id -> JSON list); what is not a dispatcher's is skipped:
    a lookup must not fail on it (text that is not UTF-8; for queues, a name whose keys would span cluster
    slots)."""
    out: list[str] = []
    for raw in records.values():
        try:
            value = json.loads(as_str(raw))
        except (ValueError, RecursionError):
            continue
        for name in value if isinstance(value, list) else []:
            if not isinstance(name, str) or not name or not _utf8(name):
                continue
            if queues and scope_problem(name) is not None:
                continue
            out.append(name)
    return out


def _utf8(name: str) -> bool:
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")
