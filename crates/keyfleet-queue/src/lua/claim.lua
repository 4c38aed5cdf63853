-- ARGV: prefix, worker id, lease ms
-- Takes the next job of the server at the head of the ring (round-robin over servers that have
-- work and a free slot). Returns {id, payload, attempt, max, fence, server, enqueued_at, tries}, or
-- {'', ms until the next delayed job or paused server is due (-1: none)}.
local now = now_ms()
promote_due(now, 100)
half_open_due(now)
for _ = 1, 16 do
  local s = redis.call('RPOP', P .. ':ring')
  if not s then
    break
  end
  redis.call('SREM', P .. ':inring', s)
  local id = redis.call('RPOP', P .. ':ready:' .. s)
  if id then
    local job = jobkey(id)
    local payload = redis.call('HGET', job, 'payload')
    if payload then
      redis.call('HINCRBY', P .. ':inflight', s, 1)
      local fence = redis.call('INCR', P .. ':fence')
      local attempt = redis.call('HINCRBY', job, 'attempts', 1)
      -- Lifetime tries survive a replay (which refunds attempts): a replayed create must still
      -- look for the key its earlier tries may have made.
      local tries = redis.call('HINCRBY', job, 'tries', 1)
      redis.call('HSET', job, 'state', 'running', 'fence', fence, 'worker', ARGV[2], 'started_at', now)
      redis.call('ZADD', P .. ':leases', now + tonumber(ARGV[3]), id)
      refresh(s, now)
      return {id, payload, attempt, redis.call('HGET', job, 'max'), fence, s,
        redis.call('HGET', job, 'enqueued_at'), tries}
    end
  end
  refresh(s, now)
end
local wait = -1
for _, set in ipairs({':delayed', ':paused'}) do
  local first = redis.call('ZRANGE', P .. set, 0, 0, 'WITHSCORES')
  if first[2] then
    local ms = math.max(0, tonumber(first[2]) - now)
    if wait < 0 or ms < wait then
      wait = ms
    end
  end
end
return {'', wait}
