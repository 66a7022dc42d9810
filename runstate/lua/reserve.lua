-- Reserve a session for a new run (a new generation), unless its current run is active.
-- KEYS[1..5] the session's keys (see _lib.lua)
-- ARGV[1] new run_id (client-generated; a retried reserve with the same id is answered 'reserved')
-- ARGV[2] now, ISO-8601 UTC
-- ARGV[3] payload JSON ('' for none)
-- ARGV[4] parent '<session> <run_id>' ('' for none)
-- ARGV[5] due time in ms for a scheduled run ('' for now)
-- ARGV[6] dispatch mode: 'queue' (workers run it; the reaper re-dispatches it if it was never
--         dispatched) | 'local' (the reserving process runs it itself)
-- returns {'reserved', run_id} | {'already', current_run_id, status}

local cur = redis.call('HMGET', RUNNER, 'run_id', 'status')
if is_active(cur[2]) then
  if cur[1] == ARGV[1] then return {'reserved', ARGV[1]} end
  return {'already', cur[1], cur[2]}
end

local pos = stream_position()
redis.call('DEL', RUNNER, CRITICAL, CANCEL, CHILDREN)
redis.call('HSET', RUNNER, 'run_id', ARGV[1], 'status', 'pending', 'started_at', ARGV[2],
  'round_count', 0, 'seq', 0, 'attempt', 0, 'payload', ARGV[3], 'parent', ARGV[4],
  'due_at', ARGV[5], 'dispatch', ARGV[6])
if pos[2] > 0 then save_position(pos) end
redis.call('PERSIST', EVENTS)
return {'reserved', ARGV[1]}
