-- ARGV: prefix, server, healthy (1|0), cool-down cap ms
-- Ends a health probe of an open breaker: healthy closes it (the server's jobs are claimable
-- again); unhealthy keeps it open for twice the last cool-down, up to the cap. Returns 1 closed,
-- 2 still open, 0 when the probe had already expired (reaped) and nothing changed.
local s = ARGV[2]
if redis.call('ZREM', P .. ':probing', s) == 0 then
  return 0
end
local now = now_ms()
release_slot(s)
if ARGV[3] == '1' then
  redis.call('HDEL', P .. ':failures', s)
  redis.call('HDEL', P .. ':cooldown', s)
  refresh_and_wake(s, now)
  return 1
end
local cooldown = math.min(2 * tonumber(redis.call('HGET', P .. ':cooldown', s) or '1000'), tonumber(ARGV[4]))
redis.call('HSET', P .. ':cooldown', s, cooldown)
redis.call('ZADD', P .. ':paused', now + cooldown, s)
return 2
