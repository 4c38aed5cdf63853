-- ARGV: prefix, epoch
-- Marks the queue initialised once the caller has raised P:fence past every fence of earlier
-- epochs. Returns 1 when this call initialised it (Redis was new, had lost keyfleet's state, or was
-- written by a version without epochs), 0 when another caller already had.
if not redis.call('SET', P .. ':epoch', ARGV[2], 'NX') then
  return 0
end
-- Ready lists a version without ready counts left behind are counted (ids of cancelled jobs too:
-- claims drop those and fix the count when the list runs out), so their jobs are claimable.
local now = now_ms()
for _, s in ipairs(redis.call('SMEMBERS', P .. ':servers')) do
  if redis.call('HEXISTS', P .. ':nready', s) == 0 then
    local n = redis.call('LLEN', P .. ':ready:' .. s) + redis.call('LLEN', P .. ':urgent:' .. s)
    if n > 0 then
      redis.call('HSET', P .. ':nready', s, n)
      refresh_and_wake(s, now)
    end
  end
end
-- The per-server delayed and dead counts are recounted from their sets, whatever an earlier version
-- (or a script before this initialisation) left in them. O(delayed + dead), once per data loss.
for _, set in ipairs({'delayed', 'dead'}) do
  local counts = {}
  for _, id in ipairs(redis.call('ZRANGE', P .. ':' .. set, 0, -1)) do
    local s = redis.call('HGET', jobkey(id), 'server')
    if s then
      counts[s] = (counts[s] or 0) + 1
    end
  end
  redis.call('DEL', P .. ':n' .. set)
  for s, n in pairs(counts) do
    redis.call('HSET', P .. ':n' .. set, s, n)
  end
end
return 1
