-- ARGV: prefix, then job ids
-- Deletes dead jobs for good. Returns one code per id: 1 discarded, 0 not in the dead set.
local out = {}
for i = 2, #ARGV do
  if unbury(ARGV[i]) then
    redis.call('DEL', jobkey(ARGV[i]))
    table.insert(out, 1)
  else
    table.insert(out, 0)
  end
end
return out
