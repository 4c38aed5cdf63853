-- ARGV: prefix, max jobs
-- Takes back jobs whose lease expired (their worker died or stalled). The attempt was counted at
-- claim time, so a job that keeps killing its workers ends in the dead set. A health probe whose
-- worker died gives its slot back and is due again.
-- Returns {expired leases handled, then for each job dead-lettered here: id, payload, fence, reason}, so
-- the caller can record those failures where the job's worker no longer can.
local now = now_ms()
for _, s in ipairs(redis.call('ZRANGEBYSCORE', P .. ':probing', '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('ZREM', P .. ':probing', s)
  release_slot(s)
  redis.call('ZADD', P .. ':paused', now, s)
end
local expired = redis.call('ZRANGEBYSCORE', P .. ':leases', '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local out = {#expired}
for _, id in ipairs(expired) do
  redis.call('ZREM', P .. ':leases', id)
  local job = jobkey(id)
  local s = redis.call('HGET', job, 'server')
  if s and redis.call('HGET', job, 'state') == 'running' then
    release_slot(s)
    release_lock(id, now)
    local attempts = tonumber(redis.call('HGET', job, 'attempts'))
    local reason = 'worker ' .. (redis.call('HGET', job, 'worker') or '?') .. ' lost its lease (crashed or stalled)'
    if attempts >= tonumber(redis.call('HGET', job, 'max')) then
      local error = 'gave up after ' .. attempts .. ' attempts: ' .. reason
      bury(id, error, now)
      for _, v in ipairs({id, redis.call('HGET', job, 'payload'), redis.call('HGET', job, 'fence'), error}) do
        table.insert(out, v)
      end
    else
      redis.call('HSET', job, 'error', reason)
      make_ready(id, s, false, now)
    end
    refresh_and_wake(s, now)
  end
end
return out
