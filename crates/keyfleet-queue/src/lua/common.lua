-- Shared helpers, prepended to every keyfleet script. ARGV[1] is the key prefix.
-- Keys (P = prefix):
--   P:job:<id>     hash: payload server kind max attempts fence state worker error idem enqueued_at
--   P:ready:<s>    list of ready job ids of server s (LPUSH in, RPOP out: FIFO)
--   P:ring         list of servers that can be claimed from now; P:inring is its member set
--   P:limits       hash server -> max in flight;  P:inflight  hash server -> claimed jobs
--   P:paused       zset server -> paused-until (ms): circuit breaker open
--   P:probe        hash server -> 1 while half-open (one probe job at a time)
--   P:failures     hash server -> consecutive transient failures
--   P:leases       zset id -> lease deadline (ms);  P:delayed  zset id -> due (ms)
--   P:dead         zset id -> dead-lettered at (ms);  P:idem:<key>  -> live job id
--   P:fence        the monotonic fence counter;  P:seq  the job id counter
local P = ARGV[1]

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function jobkey(id)
  return P .. ':job:' .. id
end

-- Keeps the ring invariant for server s: s is in the ring iff it has ready jobs, is below its
-- limit and is not paused. Returns true when s was added, i.e. an idle claimer may want to know.
local function refresh(s, now)
  local eligible = redis.call('LLEN', P .. ':ready:' .. s) > 0
  if eligible then
    local limit = tonumber(redis.call('HGET', P .. ':limits', s) or '1')
    if redis.call('HEXISTS', P .. ':probe', s) == 1 then
      limit = 1
    end
    local inflight = tonumber(redis.call('HGET', P .. ':inflight', s) or '0')
    local paused_until = tonumber(redis.call('ZSCORE', P .. ':paused', s) or '0')
    eligible = inflight < limit and paused_until <= now
  end
  local member = redis.call('SISMEMBER', P .. ':inring', s) == 1
  if eligible and not member then
    redis.call('SADD', P .. ':inring', s)
    redis.call('LPUSH', P .. ':ring', s)
    return true
  elseif member and not eligible then
    redis.call('SREM', P .. ':inring', s)
    redis.call('LREM', P .. ':ring', 1, s)
  end
  return false
end

local function wake(s)
  redis.call('PUBLISH', P .. ':wake', s)
end

local function refresh_and_wake(s, now)
  if refresh(s, now) then
    wake(s)
  end
end

-- front = true puts the job where the next claim of its server takes it (a released job).
local function make_ready(id, s, front, now)
  redis.call('HSET', jobkey(id), 'state', 'ready')
  if front then
    redis.call('RPUSH', P .. ':ready:' .. s, id)
  else
    redis.call('LPUSH', P .. ':ready:' .. s, id)
  end
  refresh_and_wake(s, now)
end

local function release_slot(s)
  if redis.call('HINCRBY', P .. ':inflight', s, -1) < 0 then
    redis.call('HSET', P .. ':inflight', s, 0)
  end
end

local function forget_idempotency(id)
  local idem = redis.call('HGET', jobkey(id), 'idem')
  if idem and redis.call('GET', P .. ':idem:' .. idem) == id then
    redis.call('DEL', P .. ':idem:' .. idem)
  end
end

local function bury(id, reason, now)
  redis.call('HSET', jobkey(id), 'state', 'dead', 'error', reason, 'dead_at', now)
  redis.call('ZADD', P .. ':dead', now, id)
  forget_idempotency(id)
end

local function promote_due(now, limit)
  local due = redis.call('ZRANGEBYSCORE', P .. ':delayed', '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(due) do
    redis.call('ZREM', P .. ':delayed', id)
    local s = redis.call('HGET', jobkey(id), 'server')
    if s then
      make_ready(id, s, false, now)
    end
  end
  return #due
end

-- Circuit breakers whose cool-down ended go half-open: one probe job at a time until a success.
local function half_open_due(now)
  local due = redis.call('ZRANGEBYSCORE', P .. ':paused', '-inf', now, 'LIMIT', 0, 16)
  for _, s in ipairs(due) do
    redis.call('ZREM', P .. ':paused', s)
    redis.call('HSET', P .. ':probe', s, 1)
    refresh_and_wake(s, now)
  end
end

-- Counts a success or a server-caused failure of server s; returns true when the breaker opened.
local function breaker_record(s, success, threshold, cooldown_ms, now)
  if success then
    redis.call('HDEL', P .. ':failures', s)
    redis.call('HDEL', P .. ':probe', s)
    return false
  end
  local n = redis.call('HINCRBY', P .. ':failures', s, 1)
  if n >= threshold then
    redis.call('HDEL', P .. ':probe', s)
    redis.call('ZADD', P .. ':paused', now + cooldown_ms, s)
    return true
  end
  return false
end
