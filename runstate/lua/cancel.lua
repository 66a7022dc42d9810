-- Cancel the session's active run. Pending: cancelled at once, no worker will start it.
-- Running: cancelled at once, the cancelled event written here, a durable marker set for the
-- worker and the nudge published, all in this one script. Nothing active: nothing changes.
-- KEYS[1..5] the session's keys (see _lib.lua)
-- ARGV[1] now, ISO-8601 UTC
-- ARGV[2] stream MAXLEN
-- ARGV[3] retention seconds (0 keeps the keys)
-- ARGV[4] cancelled event JSON
-- ARGV[5] request nonce (a retried cancel with the same nonce is answered as the first was)
-- ARGV[6] only cancel this run_id ('' for whatever is active)
-- ARGV[7] only cancel a run whose parent is this '<session> <run_id>' ('' for any)
-- ARGV[8] cancel marker TTL seconds
-- ARGV[9] the cancel channel (a channel, not a key: publishing stays Cluster-safe)
-- ARGV[10] the session id; the nudge is '<session> <run_id>' (keys.run_ref's format)
-- KEYS[6], KEYS[7] optional, single server only: the active index and the schedule; a cancelled
--         run leaves both here (on a cluster the client's pipeline does it). Either holding junk,
--         or closed to this ACL user, is stepped over: the stop button must work regardless, and
--         readers of the indexes skip entries whose run is not active.
-- returns {'cancelled', run_id, previous_status, child...} | {'none', status, run_id}

local ACTIVE, SCHEDULE = KEYS[6], KEYS[7]

local function unindex(run_id)
  if ACTIVE then
    redis.pcall('ZREM', ACTIVE, ARGV[10])
    redis.pcall('ZREM', SCHEDULE, ARGV[10] .. ' ' .. run_id)
  end
end

local h = redis.call('HMGET', RUNNER, 'run_id', 'status', 'cancel_nonce', 'parent', 'seq')
if h[2] == 'cancelled' and h[3] == ARGV[5] then
  unindex(h[1])
  return {'cancelled', h[1], 'cancelled', unpack(redis.call('SMEMBERS', CHILDREN))}
end
if not is_active(h[2]) or (ARGV[6] ~= '' and h[1] ~= ARGV[6])
    or (ARGV[7] ~= '' and h[4] ~= ARGV[7]) then
  return {'none', h[2] or '', h[1] or ''}
end
local seq = (tonumber(h[5]) or 0) + 1
redis.call('HSET', RUNNER, 'status', 'cancelled', 'completed_at', ARGV[1], 'last_event_at',
  ARGV[1], 'seq', seq, 'cancel_nonce', ARGV[5])
local pos = stream_position()
append(pos, ARGV[2], h[1], seq, 'cancelled', ARGV[4])
save_position(pos)
if h[2] == 'running' then
  redis.call('SET', CANCEL, h[1], 'EX', tonumber(ARGV[8]))
  redis.call('PUBLISH', ARGV[9], ARGV[10] .. ' ' .. h[1])
end
local children = redis.call('SMEMBERS', CHILDREN)
expire_session(ARGV[3])
unindex(h[1])
return {'cancelled', h[1], h[2], unpack(children)}
