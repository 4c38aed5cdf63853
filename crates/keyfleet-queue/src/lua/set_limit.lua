-- ARGV: prefix, then pairs of (server, max in flight)
local now = now_ms()
for i = 2, #ARGV, 2 do
  redis.call('HSET', P .. ':limits', ARGV[i], ARGV[i + 1])
  refresh_and_wake(ARGV[i], now)
end
return 1
