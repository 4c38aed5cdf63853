-- ARGV: prefix, then idempotency keys
-- Cancels the live jobs of those operations that have not started (ready, delayed, or waiting for
-- their key's lock); a running one finishes, and its write-back no longer applies to a key being
-- deleted. A cancelled id may stay in its ready or waiting list: claims skip ids whose job is gone,
-- and the ready count drops now. Returns how many were cancelled.
local n = 0
for i = 2, #ARGV do
  local key = P .. ':idem:' .. ARGV[i]
  local id = redis.call('GET', key)
  if id then
    local job = jobkey(id)
    local state = redis.call('HGET', job, 'state')
    if state == 'ready' or state == 'delayed' or state == 'waiting' then
      local s = redis.call('HGET', job, 'server')
      if state == 'ready' then
        decrement('nready', s)
        refresh(s, now_ms())
      elseif redis.call('ZREM', P .. ':delayed', id) == 1 then
        decrement('ndelayed', s)
      end
      redis.call('DEL', job, key)
      n = n + 1
    end
  end
end
return n
