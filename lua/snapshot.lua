#!lua flags=no-writes
--[[
  snapshot: a consistent read of the pool's counts and counters, for `provisioner status`,
  /metrics and the tests. Changes nothing.

  KEYS: the pool key vector (lua/includes/keys.lua)
  ARGV[1] now (ms)
  ARGV[2] window (ms)

  Returns {counts_json, stats_flat_list...}; counts has each structure's size, the users active
  and engaged in the window, oldest_session_ms (the start of the longest session, 0 if none)
  and oldest_wait_ms (when the user waiting the longest began to, 0 if none)
]]
--@include "includes/keys.lua"

local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
-- The waiting queue of a pool no writing script has run on since the upgrade is still a list
-- (keys.lua LEGACY_TYPES); this script writes nothing, so it counts either.
local is_list = rcall('TYPE', K.waiting)['ok'] == 'list'
local waiting = is_list and rcall('LLEN', K.waiting) or rcall('ZCARD', K.waiting)
-- The longest wait: users join the queue's back, so its first users waited the longest, but
-- for a crashed node's users, put at its front with the time of the crash. The earliest start of
-- the first WAIT_SCAN is the longest wait unless more of those lead the queue (then it reads
-- theirs, shorter). O(log n + 10).
local WAIT_SCAN = 10
local oldest_wait = 0
local first = is_list and rcall('LRANGE', K.waiting, 0, WAIT_SCAN - 1)
  or rcall('ZRANGE', K.waiting, 0, WAIT_SCAN - 1)
for _, user in ipairs(first) do
  local since = tonumber(rcall('HGET', K.waiting_since, user))
  -- a time, or nothing: nan, inf or a negative (only a hand edit writes one) would stop the
  -- JSON below, and with it `status` and every gauge
  if since and since > 0 and since < math.huge and (oldest_wait == 0 or since < oldest_wait) then
    oldest_wait = since
  end
end
local counts = {
  ready = rcall('LLEN', K.ready),
  booting = rcall('ZCARD', K.booting),
  allocated = rcall('HLEN', K.alloc),
  waiting = waiting,
  terminating = rcall('ZCARD', K.terminating),
  pending = rcall('ZCARD', K.pending),
  unclaimed = rcall('ZCARD', K.unclaimed),
  nodes = rcall('ZCARD', K.nodes),
  active = rcall('ZCOUNT', K.active, now - window, '+inf'),
  engaged = rcall('ZCOUNT', K.engaged, now - window, '+inf'),
}
-- The longest session running: when its user was handed the node (0 when none runs).
local oldest = rcall('ZRANGE', K.sessions, 0, 0, 'WITHSCORES')
counts.oldest_session_ms = tonumber(oldest[2]) or 0
counts.oldest_wait_ms = oldest_wait
local result = {cjson.encode(counts)}
for _, v in ipairs(rcall('HGETALL', K.stats)) do result[#result + 1] = v end
return result
