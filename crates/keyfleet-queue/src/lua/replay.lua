-- ARGV: prefix, then job ids
-- Moves dead jobs back to their ready queue with fresh attempts. Returns one code per id:
-- 1 replayed, 0 not in the dead set, 2 superseded (a live job for the same operation exists; the
-- dead one is dropped).
local now = now_ms()
local out = {}
for i = 2, #ARGV do
  local id = ARGV[i]
  local job = jobkey(id)
  if not unbury(id) then
    table.insert(out, 0)
  else
    local idem = redis.call('HGET', job, 'idem')
    local live = idem and redis.call('GET', P .. ':idem:' .. idem)
    if live and live ~= id then
      redis.call('DEL', job)
      table.insert(out, 2)
    else
      if idem then
        redis.call('SET', P .. ':idem:' .. idem, id)
      end
      redis.call('HSET', job, 'attempts', 0, 'replayed_at', now)
      make_ready(id, redis.call('HGET', job, 'server'), false, now)
      table.insert(out, 1)
    end
  end
end
return out
