-- The atomic starting point of a new subscriber: what to replay and where live events begin.
-- KEYS[1..5] the session's keys (see _lib.lua)
-- returns {run_id, status, last_event_id, last_budget_event, {critical...}, last_entry}
--   last_entry is {id, {field, value, ...}} of the stream's last entry when the run has ended
--   (its terminal event, replayed to a late subscriber), else {}

local h = redis.call('HMGET', RUNNER, 'run_id', 'status', 'last_event_id', 'last_budget_event')
local last_id = h[3] or top_entry_id() or '0-0'
local critical = redis.call('LRANGE', CRITICAL, 0, -1)
local last_entry = {}
if h[2] and not is_active(h[2]) then
  local top = redis.call('XREVRANGE', EVENTS, '+', '-', 'COUNT', 1)
  if top[1] then last_entry = top[1] end
end
return {h[1] or '', h[2] or '', last_id, h[4] or '', critical, last_entry}
