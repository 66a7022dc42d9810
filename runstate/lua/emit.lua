-- Append a batch of events of a running run: fenced, idempotent on (run_id, seq), one round trip.
-- KEYS[1..5] the session's keys (see _lib.lua)
-- ARGV[1] run_id
-- ARGV[2] attempt
-- ARGV[3] seq of the first event in the batch (the run's events are numbered 1, 2, 3, ...)
-- ARGV[4] now, ISO-8601 UTC
-- ARGV[5] stream MAXLEN
-- ARGV[6] critical list cap
-- ARGV[7] number of events N, then 3 values per event: type, data JSON, meta: '' for a plain
--   event, else a JSON array [flags ('c' critical, 'b' budget), tool name ('' keeps the last),
--   tool phase ('' for no tool event), round count ('' for none), dedupe field (''), dedupe
--   value] (plain events, the tokens, carry no meta to decode)
-- (only KEYS[1..3] are needed here, and only they are sent)
-- returns {'ok', id...}        one id per event of the batch; events an earlier try of the
--                              same batch already wrote are not written twice (their ids are
--                              read back: they are the run's latest entries)
--       | {'stale', status, current_run_id}
--       | {'seq', expected_seq}   the batch does not follow the last written event

local h = redis.call('HMGET', RUNNER, 'run_id', 'status', 'attempt', 'seq', 'last_event_id')
if h[1] ~= ARGV[1] or h[2] ~= 'running' or h[3] ~= ARGV[2] then
  return {'stale', h[2] or '', h[1] or ''}
end
local seq = tonumber(h[4]) or 0
local first = tonumber(ARGV[3])
if first > seq + 1 then return {'seq', seq + 1} end

local pos = stream_position(h[5])
local ids = {'ok'}
if first <= seq then
  -- Nothing but this run has written since (it is running), so the events already written are
  -- the newest entries of the stream with this run's id and these sequence numbers.
  local want = math.min(seq, first + tonumber(ARGV[7]) - 1) - first + 1
  local found = {}
  for _, entry in ipairs(redis.call('XREVRANGE', EVENTS, '+', '-', 'COUNT', want + 16)) do
    local f = entry[2]
    local run, s = nil, nil
    for i = 1, #f, 2 do
      if f[i] == 'run' then run = f[i + 1] elseif f[i] == 'seq' then s = tonumber(f[i + 1]) end
    end
    if run == ARGV[1] and s and s >= first and s < first + want then found[s] = entry[1] end
  end
  for s = first, first + want - 1 do ids[#ids + 1] = found[s] or '' end
end
local diag = {}
local n = tonumber(ARGV[7])
for i = 0, n - 1 do
  local s = first + i
  if s > seq then
    local b = 8 + i * 3
    local etype, data, meta = ARGV[b], ARGV[b + 1], ARGV[b + 2]
    local flags, tool_name, tool_phase, rounds, dfield, dvalue = '', '', '', '', '', ''
    if meta ~= '' then
      local m = cjson.decode(meta)
      flags, tool_name, tool_phase, rounds, dfield, dvalue = m[1], m[2], m[3], m[4], m[5], m[6]
    end
    ids[#ids + 1] = append(pos, ARGV[5], ARGV[1], s, etype, data)
    seq = s
    if tool_phase ~= '' then
      if tool_name ~= '' then diag['last_tool_name'] = tool_name end
      diag['last_tool_phase'] = tool_phase
    end
    if rounds ~= '' then diag['round_count'] = rounds end
    if string.find(flags, 'b', 1, true) then diag['last_budget_event'] = data end
    if string.find(flags, 'c', 1, true) then
      local field, value = dfield, dvalue
      if field ~= '' then
        for _, old in ipairs(redis.call('LRANGE', CRITICAL, 0, -1)) do
          local ok, decoded = pcall(cjson.decode, old)
          if ok and type(decoded) == 'table' and decoded[field] == value then
            redis.call('LREM', CRITICAL, 0, old)
          end
        end
      end
      redis.call('RPUSH', CRITICAL, data)
      redis.call('LTRIM', CRITICAL, -tonumber(ARGV[6]), -1)
    end
  end
end

local fields = {'seq', seq, 'last_event_at', ARGV[4],
  'last_event_id', string.format('%d-%d', pos[1], pos[2]), 'event_count', pos[2]}
for k, v in pairs(diag) do
  fields[#fields + 1] = k
  fields[#fields + 1] = v
end
redis.call('HSET', RUNNER, unpack(fields))
return ids
