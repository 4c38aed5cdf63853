-- ARGV: prefix, lease ms, then pairs of (job id, fence)
-- Extends the leases still held; returns the ids whose lease was lost to another attempt. A job
-- that finished between the caller's snapshot and this call (its hash is gone) is not lost.
local now = now_ms()
local lost = {}
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  local job = jobkey(id)
  local state = redis.call('HGET', job, 'state')
  if state == 'running' and redis.call('HGET', job, 'fence') == ARGV[i + 1] then
    redis.call('ZADD', P .. ':leases', 'XX', now + tonumber(ARGV[2]), id)
  elseif state and redis.call('HGET', job, 'fence') ~= ARGV[i + 1] then
    table.insert(lost, id)
  end
end
return lost
