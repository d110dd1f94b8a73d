#!lua
--[[
  record_activity: a user:activity event.

  Adds the event's second to the user's activity window (a sorted set scored by timestamp),
  refreshes the pool-wide `active` set and, when the user has at least `threshold` events in the
  window and holds no node and is not waiting, marks the user engaged: `engaged` scores a user by
  the time of their threshold-th most recent event, so ZCOUNT(now - window, +inf) counts the users
  engaged *now* without any sweep.

  It also places the user on the browsing levels of the forecast (lua/includes/keys.lua): level
  k while at least k of their events are in the window.

  Idempotent: the window's member is the event's timestamp, so the same event applied by every
  replica counts once (two events of one user in the same second count once, too).

  KEYS: the pool key vector (lua/includes/keys.lua)
  ARGV[1] now (ms)
  ARGV[2] user id
  ARGV[3] event timestamp (ms)
  ARGV[4] window (ms)
  ARGV[5] engaged threshold (events within the window)
  ARGV[6] most events kept per user

  Returns {code, events_in_window}
    1 RECORDED   the event is new
    2 DUPLICATE  this user's event of this second is already recorded
    3 STALE      the event is older than the window: nothing recorded
]]
--@include "includes/keys.lua"

local now = tonumber(ARGV[1])
local user = ARGV[2]
local ts = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local threshold = tonumber(ARGV[5])
local cap = tonumber(ARGV[6])

if ts < now - window then
  stat('activity_stale')
  return {3, 0}
end

local ak = K.acts_prefix .. user
local added = rcall('ZADD', ak, ts, ts)
rcall('ZREMRANGEBYSCORE', ak, '-inf', '(' .. (now - window))
local n = rcall('ZCARD', ak)
if n > cap then
  rcall('ZREMRANGEBYRANK', ak, 0, n - cap - 1)
  n = cap
end
-- The window outlives its last event by a minute; a user who never comes back leaves nothing.
rcall('PEXPIRE', ak, window + 60000)
rcall('ZADD', K.active, 'GT', ts, user)

if added == 0 then
  return {2, n}
end
stat('activities')

if rcall('HEXISTS', K.alloc, user) == 1 or rcall('HEXISTS', K.waiting_since, user) == 1 then
  return {1, n}
end
if n >= threshold then
  local nth = rcall('ZRANGE', ak, -threshold, -threshold, 'WITHSCORES')
  rcall('ZADD', K.engaged, nth[2], user)
end
-- Browsing levels for the forecast: the time of the k-th most recent event places the user at
-- level k until that event leaves the window.
for _, k in ipairs(LEVELS) do
  if n < k then break end
  local kth = rcall('ZRANGE', ak, -k, -k, 'WITHSCORES')
  rcall('ZADD', K.levels, k * LEVEL_BAND + tonumber(kth[2]), k .. ':' .. user)
end
return {1, n}
