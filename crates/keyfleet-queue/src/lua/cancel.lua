-- ARGV: prefix, then idempotency keys
-- Cancels the live jobs of those operations that have not started (ready or delayed); a running
-- one finishes, and its write-back no longer applies to a key being deleted. A cancelled id may
-- stay in its ready list: claims skip ids whose job is gone. Returns how many were cancelled.
local n = 0
for i = 2, #ARGV do
  local key = P .. ':idem:' .. ARGV[i]
  local id = redis.call('GET', key)
  if id then
    local state = redis.call('HGET', jobkey(id), 'state')
    if state == 'ready' or state == 'delayed' then
      redis.call('ZREM', P .. ':delayed', id)
      redis.call('DEL', jobkey(id), key)
      n = n + 1
    end
  end
end
return n
