-- Claim a pending run for a worker: pending -> running, then write execution_started.
-- KEYS[1..5] the session's keys (see _lib.lua)
-- ARGV[1] run_id
-- ARGV[2] worker id
-- ARGV[3] now, ISO-8601 UTC
-- ARGV[4] stream MAXLEN
-- KEYS[6], ARGV[5], ARGV[6] optional, single server only: the dispatch queue, its group and the
--         id of the entry that dispatched the run, acknowledged and deleted whatever the answer
-- returns {'ok', attempt, seq, payload, parent, event_id}  (a retried claim by the same worker
--           gets the same answer with event_id '')
--       | {'stale', status, current_run_id}

local QUEUE = KEYS[6]
if QUEUE then
  local refused = refuse_global('claim', QUEUE, 'stream', 'XACK', 'XDEL')
  if refused then return refused end
  redis.call('XACK', QUEUE, ARGV[5], ARGV[6])
  redis.call('XDEL', QUEUE, ARGV[6])
end

local h = redis.call('HMGET', RUNNER, 'run_id', 'status', 'worker', 'attempt', 'seq', 'payload',
  'parent')
if h[1] ~= ARGV[1] then return {'stale', h[2] or '', h[1] or ''} end
if h[2] == 'running' and h[3] == ARGV[2] then
  return {'ok', tonumber(h[4]), tonumber(h[5]), h[6] or '', h[7] or '', ''}
end
if h[2] ~= 'pending' then return {'stale', h[2] or '', h[1]} end

local attempt = (tonumber(h[4]) or 0) + 1
local seq = (tonumber(h[5]) or 0) + 1
redis.call('HSET', RUNNER, 'status', 'running', 'worker', ARGV[2], 'attempt', attempt,
  'claimed_at', ARGV[3], 'last_event_at', ARGV[3], 'seq', seq)
local pos = stream_position()
local data = string.format('{"type":"execution_started","run_id":"%s","attempt":%d}', ARGV[1],
  attempt)
local id = append(pos, ARGV[4], ARGV[1], seq, 'execution_started', data)
save_position(pos)
return {'ok', attempt, seq, h[6] or '', h[7] or '', id}
