#!lua
--[[
  record_activity: a user:activity event.

  Adds the event's second to the user's activity window (a sorted set scored by timestamp),
  refreshes the pool-wide `active` set and, when the user has at least `threshold` events in the
  window and holds no node and is not waiting, marks the user engaged: `engaged` scores a user by
  the time of their threshold-th most recent event, so ZCOUNT(now - window, +inf) counts the users
  engaged *now* without any sweep.

  For the forecast it places a browsing user in their cells (lua/includes/keys.lua): level k
  while at least k of their events are in the window, crossed with their age since first seen
  (kept in the user's seen key; a new one counts as an arrival, 'arr' in the model). A user who
  holds a node or waits is recorded but not placed. The window keeps two windows of events:
  allocate looks back one horizon (at most one window) for its credit.

  Idempotent: the window's member is the event's timestamp, so the same event applied by every
  replica counts once (two events of one user in the same second count once, too): the first
  copy in `activities`, each later one in `activity_duplicates`. A later copy returns as soon as
  its ZADD finds the second there: the first did the rest, so every further replica costs the
  server two commands a message (ZADD, ZCOUNT), beside the call's own (its key type checks and
  counters), not the whole script.

  One call applies one or more events in order, each as its own call would (a listener's burst
  goes in one call, its key vector sent once); the stats counters are added once at the end.

  KEYS: the pool key vector (lua/includes/keys.lua)
  ARGV[1] now (ms)
  ARGV[2] window (ms)
  ARGV[3] engaged threshold (events within the window)
  ARGV[4] most events kept per user
  ARGV[5], ARGV[6] the first event's user id and timestamp (ms); then each further event's

  Returns {code, events_in_window} for each event, one after another ({-1, error} for an event
  the server refused: it fails alone, as its own call would)
    1 RECORDED   the event is new
    2 DUPLICATE  this user's event of this second is already recorded
    3 STALE      the event is older than the window, or than every one of the user's last
                 `most events kept` (the cap would drop it at once): nothing recorded
]]
--@include "includes/keys.lua"

refuse_wrong_types()  -- before any write: a script refused half-way keeps what it wrote

local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local threshold = tonumber(ARGV[3])
local cap = tonumber(ARGV[4])
local keep_ms = 2 * window + 60000
local counts = {activities = 0, activity_duplicates = 0, activity_stale = 0}

-- One event: its code and the user's events in the window.
local function record(user, ts)
  if ts < now - window then
    counts.activity_stale = counts.activity_stale + 1
    return 3, 0
  end
  local ak = K.acts_prefix .. user
  if rcall('ZADD', ak, ts, ts) == 0 then
    -- Another replica's copy (or another request of the same second) came first and did the
    -- rest.
    counts.activity_duplicates = counts.activity_duplicates + 1
    return 2, rcall('ZCOUNT', ak, now - window, '+inf')
  end
  rcall('ZREMRANGEBYSCORE', ak, '-inf', '(' .. (now - 2 * window))
  local kept = rcall('ZCARD', ak)
  if kept > cap then
    rcall('ZREMRANGEBYRANK', ak, 0, kept - cap - 1)
    -- Older than every one of the `cap` kept: dropped as soon as added, so each replica's copy
    -- finds it gone and adds it again. Stale, as an event older than the window is, for every
    -- copy alike (a review: counted once per copy in `activities`).
    if not rcall('ZSCORE', ak, ts) then
      counts.activity_stale = counts.activity_stale + 1
      return 3, 0
    end
  end
  local n = rcall('ZCOUNT', ak, now - window, '+inf')
  -- The window outlives its last event by a minute; a user who never comes back leaves nothing.
  rcall('PEXPIRE', ak, keep_ms)
  -- Each new member here (and in `engaged` and the cells below) removes up to SWEEP_PER_ADD
  -- stale ones (lua/includes/keys.lua): the sets keep pace with any churn, and the tick's
  -- bounded trim only mops up after traffic stops.
  if rcall('ZADD', K.active, 'GT', ts, user) > 0 then
    trim_stale(K.active, now, window, SWEEP_PER_ADD)
  end
  counts.activities = counts.activities + 1

  if rcall('HEXISTS', K.alloc, user) == 1 or rcall('HEXISTS', K.waiting_since, user) == 1 then
    return 1, n
  end
  if n >= threshold then
    local nth = rcall('ZRANGE', ak, -threshold, -threshold, 'WITHSCORES')
    if rcall('ZADD', K.engaged, nth[2], user) > 0 then
      trim_stale(K.engaged, now, window, SWEEP_PER_ADD)
    end
  end
  -- Cells for the forecast. First seen: the first event since the user last had no node.
  local first = first_seen(user, now)
  if not first then
    first = math.min(ts, now)
    add_to(K.model, 'arr', 1, true)
  end
  rcall('SET', K.seen_prefix .. user, score(first) .. ':' .. score(now + keep_ms), 'PX', keep_ms)
  -- The time of the k-th most recent event places the user at level k until it leaves the
  -- window; for each age bucket the user is still young in, the cell's deadline is the earlier
  -- of the two.
  for i, k in ipairs(LEVELS) do
    if n < k then break end
    local kth = tonumber(rcall('ZRANGE', ak, -k, -k, 'WITHSCORES')[2])
    if rcall('ZADD', K.levels, score(k * LEVEL_BAND + kth), level_member(k, user)) > 0 then
      trim_stale_level(k, now, window, SWEEP_PER_ADD)
    end
    for j, limit in ipairs(AGES) do
      if first + limit > now then
        local deadline = math.min(kth + window, first + limit)
        local member = young_member(k, j, user)
        if rcall('ZADD', K.levels, score(young_band(i, j) + deadline), member) > 0 then
          trim_stale_young(i, j, now, SWEEP_PER_ADD)
        end
      end
    end
  end
  return 1, n
end

if #ARGV < 6 or (#ARGV - 4) % 2 ~= 0 then
  return redis.error_reply('record_activity: expected now, window, threshold, cap, then user '
                           .. 'and timestamp pairs; got ' .. #ARGV .. ' arguments')
end
local replies = {}
for a = 5, #ARGV - 1, 2 do
  -- An event the server refuses (a key of the wrong type, written by hand) fails alone, as its
  -- own call would: {-1, error}, and the events after it still apply.
  local ok, code, n = pcall(record, ARGV[a], tonumber(ARGV[a + 1]))
  if not ok then
    code, n = -1, type(code) == 'table' and tostring(code.err) or tostring(code)
  end
  replies[#replies + 1] = code
  replies[#replies + 1] = n
end
for _, field in ipairs({'activities', 'activity_duplicates', 'activity_stale'}) do
  if counts[field] > 0 then
    stat(field, counts[field])
  end
end
return replies
