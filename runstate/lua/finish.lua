-- End a running run: completed or error. The terminal status is in the hash before the terminal
-- event is in the stream (both in this one script); then the session's keys get the retention TTL.
-- KEYS[1..5] the session's keys (see _lib.lua)
-- ARGV[1] run_id
-- ARGV[2] attempt
-- ARGV[3] status: 'completed' | 'error'
-- ARGV[4] terminal event type ('complete' | 'error')
-- ARGV[5] terminal event JSON
-- ARGV[6] error message ('' for none)
-- ARGV[7] now, ISO-8601 UTC
-- ARGV[8] stream MAXLEN
-- ARGV[9] retention seconds (0 keeps the keys)
-- KEYS[6], ARGV[10] optional, single server only: the active index and the session id, removed
--         from it unless the session holds an active run, whatever the answer
-- returns {'ok', event_id} | {'done'} (a retry of a finish that was applied)
--       | {'stale', status, current_run_id}

local ACTIVE = KEYS[6]
if ACTIVE then
  local refused = refuse_global('finish', ACTIVE, 'zset', 'ZREM')
  if refused then return refused end
end

local h = redis.call('HMGET', RUNNER, 'run_id', 'status', 'attempt', 'seq', 'last_event_id')
local answer = nil
if h[1] == ARGV[1] and h[2] == ARGV[3] and h[3] == ARGV[2] then
  answer = {'done'}
elseif h[1] ~= ARGV[1] or h[2] ~= 'running' or h[3] ~= ARGV[2] then
  answer = {'stale', h[2] or '', h[1] or ''}
end
if answer then
  if ACTIVE and not is_active(h[2]) then redis.call('ZREM', ACTIVE, ARGV[10]) end
  return answer
end
local seq = (tonumber(h[4]) or 0) + 1
redis.call('HSET', RUNNER, 'status', ARGV[3], 'completed_at', ARGV[7], 'last_event_at', ARGV[7],
  'seq', seq, 'error', ARGV[6])
local pos = stream_position(h[5])
local id = append(pos, ARGV[8], ARGV[1], seq, ARGV[4], ARGV[5])
save_position(pos)
redis.call('DEL', CANCEL)
expire_session(ARGV[9])
if ACTIVE then redis.call('ZREM', ACTIVE, ARGV[10]) end
return {'ok', id}
