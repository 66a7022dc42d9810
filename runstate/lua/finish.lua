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
-- returns {'ok', event_id} | {'done'} (a retry of a finish that was applied)
--       | {'stale', status, current_run_id}

local h = redis.call('HMGET', RUNNER, 'run_id', 'status', 'attempt', 'seq')
if h[1] == ARGV[1] and h[2] == ARGV[3] and h[3] == ARGV[2] then return {'done'} end
if h[1] ~= ARGV[1] or h[2] ~= 'running' or h[3] ~= ARGV[2] then
  return {'stale', h[2] or '', h[1] or ''}
end
local seq = (tonumber(h[4]) or 0) + 1
redis.call('HSET', RUNNER, 'status', ARGV[3], 'completed_at', ARGV[7], 'last_event_at', ARGV[7],
  'seq', seq, 'error', ARGV[6])
local pos = stream_position()
local id = append(pos, ARGV[8], ARGV[1], seq, ARGV[4], ARGV[5])
save_position(pos)
redis.call('DEL', CANCEL)
expire_session(ARGV[9])
return {'ok', id}
