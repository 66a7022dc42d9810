-- Release a lock only if this holder still holds it (compare-and-delete).
-- Not a per-session script: _lib.lua is not prepended.
-- KEYS[1] the lock key
-- ARGV[1] the holder's token
-- returns 1 if released, 0 if the lock was not (or no longer) held with this token

if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
