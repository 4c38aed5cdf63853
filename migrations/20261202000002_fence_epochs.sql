-- Fence epochs: every time Redis is found without keyfleet's state (new, wiped, or restored from
-- an old snapshot), workers take the next epoch from here and raise Redis's fence counter to
-- epoch << 40 before claiming anything. Fences therefore never go backwards relative to what
-- Postgres has stored, whatever happened to Redis.
CREATE SEQUENCE fence_epochs START 1;
