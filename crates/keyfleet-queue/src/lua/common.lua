-- Shared helpers, prepended to every keyfleet script. ARGV[1] is P, the hash tag `{prefix}`, and
-- KEYS[1] is P:epoch: every key below starts with P, so all of them share one cluster slot, and
-- the declared key routes the script to it.
-- Keys:
--   P:epoch        the fence epoch Postgres handed out; absent = Redis lost keyfleet's state
--   P:fence        the monotonic fence counter (raised past every earlier epoch at init);  P:seq  job ids
--   P:job:<id>     hash: payload server kind max attempts tries fence state worker error idem lock enqueued_at
--   P:ready:<s>    list of ready job ids of server s (LPUSH in, RPOP out: FIFO); may hold ids of
--                  cancelled jobs, which claims skip;  P:urgent:<s>  the same for the urgent lane
--                  (purchases), claimed first;  P:nready  hash server -> ready jobs, both lanes (exact)
--   P:streak       hash server -> urgent claims in a row while normal jobs wait (the anti-starvation
--                  turn: every URGENT_STREAK-th claim takes a normal job)
--   P:ring         list of servers that can be claimed from now; P:inring is its member set
--   P:limits       hash server -> max in flight;  P:inflight  hash server -> claimed jobs and probes
--   P:lock:<l>     the running job that holds per-key lock l (a key's create, delete and config
--                  sync never run at once);  P:waiting:<l>  list of jobs parked until l is free
--   P:paused       zset server -> next probe due (ms): circuit breaker open
--   P:probing      zset server -> probe deadline (ms): a health probe is in flight
--   P:failures     hash server -> consecutive transient failures;  P:cooldown  hash server -> ms
--   P:leases       zset id -> lease deadline (ms);  P:delayed  zset id -> due (ms)
--   P:dead         zset id -> dead-lettered at (ms);  P:idem:<key>  -> live job id
--   P:ndelayed, P:ndead  hash server -> jobs of s in P:delayed, P:dead (exact: every script that
--                  moves a job into or out of either set keeps them; init recounts them)
--   P:held         set of servers an operator paused: nothing is claimed from them, probes included
local P = ARGV[1]

-- Under a steady stream of purchases, a server's normal lane (sweeps, config syncs) still gets one
-- claim in URGENT_STREAK + 1.
local URGENT_STREAK = 8

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function jobkey(id)
  return P .. ':job:' .. id
end

-- Takes one off server s's count in hash P:<name> (nready, ndelayed, ndead, inflight), never
-- below zero. Returns the new count.
local function decrement(name, s)
  local n = redis.call('HINCRBY', P .. ':' .. name, s, -1)
  if n < 0 then
    redis.call('HSET', P .. ':' .. name, s, 0)
    return 0
  end
  return n
end

local function is_open(s)
  return redis.call('ZSCORE', P .. ':paused', s) or redis.call('ZSCORE', P .. ':probing', s)
end

local function is_held(s)
  return redis.call('SISMEMBER', P .. ':held', s) == 1
end

-- Keeps the ring invariant for server s: s is in the ring iff it has ready jobs, is below its
-- limit, its breaker is closed and no operator paused it. Returns true when s was added to an
-- empty ring: claimers go idle only on an empty ring, so only then is a wake-up worth publishing.
-- (A claim takes servers off the ring before it puts them back, but it publishes nothing.)
-- nready and inflight: s's counts if the caller has just read them (nil: read them here);
-- member: whether s is in the ring, if the caller knows; popped: the caller took s off the ring
-- in this script call, so its breaker is closed and no operator holds it (either takes a server
-- off the ring), and only its counts can have changed.
local function refresh(s, now, nready, inflight, member, popped)
  nready = nready or tonumber(redis.call('HGET', P .. ':nready', s) or '0')
  local eligible = nready > 0
  if eligible then
    local limit = tonumber(redis.call('HGET', P .. ':limits', s) or '1')
    inflight = inflight or tonumber(redis.call('HGET', P .. ':inflight', s) or '0')
    eligible = inflight < limit and (popped or (not is_open(s) and not is_held(s)))
  end
  if member == nil then
    member = redis.call('SISMEMBER', P .. ':inring', s) == 1
  end
  if eligible and not member then
    redis.call('SADD', P .. ':inring', s)
    return redis.call('LPUSH', P .. ':ring', s) == 1
  elseif member and not eligible then
    redis.call('SREM', P .. ':inring', s)
    redis.call('LREM', P .. ':ring', 1, s)
  end
  return false
end

local function wake(s)
  redis.call('PUBLISH', P .. ':wake', s)
end

local function refresh_and_wake(s, now, nready, inflight)
  if refresh(s, now, nready, inflight) then
    wake(s)
  end
end

local function ready_list(id, s)
  if redis.call('HGET', jobkey(id), 'lane') == 'urgent' then
    return P .. ':urgent:' .. s
  end
  return P .. ':ready:' .. s
end

-- front = true puts the job where the next claim of its server and lane takes it (a released job).
local function make_ready(id, s, front, now)
  redis.call('HSET', jobkey(id), 'state', 'ready')
  if front then
    redis.call('RPUSH', ready_list(id, s), id)
  else
    redis.call('LPUSH', ready_list(id, s), id)
  end
  redis.call('HINCRBY', P .. ':nready', s, 1)
  refresh_and_wake(s, now)
end

-- What a claim reads of a job hash, in one HMGET (see pop_live).
local CLAIM_FIELDS = {'state', 'lock', 'attempts', 'tries', 'payload', 'max', 'enqueued_at'}

-- The next job of a ready list that is still ready, taken off it; ids of cancelled jobs are
-- dropped on the way (they were uncounted when cancelled), so a cancelled backlog costs O(1) each.
-- Returns the id and its CLAIM_FIELDS, or nil with whether the list is now known to be empty.
local function pop_live(list)
  for _ = 1, 1000 do
    local id = redis.call('RPOP', list)
    if not id then
      return nil, true
    end
    local fields = redis.call('HMGET', jobkey(id), unpack(CLAIM_FIELDS))
    if fields[1] == 'ready' then
      return id, fields
    end
  end
  return nil, false
end

-- The next ready job of server s: the urgent lane first, except that after URGENT_STREAK urgent
-- claims in a row a waiting normal job goes (no lane starves the other). Returns the id, its
-- CLAIM_FIELDS and s's ready count after it; nil when s has no ready job.
local function pop_ready(s)
  local urgent, normal = P .. ':urgent:' .. s, P .. ':ready:' .. s
  local streak = tonumber(redis.call('HGET', P .. ':streak', s) or '0')
  local order = {urgent, normal}
  if streak >= URGENT_STREAK then
    order = {normal, urgent}
  end
  local drained = true
  for _, list in ipairs(order) do
    local id, fields = pop_live(list)
    if id then
      if list == urgent and redis.call('LLEN', normal) > 0 then
        redis.call('HINCRBY', P .. ':streak', s, 1)
      elseif streak > 0 then
        redis.call('HDEL', P .. ':streak', s)
      end
      return id, fields, decrement('nready', s)
    end
    drained = drained and fields
  end
  if drained then
    redis.call('HDEL', P .. ':nready', s)
  end
  return nil
end

local function release_slot(s)
  return decrement('inflight', s)
end

-- Takes job id's per-key lock. False when another running job holds it: the job is parked in the
-- lock's queue and made ready again when the holder finishes.
local function acquire(id, lock)
  local key = P .. ':lock:' .. lock
  if redis.call('SETNX', key, id) == 1 then
    return true
  end
  local holder = redis.call('GET', key)
  if holder and holder ~= id and redis.call('HGET', jobkey(holder), 'state') == 'running' then
    redis.call('HSET', jobkey(id), 'state', 'waiting')
    redis.call('RPUSH', P .. ':waiting:' .. lock, id)
    return false
  end
  redis.call('SET', key, id)
  return true
end

-- Frees the lock job id holds, if any, and readies the first job still waiting for it. lock: the
-- job's lock field if the caller has read it (false: none), nil to read it here. owned: the caller
-- checked that id runs under its current fence, so the lock is id's (a running job's lock is
-- never taken from it: acquire parks the others) and needs no look.
local function release_lock(id, now, lock, owned)
  if lock == nil then
    lock = redis.call('HGET', jobkey(id), 'lock')
  end
  if not lock then
    return
  end
  local key = P .. ':lock:' .. lock
  if owned or redis.call('GET', key) == id then
    redis.call('DEL', key)
  end
  local waiting = P .. ':waiting:' .. lock
  while true do
    local next = redis.call('LPOP', waiting)
    if not next then
      return
    end
    local job = jobkey(next)
    if redis.call('HGET', job, 'state') == 'waiting' then
      make_ready(next, redis.call('HGET', job, 'server'), true, now)
      return
    end
  end
end

-- idem: the job's idem field if the caller has read it (false: none), nil to read it here.
local function forget_idempotency(id, idem)
  if idem == nil then
    idem = redis.call('HGET', jobkey(id), 'idem')
  end
  if idem and redis.call('GET', P .. ':idem:' .. idem) == id then
    redis.call('DEL', P .. ':idem:' .. idem)
  end
end

local function bury(id, reason, now)
  local job = jobkey(id)
  redis.call('HSET', job, 'state', 'dead', 'error', reason, 'dead_at', now)
  redis.call('ZADD', P .. ':dead', now, id)
  redis.call('HINCRBY', P .. ':ndead', redis.call('HGET', job, 'server'), 1)
  forget_idempotency(id)
end

-- Takes job id out of the dead set (its hash stays). Returns false when it was not dead.
local function unbury(id)
  if redis.call('ZREM', P .. ':dead', id) == 0 then
    return false
  end
  local s = redis.call('HGET', jobkey(id), 'server')
  if s then
    decrement('ndead', s)
  end
  return true
end

local function promote_due(now, limit)
  local due = redis.call('ZRANGEBYSCORE', P .. ':delayed', '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(due) do
    redis.call('ZREM', P .. ':delayed', id)
    local s = redis.call('HGET', jobkey(id), 'server')
    if s then
      decrement('ndelayed', s)
      make_ready(id, s, false, now)
    end
  end
  return #due
end

-- Counts a success or a server-caused failure of server s. Returns 1 when the breaker opened,
-- 2 when a success closed an open breaker, 0 otherwise. An open breaker keeps the server out of
-- the ring (its jobs wait, spending no attempts) until a health probe succeeds.
local function breaker_record(s, success, threshold, cooldown_ms, now)
  if success then
    -- An open breaker always has its failures counted (only a success or a good probe clears
    -- both), so with none there is nothing to close.
    if redis.call('HDEL', P .. ':failures', s) == 0 then
      return 0
    end
    if redis.call('ZREM', P .. ':paused', s) == 1 then
      redis.call('HDEL', P .. ':cooldown', s)
      return 2
    end
    return 0
  end
  local n = redis.call('HINCRBY', P .. ':failures', s, 1)
  if n >= threshold and not is_open(s) then
    redis.call('HSET', P .. ':cooldown', s, cooldown_ms)
    redis.call('ZADD', P .. ':paused', now + cooldown_ms, s)
    return 1
  end
  return 0
end
