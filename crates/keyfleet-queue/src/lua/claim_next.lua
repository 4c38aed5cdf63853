-- The claim, shared by claim.lua and finish.lua (a finish may claim the worker's next job in the
-- same call). Takes the next job of the server at the head of the ring (round-robin over servers
-- that have work, a free slot, a closed breaker and no operator's pause). Returns {id, payload,
-- attempt, max, fence, server, enqueued_at, tries}; {'?', server} when that server's breaker is
-- due a health probe (the probe holds one of its slots until reported); {'!', 0} when Redis holds
-- no fence epoch (it lost keyfleet's state, or is new: nothing may be claimed before fences are
-- raised past Postgres); or {'', ms until the next delayed job or probe is due (-1: none; 0: look
-- again at once)}. now: the caller's clock reading, if it has one. again: this script call has
-- claimed before, so the epoch, the due retries and the due probes were looked at already.
local function claim_next(worker, lease_ms, probe_ms, now, again)
  now = now or now_ms()
  if not again then
    if redis.call('EXISTS', P .. ':epoch') == 0 then
      return {'!', 0}
    end
    promote_due(now, 100)
  end
  local due = again and {} or redis.call('ZRANGEBYSCORE', P .. ':paused', '-inf', now, 'LIMIT', 0, 16)
  for _, s in ipairs(due) do
    local limit = tonumber(redis.call('HGET', P .. ':limits', s) or '1')
    if is_held(s) then
      -- No probe while an operator holds the server: look again after a cool-down (resuming makes
      -- it due at once), so held servers do not crowd the due ones out of this window.
      redis.call('ZADD', P .. ':paused', now + tonumber(redis.call('HGET', P .. ':cooldown', s) or '1000'), s)
    elseif tonumber(redis.call('HGET', P .. ':inflight', s) or '0') < limit then
      redis.call('ZREM', P .. ':paused', s)
      redis.call('ZADD', P .. ':probing', now + probe_ms, s)
      redis.call('HINCRBY', P .. ':inflight', s, 1)
      return {'?', s}
    end
  end
  for _ = 1, 16 do
    local s = redis.call('RPOP', P .. ':ring')
    if not s then
      break
    end
    redis.call('SREM', P .. ':inring', s)
    local id, job, nready = pop_ready(s)
    while id do
      local lock = job[2]
      if not lock or acquire(id, lock) then
        break
      end
      id, job, nready = pop_ready(s)
    end
    if id then
      local inflight = redis.call('HINCRBY', P .. ':inflight', s, 1)
      local fence = redis.call('INCR', P .. ':fence')
      local attempt = tonumber(job[3] or '0') + 1
      -- Lifetime tries survive a replay (which refunds attempts): a replayed create must still
      -- look for the key its earlier tries may have made.
      local tries = tonumber(job[4] or '0') + 1
      redis.call('HSET', jobkey(id), 'state', 'running', 'fence', fence, 'worker', worker,
        'started_at', now, 'attempts', attempt, 'tries', tries)
      redis.call('ZADD', P .. ':leases', now + lease_ms, id)
      refresh(s, now, nready, inflight, false, true)
      return {id, job[5], attempt, job[6], fence, s, job[7], tries}
    end
    refresh(s, now, nil, nil, false, true)
  end
  if redis.call('LLEN', P .. ':ring') > 0 then
    -- Sixteen servers in a row had nothing claimable after all (cancelled ids, key locks).
    return {'', 0}
  end
  local wait = -1
  for _, set in ipairs({':delayed', ':paused'}) do
    local first = redis.call('ZRANGE', P .. set, 0, 0, 'WITHSCORES')
    if first[2] then
      local ms = math.max(0, tonumber(first[2]) - now)
      if wait < 0 or ms < wait then
        wait = ms
      end
    end
  end
  return {'', wait}
end

-- Up to n claims (at least one), ending at the first that was not a job or a probe (included).
local function claim_many(worker, lease_ms, probe_ms, now, n)
  local claims = {}
  for i = 1, math.max(1, n) do
    local claim = claim_next(worker, lease_ms, probe_ms, now, i > 1)
    table.insert(claims, claim)
    if claim[1] == '' or claim[1] == '!' then
      break
    end
  end
  return claims
end
