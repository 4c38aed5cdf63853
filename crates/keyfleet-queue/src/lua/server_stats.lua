-- ARGV: prefix
-- Every server the queue knows (has had jobs, a limit, or an operator's pause), read in one go:
-- for each, {server, ready, delayed, running, dead, limit (-1: never set), breaker (0 closed,
-- 1 open, 2 probing), paused by an operator (0|1)}. O(servers).
local seen, out = {}, {}
local function count(name, s)
  return tonumber(redis.call('HGET', P .. ':' .. name, s) or '0')
end
for _, list in ipairs({
  redis.call('SMEMBERS', P .. ':servers'),
  redis.call('HKEYS', P .. ':limits'),
  redis.call('SMEMBERS', P .. ':held'),
}) do
  for _, s in ipairs(list) do
    if not seen[s] then
      seen[s] = true
      local breaker = 0
      if redis.call('ZSCORE', P .. ':probing', s) then
        breaker = 2
      elseif redis.call('ZSCORE', P .. ':paused', s) then
        breaker = 1
      end
      table.insert(out, {s, count('nready', s), count('ndelayed', s), count('inflight', s),
        count('ndead', s), tonumber(redis.call('HGET', P .. ':limits', s) or '-1'), breaker,
        redis.call('SISMEMBER', P .. ':held', s)})
    end
  end
end
return out
