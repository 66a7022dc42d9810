-- Reserve a session for a new run (a new generation), unless its current run is active.
-- KEYS[1..5] the session's keys (see _lib.lua)
-- KEYS[6..8] optional, on a single server only (they are in other slots): the active index,
--            the dispatch queue and the schedule; given, the reservation also indexes the
--            session as active and (ARGV[9]) dispatches a won 'queue' run: execute() is one
--            round trip
-- ARGV[1] new run_id (client-generated; a retried reserve with the same id is answered 'reserved')
-- ARGV[2] now, ISO-8601 UTC
-- ARGV[3] payload JSON ('' for none)
-- ARGV[4] parent '<session> <run_id>' ('' for none)
-- ARGV[5] due time in ms for a scheduled run ('' for now)
-- ARGV[6] dispatch mode: 'queue' (workers run it; the reaper re-dispatches it if it was never
--         dispatched) | 'local' (the reserving process runs it itself)
-- ARGV[7..9] with KEYS[6..8]: the session id, now in ms (the active index's score), '1' to
--            dispatch a won 'queue' run ('' not to)
-- returns {'reserved', run_id} | {'already', current_run_id, status}

local ACTIVE, QUEUE, SCHEDULE = KEYS[6], KEYS[7], KEYS[8]
local DISPATCH = ACTIVE and ARGV[9] == '1' and ARGV[6] == 'queue'
if ACTIVE then
  local writes = {{ACTIVE, 'zset', 'ZADD'}}
  if DISPATCH and ARGV[5] == '' then table.insert(writes, {QUEUE, 'stream', 'XADD'}) end
  if DISPATCH and ARGV[5] ~= '' then table.insert(writes, {SCHEDULE, 'zset', 'ZADD'}) end
  for _, w in ipairs(writes) do
    local refused = refuse_global('reserve', w[1], w[2], w[3])
    if refused then return refused end
  end
  redis.call('ZADD', ACTIVE, 'NX', ARGV[8], ARGV[7])
end

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
if DISPATCH then
  if ARGV[5] == '' then
    redis.call('XADD', QUEUE, '*', 'session', ARGV[7], 'run', ARGV[1])
  else
    redis.call('ZADD', SCHEDULE, ARGV[5], ARGV[7] .. ' ' .. ARGV[1])
  end
end
return {'reserved', ARGV[1]}
