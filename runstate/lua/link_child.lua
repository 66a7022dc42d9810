-- Record a child session spawned by the session's running run, so that cancelling this run
-- cancels the child too. Fenced like emit: refused once the run no longer owns the session
-- (the caller then cancels the child itself, since no cancel will find it here).
-- KEYS[1..5] the parent session's keys (see _lib.lua)
-- ARGV[1] parent run_id
-- ARGV[2] parent attempt
-- ARGV[3] child session id
-- returns {'ok'} | {'stale', status, current_run_id}

local h = redis.call('HMGET', RUNNER, 'run_id', 'status', 'attempt')
if h[1] ~= ARGV[1] or h[2] ~= 'running' or h[3] ~= ARGV[2] then
  return {'stale', h[2] or '', h[1] or ''}
end
redis.call('SADD', CHILDREN, ARGV[3])
return {'ok'}
