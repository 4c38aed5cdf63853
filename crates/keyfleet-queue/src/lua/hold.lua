-- ARGV: prefix, server, 1 (pause) | 0 (resume)
-- An operator's pause: a held server leaves the ring and gets no health probe; its running jobs
-- finish and enqueues still queue. Resuming puts it back in the ring at once and wakes idle
-- workers; an open breaker's probe becomes due at once. Returns 0 when it already was in that state.
local s = ARGV[2]
local now = now_ms()
if ARGV[3] == '1' then
  if redis.call('SADD', P .. ':held', s) == 0 then
    return 0
  end
  refresh(s, now)
  return 1
end
if redis.call('SREM', P .. ':held', s) == 0 then
  return 0
end
redis.call('ZADD', P .. ':paused', 'XX', 'LT', now, s)
refresh(s, now)
wake(s)
return 1
