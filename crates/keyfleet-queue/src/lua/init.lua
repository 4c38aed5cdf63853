-- ARGV: prefix, epoch
-- Marks the queue initialised once the caller has raised P:fence past every fence of earlier
-- epochs. Returns 1 when this call initialised it (Redis was new or had lost keyfleet's state: the
-- caller re-derives outstanding work from Postgres), 0 when another caller already had.
if redis.call('SET', P .. ':epoch', ARGV[2], 'NX') then
  return 1
end
return 0
