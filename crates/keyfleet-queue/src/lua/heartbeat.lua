-- ARGV: prefix, lease ms, then pairs of (job id, fence)
-- Extends the leases still held; returns {id, fence, ...} of the attempts whose lease is lost: the job is gone (finished
-- meanwhile, or Redis lost it) or moved on to another attempt. The caller stops those attempts
-- still running, so a server never sees more than its limit.
local now = now_ms()
local lost = {}
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  local job = jobkey(id)
  if redis.call('HGET', job, 'state') == 'running' and redis.call('HGET', job, 'fence') == ARGV[i + 1] then
    redis.call('ZADD', P .. ':leases', 'XX', now + tonumber(ARGV[2]), id)
  else
    table.insert(lost, id)
    table.insert(lost, ARGV[i + 1])
  end
end
return lost
