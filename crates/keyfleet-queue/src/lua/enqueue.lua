-- ARGV: prefix, idempotency key, payload, server, kind, max attempts, per-key lock ('' for none),
--       lane (urgent|normal)
-- Returns {id, 1} for a new job, {id, 0} for the live job of the same operation,
-- {id, -1} when the key names a live job with a different payload.
local idem_key = P .. ':idem:' .. ARGV[2]
local existing = redis.call('GET', idem_key)
if existing then
  local payload = redis.call('HGET', jobkey(existing), 'payload')
  if payload == ARGV[3] then
    return {existing, 0}
  elseif payload then
    return {existing, -1}
  end
end
local now = now_ms()
local id = tostring(redis.call('INCR', P .. ':seq'))
local s = ARGV[4]
redis.call('HSET', jobkey(id), 'payload', ARGV[3], 'server', s, 'kind', ARGV[5], 'max', ARGV[6],
  'attempts', 0, 'fence', 0, 'idem', ARGV[2], 'enqueued_at', now)
if ARGV[7] ~= '' then
  redis.call('HSET', jobkey(id), 'lock', ARGV[7])
end
if ARGV[8] == 'urgent' then
  redis.call('HSET', jobkey(id), 'lane', 'urgent')
end
redis.call('SET', idem_key, id)
redis.call('SADD', P .. ':servers', s)
make_ready(id, s, false, now)
return {id, 1}
