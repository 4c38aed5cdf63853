-- ARGV: prefix, worker id, lease ms, probe lease ms, claims wanted (at least 1).
-- Returns what claim_next returned, one per claim, ending early at the first that was not a job or
-- a probe (which is included). See claim_next.lua.
local now = now_ms()
local claims = {}
for i = 1, math.max(1, tonumber(ARGV[5] or '1')) do
  local claim = claim_next(ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), now, i > 1)
  table.insert(claims, claim)
  if claim[1] == '' or claim[1] == '!' then
    break
  end
end
return claims
