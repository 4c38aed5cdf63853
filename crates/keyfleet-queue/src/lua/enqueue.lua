-- ARGV: prefix, then per job 7 values: idempotency key, payload, server, kind, max attempts,
--       per-key lock ('' for none), lane (urgent|normal)
-- Returns per job {id, 1} for a new job, {id, 0} for the live job of the same operation,
-- {id, -1} when the key names a live job with a different payload, all in one flat list.
local now = now_ms()

local function enqueue_one(idem, payload, s, kind, max, lock, lane)
  local idem_key = P .. ':idem:' .. idem
  local existing = redis.call('GET', idem_key)
  if existing then
    local live = redis.call('HGET', jobkey(existing), 'payload')
    if live == payload then
      return existing, 0
    elseif live then
      return existing, -1
    end
  end
  local id = tostring(redis.call('INCR', P .. ':seq'))
  redis.call('HSET', jobkey(id), 'payload', payload, 'server', s, 'kind', kind, 'max', max,
    'attempts', 0, 'fence', 0, 'idem', idem, 'enqueued_at', now)
  if lock ~= '' then
    redis.call('HSET', jobkey(id), 'lock', lock)
  end
  if lane == 'urgent' then
    redis.call('HSET', jobkey(id), 'lane', 'urgent')
  end
  redis.call('SET', idem_key, id)
  redis.call('SADD', P .. ':servers', s)
  make_ready(id, s, false, now)
  return id, 1
end

local replies = {}
for i = 2, #ARGV, 7 do
  local id, code = enqueue_one(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4],
    ARGV[i + 5], ARGV[i + 6])
  table.insert(replies, id)
  table.insert(replies, code)
end
return replies
