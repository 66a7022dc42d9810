-- Recover a run whose owner is gone (a lost worker, a worker shutting down, a process that died
-- between reserve and claim): back to pending for another attempt, or error. Fenced: nothing
-- changes unless the hash still holds this run_id with this status, attempt and worker, so an
-- owner that wakes up later can never write into the new attempt (emit and finish are fenced by
-- attempt too), and a cancelled run is never brought back.
-- KEYS[1..5] the session's keys (see _lib.lua)
-- ARGV[1] run_id
-- ARGV[2] expected status: 'running' | 'pending'
-- ARGV[3] expected attempt
-- ARGV[4] expected worker ('' for a pending run)
-- ARGV[5] max attempts: requeue a running run while its attempt is below this (0: never)
-- ARGV[6] error message (the run's `error` field)
-- ARGV[7] error event JSON
-- ARGV[8] now, ISO-8601 UTC
-- ARGV[9] stream MAXLEN
-- ARGV[10] retention seconds (0 keeps the keys)
-- returns {'requeued', attempt}   status is pending again; the caller dispatches it (the next
--                                 claim increments attempt)
--       | {'error', event_id}     status error, with the terminal error event
--       | {'stale', status, current_run_id}   nothing changed

local h = redis.call('HMGET', RUNNER, 'run_id', 'status', 'attempt', 'worker', 'seq')
local attempt = tonumber(h[3]) or 0
if h[1] ~= ARGV[1] or h[2] ~= ARGV[2] or attempt ~= tonumber(ARGV[3])
    or (ARGV[2] == 'running' and h[4] ~= ARGV[4]) then
  return {'stale', h[2] or '', h[1] or ''}
end

if ARGV[2] == 'running' and attempt < tonumber(ARGV[5]) then
  redis.call('HSET', RUNNER, 'status', 'pending', 'worker', '', 'requeued_at', ARGV[8])
  return {'requeued', attempt}
end

local seq = (tonumber(h[5]) or 0) + 1
redis.call('HSET', RUNNER, 'status', 'error', 'completed_at', ARGV[8], 'last_event_at', ARGV[8],
  'seq', seq, 'error', ARGV[6])
local pos = stream_position()
local id = append(pos, ARGV[9], ARGV[1], seq, 'error', ARGV[7])
save_position(pos)
redis.call('DEL', CANCEL)
expire_session(ARGV[10])
return {'error', id}
