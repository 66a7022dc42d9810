-- Shared helpers, prepended by runstate.store to every per-session script.
-- Every per-session script receives the same KEYS, all in the session's hash slot:
--   KEYS[1] runner hash, KEYS[2] events stream, KEYS[3] critical list,
--   KEYS[4] cancel marker, KEYS[5] children set
-- On a single server, reserve, claim, finish, cancel and snapshot may also get global keys after
-- those (the queue, the indexes, a reader's wake-up stream), so that one round trip does all of
-- an operation; never on a cluster, where those keys live in other slots.

local RUNNER, EVENTS, CRITICAL, CANCEL, CHILDREN = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]

local function split_id(id)
  local dash = string.find(id, '-', 1, true)
  if not dash then return tonumber(id) or 0, 0 end
  return tonumber(string.sub(id, 1, dash - 1)) or 0, tonumber(string.sub(id, dash + 1)) or 0
end

local function top_entry_id()
  local top = redis.call('XREVRANGE', EVENTS, '+', '-', 'COUNT', 1)
  if top[1] then return top[1][1] end
  return nil
end

-- The position of the session's stream: {ms, n} of its last entry. n is the session's event
-- ordinal (1, 2, 3, ... across runs), so a subscriber can tell exactly how many events it missed.
-- known: the runner's last_event_id when the script has read it already (saves a call).
local function stream_position(known)
  local last = known or redis.call('HGET', RUNNER, 'last_event_id') or top_entry_id()
  if not last then return {0, 0} end
  local ms, n = split_id(last)
  return {ms, n}
end

-- Append one event to the session stream with the id <server ms>-<ordinal>; returns the id.
-- pos is the table from stream_position() and is advanced in place.
local function append(pos, maxlen, run_id, seq, etype, data)
  local t = redis.call('TIME')
  local ms = math.max(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), pos[1])
  local n = pos[2] + 1
  local id = string.format('%d-%d', ms, n)
  local res = redis.pcall('XADD', EVENTS, 'MAXLEN', '~', maxlen, id,
    'run', run_id, 'seq', seq, 'type', etype, 'data', data)
  if type(res) == 'table' and res.err then
    -- An entry written by hand moved the stream's top past our position: step over it.
    local top_ms = split_id(top_entry_id() or '0-0')
    ms = math.max(ms, top_ms + 1)
    id = string.format('%d-%d', ms, n)
    redis.call('XADD', EVENTS, 'MAXLEN', '~', maxlen, id,
      'run', run_id, 'seq', seq, 'type', etype, 'data', data)
  end
  pos[1], pos[2] = ms, n
  return id
end

local function save_position(pos)
  redis.call('HSET', RUNNER, 'last_event_id', string.format('%d-%d', pos[1], pos[2]),
    'event_count', pos[2])
end

-- Finished sessions expire after the retention period unless a new run starts first.
local function expire_session(retention)
  retention = tonumber(retention)
  if retention and retention > 0 then
    for _, key in ipairs({RUNNER, EVENTS, CRITICAL, CHILDREN}) do
      redis.call('EXPIRE', key, retention)
    end
  end
end

local function is_active(status)
  return status == 'pending' or status == 'running'
end

-- Before a script writes a global key: an error naming the key (and the command) if the ACL
-- user may not run one of the commands (...) on it, or if it holds another type than want (junk
-- written by hand); nil if the writes may go ahead. Checked before the script writes anything.
local function refuse_global(script, key, want, ...)
  for _, cmd in ipairs({...}) do
    if redis.acl_check_cmd and not redis.acl_check_cmd(cmd, key, '1', '1') then
      return redis.error_reply("NOPERM this user has no permissions to run the '" ..
        string.lower(cmd) .. "' command on " .. key .. ' (in the ' .. script .. ' script)')
    end
  end
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'none' and kind ~= want then
    return redis.error_reply('WRONGTYPE ' .. key .. ' is a ' .. kind .. ', not a ' .. want ..
      ' (junk written by hand?)')
  end
  return nil
end
