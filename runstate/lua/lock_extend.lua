-- Extend a lock's TTL only if this holder still holds it (compare-and-pexpire).
-- Not a per-session script: _lib.lua is not prepended.
-- KEYS[1] the lock key
-- ARGV[1] the holder's token
-- ARGV[2] the new TTL in milliseconds
-- returns 1 if extended, 0 if the lock was not (or no longer) held with this token

if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 0
