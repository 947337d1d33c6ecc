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

import redis

from producer.keys import PRIORITY_ORDER, Priority, queue_key

# KEYS: lists to search. ARGV: task id. Returns {list, element} or nil. Scans in chunks of 500.
_FIND = """
local id = ARGV[1]
for _, key in ipairs(KEYS) do
  local n = redis.call('LLEN', key)
  local i = 0
  while i < n do
    for _, el in ipairs(redis.call('LRANGE', key, i, i + 499)) do
      local ok, obj = pcall(cjson.decode, el)
      if ok and type(obj) == 'table' then
        local tid = obj['task_id']
        if tid == nil and type(obj['data']) == 'table' then tid = obj['data']['task_id'] end
        if tid == id then
          return {key, el}
        end
      end
    end
    i = i + 500
  end
end
return nil
"""

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


def move_job(rds: redis.Redis, *, task_id: str, queues: list[str], priority: Priority) -> Moved:
    """Move the job with ``task_id`` waiting in one of ``queues`` to the back of its ``priority`` list."""
    lists = [queue_key(q, p) for q in queues for p in PRIORITY_ORDER]
    queue_of = {queue_key(q, p): q for q in queues for p in PRIORITY_ORDER}
    find, move = rds.register_script(_FIND), rds.register_script(_MOVE)
    for _ in range(3):
        hit = find(keys=lists, args=[task_id])
        if not hit:
            return Moved(False)
        source, element = (v.decode() if isinstance(v, bytes) else str(v) for v in hit)
        target = queue_key(queue_of[source], priority)
        if source == target:
            return Moved(True, source, target)
        body = json.loads(element)
        body["priority"] = priority.value
        if move(keys=[source, target], args=[element, json.dumps(body, separators=(",", ":"))]):
            return Moved(True, source, target)
    return Moved(False)
