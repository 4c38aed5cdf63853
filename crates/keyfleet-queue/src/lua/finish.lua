-- Ends attempts, several per call when a process's finishes arrive together, and claims the slots
-- they free in the same call, as BullMQ's moveToFinished does: in steady state a job costs at most
-- one script call, and under load a fraction of one.
-- ARGV: prefix, breaker threshold, breaker cool-down ms, worker id ('' claims nothing), lease ms,
--       probe lease ms, then per attempt 7 values: id, fence, outcome
--       (done|retry|dead|release|requeue), delay ms, error, server fault (1: the server failed
--       transiently), claim (1: claim a job for the slot this finish frees).
-- Returns {results, claims}: results holds per attempt its result (0 when the attempt is fenced
-- out: its lease was lost and the job moved on; 1 when applied; 2 when a retry was refused because
-- the attempts are spent: dead-lettered) and its breaker event (1 when the server's breaker opened,
-- 2 when it closed); claims holds what claim_next returned, one per applied finish that asked for
-- a claim, ending early at the first that was not a job or a probe (which is included).
-- release: give the job back unstarted (attempt and try refunded); requeue: run it again at once
-- with a fresh fence, attempt refunded but the try kept (it may have acted on the server).
local threshold, cooldown = tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()

local function finish_one(id, fence, outcome, delay, error, server_fault)
  local job = jobkey(id)
  local fields = redis.call('HMGET', job, 'state', 'fence', 'server', 'lock', 'idem')
  if fields[1] ~= 'running' or fields[2] ~= fence then
    return 0, 0
  end
  local s = fields[3]
  redis.call('ZREM', P .. ':leases', id)
  local inflight = release_slot(s)
  release_lock(id, now, fields[4], true)
  local result = 1
  local event = 0
  if outcome == 'done' then
    event = breaker_record(s, true, 0, 0, now)
  elseif server_fault == '1' then
    event = breaker_record(s, false, threshold, cooldown, now)
  end
  if outcome == 'done' then
    forget_idempotency(id, fields[5])
    redis.call('DEL', job)
    redis.call('HINCRBY', P .. ':counters', 'done', 1)
  elseif outcome == 'retry' then
    local attempts = tonumber(redis.call('HGET', job, 'attempts'))
    if attempts >= tonumber(redis.call('HGET', job, 'max')) then
      bury(id, 'gave up after ' .. attempts .. ' attempts: ' .. error, now)
      result = 2
    else
      redis.call('HSET', job, 'state', 'delayed', 'error', error)
      redis.call('ZADD', P .. ':delayed', now + tonumber(delay), id)
      redis.call('HINCRBY', P .. ':ndelayed', s, 1)
    end
  elseif outcome == 'dead' then
    bury(id, error, now)
  elseif outcome == 'release' or outcome == 'requeue' then
    redis.call('HINCRBY', job, 'attempts', -1)
    if outcome == 'release' then
      redis.call('HINCRBY', job, 'tries', -1)
    else
      redis.call('HSET', job, 'error', error)
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
  return result, event
end

local results, wanted = {}, 0
for i = 7, #ARGV, 7 do
  local result, event = finish_one(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5])
  if type(result) == 'table' then
    return result
  end
  table.insert(results, result)
  table.insert(results, event)
  if result ~= 0 and ARGV[i + 6] == '1' then
    wanted = wanted + 1
  end
end
local claims = {}
if ARGV[4] ~= '' and wanted > 0 then
  claims = claim_many(ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), now, wanted)
end
return {results, claims}
