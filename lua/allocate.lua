#!lua
--[[
  allocate: a user:connect event.

  A user who holds no node and is not waiting is counted as a connect. If a ready node exists
  (idle the longest first) it is the user's at once: a hit, published as user:allocated with
  waited_ms 0. Otherwise it is a miss: the user joins the back of the waiting queue and
  user:waiting is published; the next node that becomes ready or is freed goes to the oldest
  waiting user.

  A counted connect teaches the forecast (lua/includes/policy.lua): the horizon H before it is
  sampled at CREDIT_SAMPLES points, and each sample's share of H (seconds) is credited to the
  cell the user was in at that point ('r<i>_<j>'), or to 'r0' when the user was not browsing
  yet. Divided by the seconds users spent in each cell, that is the chance that a user seen in
  the cell connects within H. The user's activity window then starts afresh.

  A connect within RETURN_MS (30 s) of the same user's session ending, its node freed, or of
  their wait being abandoned, resumes that session (includes/pool.lua): it is counted, and
  served or queued, as any connect, and also in stats 'resumed', but it credits no cell, and
  the release that ended the session is taken back from the model's 'rel' (a session of
  milliseconds is no session learned; stats 'releases_taken_back'). A client reconnecting in a
  loop is one session to the forecast, not a crowd, whether it holds a node or waits for one.

  Idempotent: a connect of a user who already holds a node or already waits changes nothing and
  publishes nothing, so every replica may apply the same event.

  A miss is logged to the `decisions` stream (kind 'miss'; not again for a wait resumed): a short reason (what the pool held
  against its target at its last scaling decision, and how long before), that decision's
  numbers, time ('decided_ms') and whole reason ('decision'): what the pool expected and held
  when the user came.

  KEYS: the pool key vector (lua/includes/keys.lua)
  ARGV[1] now (ms)
  ARGV[2] user id
  ARGV[3] replica id, for the log (optional)
  ARGV[4] most entries kept in the decisions stream (optional, default 1000)
  ARGV[5] the replica's mark of the call, 'replica:batch:seq' (optional): a call made
          again after a reply lost is not applied again (made_again in includes/pool.lua)

  Returns {code, node_id, queue_position, resumed}
    1 ALLOCATED          {1, node, 0, resumed}
    2 WAITING            {2, '', position in the queue (1 = next), resumed}
    (resumed: 1 for a connect that resumed the user's session, else 0; absent below)
    3 ALREADY_ALLOCATED  {3, node, 0}
    4 ALREADY_WAITING    {4, '', 0}
    5 MADE_AGAIN         {5, node the user holds or '', 0}: this call already ran; nothing done
  Publishes: user:allocated {user_id, node_id, waited_ms} | user:waiting {user_id}
]]
--@include "includes/keys.lua"
--@include "includes/pool.lua"

refuse_wrong_types()  -- before any write: a script refused half-way keeps what it wrote

local CREDIT_SAMPLES = 7

local now = tonumber(ARGV[1])
local user = ARGV[2]
local replica = ARGV[3] or ''
local log_len = tonumber(ARGV[4]) or 1000

if made_again(ARGV[5]) then
  return {5, rcall('HGET', K.alloc, user) or '', 0}
end

local held = rcall('HGET', K.alloc, user)
if held then
  return {3, held, 0}
end
if rcall('HEXISTS', K.waiting_since, user) == 1 then
  return {4, '', 0}
end

stat('connects')
local resumed, released_before = session_resumed(user, now)
if resumed then
  stat('resumed')
end
if resumed and released_before then
  stat('releases_taken_back')
  -- Never below 0: HINCRBYFLOAT of a release count under 1 less its own double (not the
  -- decimal stored) left -1e-17, a value no script writes ('learned' reads it as nothing).
  local released = learned(rcall('HGET', K.model, 'rel'))
  if released and released > 1 then
    add_to(K.model, 'rel', -1, true)
  elseif released and released > 0 then
    rcall('HSET', K.model, 'rel', 0)
  end
end
-- The tick writes the horizon and window it forecasts with; until it has, there is no credit.
local model = rcall('HMGET', K.model, 'window_ms', 'horizon_ms')
local window, horizon = tonumber(model[1]), tonumber(model[2])
if window and horizon and not resumed then
  local ak = K.acts_prefix .. user
  local first = first_seen(user, now)
  local step = horizon / CREDIT_SAMPLES
  local credit = {}
  for m = 0, CREDIT_SAMPLES - 1 do
    local t = math.floor(now - horizon + (m + 0.5) * step)
    local count = rcall('ZCOUNT', ak, '(' .. (t - window), t)
    local i, j = cell_of(count, first, t)
    local field = i and ('r' .. i .. '_' .. j) or 'r0'
    credit[field] = (credit[field] or 0) + step / 1000
  end
  for field, seconds in pairs(credit) do
    add_to(K.model, field, seconds, true)
  end
end
forget_browsing(user)

local node = take_ready()
if node then
  stat('hits')
  assign(node, user, now, 0)
  return {1, node, 0, resumed and 1 or 0}
end

stat('misses')
enqueue_waiting(user, now, false)
local position = rcall('ZCARD', K.waiting)
if resumed and not released_before then
  -- The wait of a user who left the queue and came back within RETURN_MS goes on: its miss
  -- was logged when it began (a client looping while it waits filled the capped log with its
  -- misses, at 200 a second, and the scaling decisions went out of it).
  return {2, '', position, 1}
end
local last = rcall('HMGET', K.stats, 'last_decision', 'last_numbers', 'last_decision_ms')
local before = '; no scaling decision yet'
if last[1] and tonumber(last[3]) then
  -- Short enough for a status row: what the pool held against its target, and when it decided;
  -- the decision's whole reason (its forecast) goes in the entry's own 'decision' field.
  local numbers = last_decision_numbers(last[2])
  local stock = ''
  if numbers and tonumber(numbers.spare) then
    stock = string.format(' with spare %d (ready %d, booting %d) for a target of %d%s',
                          numbers.spare, tonumber(numbers.ready) or 0,
                          tonumber(numbers.booting) or 0, tonumber(numbers.target) or 0,
                          numbers.surge == true and ', surge' or '')
  end
  before = string.format('; the last decision was %.1fs before%s', (now - tonumber(last[3])) / 1000,
                         stock)
end
log_entry(log_len, now, replica, 'miss',
          string.format('user %s waits at position %d: no ready node%s', user, position, before),
          last[2] or '{}', 0, 'decided_ms', last[3] or '', 'decision', last[1] or '')
return {2, '', position, resumed and 1 or 0}
