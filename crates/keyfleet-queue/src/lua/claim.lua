-- ARGV: prefix, worker id, lease ms, probe lease ms. See claim_next.lua.
return claim_next(ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
