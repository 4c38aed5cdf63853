-- ARGV: prefix, worker id, lease ms, probe lease ms, claims wanted (at least 1).
-- Returns what claim_next returned, one per claim, ending early at the first that was not a job or
-- a probe (which is included). See claim_next.lua.
return claim_many(ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), now_ms(), tonumber(ARGV[5] or '1'))
