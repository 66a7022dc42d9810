-- The atomic starting point of a new subscriber: what to replay and where live events begin.
-- KEYS[1..5] the session's keys (see _lib.lua)
-- KEYS[6] optional, single server only: the wake-up stream of the subscriber's event reader,
--         written (ARGV[1] 'always', or 'active' while the run is active) so that the reader
--         starts reading this session's stream without a round trip of its own
-- ARGV[2] the wake-up stream's TTL in ms
-- returns {run_id, status, last_event_id, last_budget_event, {critical...}, last_entry, wake_id}
--   last_entry is {id, {field, value, ...}} of the stream's last entry when the run has ended
--   (its terminal event, replayed to a late subscriber), else {}; wake_id is '' if not woken

local h = redis.call('HMGET', RUNNER, 'run_id', 'status', 'last_event_id', 'last_budget_event')
local last_id = h[3] or top_entry_id() or '0-0'
local critical = redis.call('LRANGE', CRITICAL, 0, -1)
local last_entry = {}
if h[2] and not is_active(h[2]) then
  local top = redis.call('XREVRANGE', EVENTS, '+', '-', 'COUNT', 1)
  if top[1] then last_entry = top[1] end
end
local wake_id = ''
local WAKE = KEYS[6]
if WAKE and (ARGV[1] == 'always' or is_active(h[2])) then
  -- Best effort: without it the reader is woken by a round trip of its own.
  local kind = redis.call('TYPE', WAKE)['ok']
  if (kind == 'none' or kind == 'stream')
      and (not redis.acl_check_cmd or redis.acl_check_cmd('XADD', WAKE, '*', 'w', '1')) then
    wake_id = redis.call('XADD', WAKE, 'MAXLEN', 1, '*', 'w', '1')
    redis.call('PEXPIRE', WAKE, ARGV[2])
  end
end
return {h[1] or '', h[2] or '', last_id, h[4] or '', critical, last_entry, wake_id}
