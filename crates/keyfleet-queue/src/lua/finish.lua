-- ARGV: prefix, id, fence, outcome (done|retry|dead|release|requeue), delay ms, error,
--       server fault (1: the server failed transiently), breaker threshold, breaker cool-down ms,
--       and optionally worker id, lease ms, probe lease ms: claim the worker's next job too
-- Returns {result, breaker event, claim...}; result 0 when the attempt is fenced out (its lease was
-- lost and the job moved on), 1 when applied, 2 when a retry was refused because the attempts are
-- spent (dead-lettered); breaker event 1 when the server's breaker opened, 2 when it closed; then,
-- if asked and the finish was not fenced out, what claim_next returned. The slot this finish frees
-- is claimed in the same call, as BullMQ's moveToFinished does: one script call per job.
-- release: give the job back unstarted (attempt and try refunded); requeue: run it again at once
-- with a fresh fence, attempt refunded but the try kept (it may have acted on the server).
local id = ARGV[2]
local job = jobkey(id)
local fields = redis.call('HMGET', job, 'state', 'fence', 'server', 'lock', 'idem')
if fields[1] ~= 'running' or fields[2] ~= ARGV[3] then
  return {0, 0}
end
local now = now_ms()
local s = fields[3]
redis.call('ZREM', P .. ':leases', id)
local inflight = release_slot(s)
release_lock(id, now, fields[4], true)
local outcome = ARGV[4]
local result = 1
local event = 0
if outcome == 'done' then
  event = breaker_record(s, true, 0, 0, now)
elseif ARGV[7] == '1' then
  event = breaker_record(s, false, tonumber(ARGV[8]), tonumber(ARGV[9]), now)
end
if outcome == 'done' then
  forget_idempotency(id, fields[5])
  redis.call('DEL', job)
  redis.call('HINCRBY', P .. ':counters', 'done', 1)
elseif outcome == 'retry' then
  local attempts = tonumber(redis.call('HGET', job, 'attempts'))
  if attempts >= tonumber(redis.call('HGET', job, 'max')) then
    bury(id, 'gave up after ' .. attempts .. ' attempts: ' .. ARGV[6], now)
    result = 2
  else
    redis.call('HSET', job, 'state', 'delayed', 'error', ARGV[6])
    redis.call('ZADD', P .. ':delayed', now + tonumber(ARGV[5]), id)
    redis.call('HINCRBY', P .. ':ndelayed', s, 1)
  end
elseif outcome == 'dead' then
  bury(id, ARGV[6], now)
elseif outcome == 'release' or outcome == 'requeue' then
  redis.call('HINCRBY', job, 'attempts', -1)
  if outcome == 'release' then
    redis.call('HINCRBY', job, 'tries', -1)
  else
    redis.call('HSET', job, 'error', ARGV[6])
  end
  make_ready(id, s, true, now)
else
  return redis.error_reply('unknown outcome ' .. outcome)
end
-- A freed slot can only make s claimable, unless this finish opened its breaker: if s is in the
-- ring, it stays.
local member = redis.call('SISMEMBER', P .. ':inring', s) == 1
if event == 1 or not member then
  refresh_and_wake(s, now, nil, inflight, member)
end
if ARGV[10] then
  return {result, event, unpack(claim_next(ARGV[10], tonumber(ARGV[11]), tonumber(ARGV[12]), now))}
end
return {result, event}
