-- ARGV: prefix, dead before (ms; 0: no age limit), keep at most (count; -1: no count limit), batch
-- Deletes dead jobs older than the cut-off and the oldest beyond the count. Returns how many.
local n = 0
local batch = tonumber(ARGV[4])
local function drop(ids)
  for _, id in ipairs(ids) do
    unbury(id)
    redis.call('DEL', jobkey(id))
    n = n + 1
  end
end
if tonumber(ARGV[2]) > 0 then
  drop(redis.call('ZRANGEBYSCORE', P .. ':dead', '-inf', '(' .. ARGV[2], 'LIMIT', 0, batch))
end
local keep = tonumber(ARGV[3])
if keep >= 0 then
  local excess = redis.call('ZCARD', P .. ':dead') - keep
  if excess > 0 then
    drop(redis.call('ZRANGE', P .. ':dead', 0, math.min(excess, batch) - 1))
  end
end
return n
