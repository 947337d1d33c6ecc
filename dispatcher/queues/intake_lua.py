"""The Lua scripts of ``queues.intake``, each touching the keys of one queue (one Redis Cluster slot) when
given one queue's keys; on a single Redis a take may cover all queues in one call."""

from __future__ import annotations

#: How deep into a list a take looks for a job whose pool has room, past jobs waiting for full pools. The
#: bound on head-of-line blocking in a queue that mixes pools (seed-style producers); queues named after
#: their pool (what the producer does with TASK_ROUTES) never need to look past the head.
SCAN_DEPTH = 256

# KEYS: per group its processing list, then its source lists.
# ARGV: want, scan depth, default pool, limited (1: only jobs whose pool has budget; 0: any job),
#       route count R, R x (type, pool), pool count P, P x (pool, budget),
#       then per group "<size>:<pool>" (pool empty: a queue, each job's pool by its type; else a parked list).
# Round-robin over groups, one job per visit; within a group the first priority list with a job whose pool
# has room wins, and within a list the first such job (up to the scan depth): jobs for a full pool stay where
# they are, in order, while jobs behind them for other pools are taken. A job that is not a JSON object with
# a string "type" is taken regardless (the dispatcher dead-letters it). Returns source, element, pool triples.
TAKE = """
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
local groups, k = {}, 1
for i = a, #ARGV do
  local size, pool = string.match(ARGV[i], '^(%d+):(.*)$')
  local g = {proc = KEYS[k], keys = {}, pool = pool ~= '' and pool or nil, alive = true}
  k = k + 1
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
          redis.call('RPUSH', g.proc, key .. '\\n' .. el)
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

# KEYS: a processing list. Newest first onto the head of each source list (of the same queue, so the same
# cluster slot), so the original order is back at the head.
SWEEP = """
local n = 0
while true do
  local el = redis.call('RPOP', KEYS[1])
  if not el then break end
  local nl = string.find(el, '\\n', 1, true)
  redis.call('LPUSH', string.sub(el, 1, nl - 1), string.sub(el, nl + 1))
  n = n + 1
end
return n
"""

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
