-- ARGV: prefix, cursor, batch
-- One SCAN step over this queue's keys, deleting what it finds. Returns {next cursor, deleted}.
-- A script, not a client-side SCAN: on a cluster it runs on the node that holds the queue's slot.
local pattern = string.gsub(P, '[%*%?%[%]\\]', '\\%0') .. ':*'
local found = redis.call('SCAN', ARGV[2], 'MATCH', pattern, 'COUNT', ARGV[3])
local deleted = 0
if #found[2] > 0 then
  deleted = redis.call('UNLINK', unpack(found[2]))
end
return {found[1], deleted}
