"""The Lua scripts of ``queues.intake``, each touching the keys of one queue (one Redis Cluster slot) when
given one queue's keys; on a single Redis a take may cover all queues in one call."""

from __future__ import annotations

#: How deep into a list a take looks for a job whose pool has room, past jobs waiting for pools without room.
#: A take that looks this deep into a queue's list and finds nothing sets those jobs aside (per priority and
#: pool, ``Keys.aside``) and looks once more as deep, so a queue that mixes pools (seed-style producers) is
#: never blocked for long by one pool; queues named after their pool (what the producer does with
#: TASK_ROUTES) never need to look past the head.
SCAN_DEPTH = 256

# KEYS: per group its processing list, then its source lists: for a parked group its parked lists; for a
#       queue group, per priority: the set-aside lists of the source pools, the priority list, the set-aside
#       lists of all pools (where jobs skipped at that list's head go).
# ARGV: want, scan depth, default pool, limited (1: only jobs whose pool has budget; 0: any job),
#       route count R, R x (type, pool), pool count P, P x (pool, budget), pool count A, A x pool (every pool
#       a job can be routed to), then per group "<size>:<pool>" (a parked group, its lists all of that pool)
#       or "q:<priorities>" (a queue group). The source pools are the P pools with budget (limited) or the A.
# Round-robin over groups, one job per visit; within a group the first list with a job whose pool has room
# wins (a queue group: per priority, the jobs set aside for pools with room, then the list itself), and within
# a list the first such job, up to the scan depth: jobs for a pool without room stay where they are, in order,
# while jobs behind them for other pools are taken. When a priority list has no such job in its first `depth`,
# those jobs (all for pools without room) move, in order, to the tails of their pools' set-aside lists for
# that priority and the list is looked at once more, as deep: at most 2 x depth reads and depth moves per list
# and call. A set-aside job is taken before its list's jobs for the same pool, so its place and priority hold.
# A job that is not a JSON object with a string "type" is taken regardless (the dispatcher dead-letters it);
# it is never set aside. Returns source, element, pool triples, then how many jobs were set aside.
TAKE = """
local want = tonumber(ARGV[1])
local depth = tonumber(ARGV[2])
local default_pool = ARGV[3]
local limited = ARGV[4] == '1'
local a = 5
local routes = {}
for _ = 1, tonumber(ARGV[a]) do routes[ARGV[a + 1]] = ARGV[a + 2]; a = a + 2 end
a = a + 1
local budget, with_budget = {}, {}
for _ = 1, tonumber(ARGV[a]) do
  budget[ARGV[a + 1]] = tonumber(ARGV[a + 2]); with_budget[#with_budget + 1] = ARGV[a + 1]; a = a + 2
end
a = a + 1
local all_pools = {}
for _ = 1, tonumber(ARGV[a]) do all_pools[#all_pools + 1] = ARGV[a + 1]; a = a + 1 end
a = a + 1
local sources = limited and with_budget or all_pools
local groups, k = {}, 1
for i = a, #ARGV do
  local g = {proc = KEYS[k], lists = {}, alive = true, parked = true}
  k = k + 1
  local priorities = string.match(ARGV[i], '^q:(%d+)$')
  if priorities then
    g.parked = false
    for _ = 1, tonumber(priorities) do
      for _, pool in ipairs(sources) do g.lists[#g.lists + 1] = {key = KEYS[k], pool = pool}; k = k + 1 end
      local l = {key = KEYS[k], aside = {}}
      k = k + 1
      for _, pool in ipairs(all_pools) do l.aside[pool] = KEYS[k]; k = k + 1 end
      g.lists[#g.lists + 1] = l
    end
  else
    local size, pool = string.match(ARGV[i], '^(%d+):(.*)$')
    for _ = 1, tonumber(size) do g.lists[#g.lists + 1] = {key = KEYS[k], pool = pool}; k = k + 1 end
  end
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

local set_aside = 0
local lists = {}  -- per list: elements read so far (false once taken), their pools, how many were removed

-- The first `depth` elements read of a list were all skipped (or taken): the skipped ones are its head, in
-- order. Move them to their pools' set-aside lists; keep what was read beyond them. False if a job has no
-- set-aside list (its pool is not among all_pools): then nothing moves.
local function move_aside(key, st, aside)
  local n, by_target, order = 0, {}, {}
  for j = 1, depth do
    local el = st.els[j]
    if el then
      local target = aside[st.pools[j]]
      if target == nil then return false end
      if by_target[target] == nil then by_target[target] = {}; order[#order + 1] = target end
      local t = by_target[target]
      t[#t + 1] = el
      n = n + 1
    end
  end
  if n > 0 then
    redis.call('LTRIM', key, n, -1)
    for _, target in ipairs(order) do redis.call('RPUSH', target, unpack(by_target[target])) end
  end
  local els, pools = {}, {}
  for j = depth + 1, #st.els do els[#els + 1] = st.els[j]; pools[#pools + 1] = st.pools[j] end
  st.els, st.pools, st.removed, st.moved = els, pools, 0, true
  set_aside = set_aside + n
  return true
end

local function pick(l)
  local key, fixed = l.key, l.pool
  if fixed ~= nil and not room(fixed) then return nil end
  local st = lists[key]
  if st == nil then
    st = {els = {}, pools = {}, removed = 0, ended = false, moved = false}
    lists[key] = st
  end
  local i = 1
  while true do
    if i > depth then
      if fixed ~= nil or st.moved or not move_aside(key, st, l.aside) then return nil end
      i = 1
    end
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
end

-- Round-robin over the queues in their weighted order; each visit of a queue tries its parked lists first (a
-- pool's parked jobs were taken before any job still in that queue), then its own lists. Parked jobs of one
-- queue never go before another queue's turn: a queue's weight and priorities hold across queues.
local parked_of = {}
for _, g in ipairs(groups) do
  if g.parked then
    parked_of[g.proc] = parked_of[g.proc] or {}
    table.insert(parked_of[g.proc], g)
  end
end
local out, got = {}, 0
local function take_from(g)
  for _, l in ipairs(g.lists) do
    local el, pool = pick(l)
    if el then
      redis.call('RPUSH', g.proc, l.key .. '\\n' .. el)
      out[#out + 1] = l.key; out[#out + 1] = el; out[#out + 1] = pool or ''
      got = got + 1
      return true
    end
  end
  return false
end
local active = 0
for _, g in ipairs(groups) do if not g.parked then active = active + 1 end end
while got < want and active > 0 do
  for _, g in ipairs(groups) do
    if got >= want then break end
    if g.alive and not g.parked then
      local found = false
      for _, pg in ipairs(parked_of[g.proc] or {}) do
        if pg.alive then
          found = take_from(pg)
          if found then break end
          pg.alive = false
        end
      end
      if not found then found = take_from(g) end
      if not found then g.alive = false; active = active - 1 end
    end
  end
end
out[#out + 1] = set_aside
return out
"""


def _drain(push: str) -> str:
    """A script that empties KEYS[1] from its tail, each element ``el`` pushed back by ``push`` (Lua) onto
    the head of the list it belongs to, and returns how many it moved. ``SWEEP`` and ``RESTORE`` differ only
    in where an element goes back to; the loop that keeps the order is written once."""
    return f"""
local n = 0
while true do
  local el = redis.call('RPOP', KEYS[1])
  if not el then break end
{push}
  n = n + 1
end
return n
"""


# KEYS: a processing list. Newest first onto the head of each source list (of the same queue, so the same
# cluster slot), so the original order is back at the head. ARGV (optional): the default pool, the number of
# routes and the (task type, pool) pairs, then (priority list, prefix of its set-aside lists) pairs: a job
# taken from a priority list goes to the head of its pool's set-aside list of it instead when that holds jobs
# (a take serves it first, and took this job only while it was empty: all there is younger). Pushed onto
# the priority list, it went behind them (an outside review, 2026-12-02).
SWEEP = """
local default_pool, routes, aside_of, a = ARGV[1], {}, {}, 2
if default_pool then
  for _ = 1, tonumber(ARGV[a]) do routes[ARGV[a + 1]] = ARGV[a + 2]; a = a + 2 end
  a = a + 1
  while a + 1 <= #ARGV do aside_of[ARGV[a]] = ARGV[a + 1]; a = a + 2 end
end
""" + _drain(
    """  local nl = string.find(el, '\\n', 1, true)
  local source, raw = string.sub(el, 1, nl - 1), string.sub(el, nl + 1)
  local target, prefix = source, aside_of[source]
  if prefix then
    local ok, obj = pcall(cjson.decode, raw)
    if ok and type(obj) == 'table' and type(obj['type']) == 'string' then
      local aside = prefix .. (routes[obj['type']] or default_pool)
      if redis.call('EXISTS', aside) == 1 then target = aside end
    end
  end
  redis.call('LPUSH', target, raw)"""
)

# KEYS: a set-aside list, the priority list it was set aside from. Every job back at that list's head, in
# order (the last first onto the head), in one step: a take racing it finds them in one list or the other.
RESTORE = _drain("  redis.call('LPUSH', KEYS[2], el)")

# KEYS: lists; ARGV: one job per list, pushed at the heads from the last to the first (the first is first).
# A job already near the head of its list is not pushed again: a requeue whose replica wait failed is
# written, the database still has the task due, and the next tick requeues the very same job (a copy further
# down than 1,000 elements is only an extra copy, dropped when taken, as before).
REQUEUE = """
for i = #KEYS, 1, -1 do
  if not redis.call('LPOS', KEYS[i], ARGV[i], 'MAXLEN', 1000) then redis.call('LPUSH', KEYS[i], ARGV[i]) end
end
return #KEYS
"""

# A settlement (``Intake.settle``): ARGV holds (command, index of its key in KEYS, value) per operation,
# applied in order and at once. Not MULTI/EXEC: redis-py's asyncio cluster client queues each command of a
# transaction pipeline by running it to completion in a new thread with an event loop of its own, joined from
# the caller's loop; during a failover that command re-initialized the cluster client there, on connections
# and a lock of the caller's loop, which was blocked in the join: the dispatcher hung for good (CI, 24d7d42).
# The operations (and the types of their keys) are checked before any is applied: a malformed settlement, or
# one meeting a key that is not a list, changes nothing. ``lpushx`` pushes only onto a list that holds jobs;
# ``lpushelse``, right after it, pushes onto its own key only if that ``lpushx`` did not.
SETTLE = """
if #ARGV % 3 ~= 0 then
  return redis.error_reply('gpuq settle: ' .. #ARGV .. ' arguments, not operations of three')
end
for i = 1, #ARGV, 3 do
  local command, key = ARGV[i], KEYS[tonumber(ARGV[i + 1])]
  if key == nil or (command ~= 'lrem' and command ~= 'lpush' and command ~= 'rpush'
      and command ~= 'lpushx' and command ~= 'lpushelse') then
    return redis.error_reply('gpuq settle: bad operation ' .. tostring(command) .. ' at ' .. i)
  end
  local paired = (command == 'lpushx') == (ARGV[i + 3] == 'lpushelse')
  if not paired or (command == 'lpushelse') ~= (ARGV[i - 3] == 'lpushx') then
    return redis.error_reply('gpuq settle: lpushx and lpushelse come in pairs, at ' .. i)
  end
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'list' and kind ~= 'none' then
    return redis.error_reply('gpuq settle: ' .. key .. ' is a ' .. kind .. ', not a list')
  end
end
local pushed = 1
for i = 1, #ARGV, 3 do
  local command, key, value = ARGV[i], KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2]
  if command == 'lrem' then
    redis.call('LREM', key, 1, value)
  elseif command == 'lpushx' then
    pushed = redis.call('LPUSHX', key, value)
  elseif command == 'lpushelse' then
    if pushed == 0 then redis.call('LPUSH', key, value) end
    pushed = 1
  else
    redis.call(command, key, value)
  end
end
return #ARGV / 3
"""
