"""Jobs left under the Redis key names before issue 15 are moved to the names of today (``producer.keys``).

Until issue 15 a queue's high and low lists were ``Q:high`` / ``Q:low``, a dispatcher had one processing
list ``P proc:<id>`` for all queues, and parked jobs sat in ``P parked:<pool>``. None of these share a
cluster slot with their queue, so they exist only on a plain Redis, and only this module reads them. A
dispatcher started on such a Redis (an upgrade, or old and new dispatchers side by side for a while) runs
``migrate`` at start and with each sweep, so nothing an old process leaves is stranded:

- a legacy processing list of a dispatcher whose heartbeat is gone goes back to the lists its jobs came
  from (the sweep an old dispatcher would have done), and from there below;
- ``Q:high`` / ``Q:low`` move to the head of ``{Q}:high`` / ``{Q}:low``, in order (they are older);
- ``P parked:<pool>`` moves to the head of ``P{Q}:parked:<pool>`` of each job's queue, in order.

Each move is one script over both keys (one Redis: no slot rule), so a crash never drops or doubles a job.
Old idempotency marks are not moved (the mark does not name its queue): the producer honours them instead.
"""

from __future__ import annotations

import json
import logging

from redis.asyncio import Redis

from dispatcher.queues.intake_lua import SWEEP
from producer.keys import Keys, Legacy, Priority, queue_key

log = logging.getLogger("gpuq.migrate")

# KEYS: old list, new list; ARGV: the queue. Moves every element, last first, onto the head of the new list:
# the old list's order ends up at the new head. Stops at a job of another queue: today ``Q:high`` may be the
# list of a queue named so (``{Q}:high`` is Q's), which must keep its jobs. Returns how many moved.
_MOVE_LIST = """
local n = 0
while true do
  local el = redis.call('LINDEX', KEYS[1], -1)
  if not el then break end
  local ok, obj = pcall(cjson.decode, el)
  if ok and type(obj) == 'table' and type(obj['queue']) == 'string' and obj['queue'] ~= ARGV[1] then break end
  redis.call('RPOPLPUSH', KEYS[1], KEYS[2])
  n = n + 1
end
return n
"""

# KEYS: old list, new list; ARGV: the element at the old list's tail as read. Moves it to the new list's head
# if it is still the tail (another dispatcher may be migrating too). 1 if moved.
_MOVE_TAIL = """
if redis.call('LINDEX', KEYS[1], -1) ~= ARGV[1] then return 0 end
redis.call('RPOP', KEYS[1])
redis.call('LPUSH', KEYS[2], ARGV[1])
return 1
"""


async def sweep_legacy_proc(redis: Redis, legacy: Legacy, dispatcher_id: str) -> int:
    """Put back the jobs of a (dead) dispatcher's processing list of the old layout: its elements are
    ``<source>\n<job>`` as in the new layout's, so the intake's own sweep script serves."""
    return int(await redis.eval(SWEEP, 1, legacy.proc(dispatcher_id)))


async def migrate(redis: Redis, keys: Keys, queues: list[str], *, parked: bool = True) -> int:
    """Move what waits under the old names of ``queues`` to the new names; ``parked``: also look for old
    parked lists (a SCAN of the keyspace: at start and after a dead dispatcher was swept, not every tick)."""
    legacy = Legacy(keys.prefix)
    moved = 0
    for queue in queues:
        for priority in (Priority.HIGH, Priority.LOW):
            old, new = legacy.queue_key(queue, priority), queue_key(queue, priority)
            if old != new and old not in queues:  # a {tag}ged queue kept its names; a queue named Q:high
                moved += int(await redis.eval(_MOVE_LIST, 2, old, new, queue))
    old_parked = [k async for k in redis.scan_iter(match=legacy.parked("*"), count=500)] if parked else []
    for raw in old_parked:
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        moved += await _move_parked(redis, keys, key, key[len(legacy.parked("")) :], queues)
    if moved:
        log.warning("moved jobs left under the old key layout", extra={"action": "migrate", "jobs": moved})
    return moved


async def _move_parked(redis: Redis, keys: Keys, key: str, pool: str, queues: list[str]) -> int:
    moved = 0
    while True:
        tail = await redis.lindex(key, -1)
        if tail is None:
            return moved
        queue = _queue_of(tail)
        if queue not in queues:
            # Not a queue this dispatcher serves (or no queue at all): its own dispatcher moves it.
            log.warning("old parked job of another queue left", extra={"action": "migrate", "list": key})
            return moved
        moved += int(await redis.eval(_MOVE_TAIL, 2, key, keys.parked(queue, pool), tail))


def _queue_of(element: bytes | str) -> str | None:
    try:
        body = json.loads(element)
    except ValueError:
        return None
    queue = body.get("queue") if isinstance(body, dict) else None
    return queue if isinstance(queue, str) else None
