#!lua flags=no-writes
--[[
  snapshot: a consistent read of the pool's counts and counters, for `provisioner status`,
  /metrics and the tests. Changes nothing.

  KEYS: the pool key vector (lua/includes/keys.lua)
  ARGV[1] now (ms)
  ARGV[2] window (ms)

  Returns {counts_json, stats_flat_list...}; counts has each structure's size, the users active
  and engaged in the window, and oldest_session_ms (the start of the longest session, 0 if none)
]]
--@include "includes/keys.lua"

local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
-- The waiting queue of a pool no writing script has run on since the upgrade is still a list
-- (keys.lua LEGACY_TYPES); this script writes nothing, so it counts either.
local waiting = rcall('TYPE', K.waiting)['ok'] == 'list' and rcall('LLEN', K.waiting)
  or rcall('ZCARD', K.waiting)
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
local result = {cjson.encode(counts)}
for _, v in ipairs(rcall('HGETALL', K.stats)) do result[#result + 1] = v end
return result
