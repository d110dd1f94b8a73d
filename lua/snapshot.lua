#!lua flags=no-writes
--[[
  snapshot: a consistent read of the pool's counts and counters, for `provisioner status`,
  /metrics and the tests. Changes nothing.

  KEYS: the pool key vector (lua/includes/keys.lua)
  ARGV[1] now (ms)
  ARGV[2] window (ms)

  Returns {counts_json, stats_flat_list...}; counts has each structure's size, the users active
  and engaged in the window, oldest_session_ms (the start of the longest session, 0 if none),
  oldest_wait_ms (when the user waiting the longest began to, 0 if none), and spare_held and
  spare_held_ms (a replace run's hold: its spare nodes and its lease's ms left, -1 for none;
  0 and 0 if no hold)
]]
--@include "includes/keys.lua"

local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
-- The waiting queue of a pool no writing script has run on since the upgrade is still a list
-- (keys.lua LEGACY_TYPES); this script writes nothing, so it counts either.
local is_list = rcall('TYPE', K.waiting)['ok'] == 'list'
local waiting = is_list and rcall('LLEN', K.waiting) or rcall('ZCARD', K.waiting)
-- The longest wait. Users join the queue's back from place 1 up, so the first of them waited
-- the longest of theirs; a crashed node's users go to its front from -1 down with the time of
-- the crash, so the nearest 0 crashed first (lua/includes/pool.lua). The earliest start among
-- WAIT_SCAN users each side of 0 (replicas' clocks differ a little) is the longest wait,
-- however many crashes lead the queue. A queue numbered by a release before fc311d0 (one past
-- the last, one before the first, from 0) or converted from a list has those crashed nodes'
-- users among the places from 1 up, so the queue's first WAIT_SCAN are read as well, as those
-- releases did: more crashes than that ahead of the rest still hide it there, until the queue
-- empties once. O(log n + 3 WAIT_SCAN).
local WAIT_SCAN = 10
local oldest_wait = 0
local near = {}
if is_list then
  near = rcall('LRANGE', K.waiting, 0, WAIT_SCAN - 1)
else
  for _, users in ipairs({rcall('ZRANGE', K.waiting, 0, WAIT_SCAN - 1),
                          rcall('ZRANGEBYSCORE', K.waiting, 0, '+inf', 'LIMIT', 0, WAIT_SCAN),
                          rcall('ZREVRANGEBYSCORE', K.waiting, '(0', '-inf', 'LIMIT', 0,
                                WAIT_SCAN)}) do
    for _, user in ipairs(users) do near[#near + 1] = user end
  end
end
for _, user in ipairs(near) do
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
-- A `provisioner replace` run's hold (hold_spare.lua): the spare nodes it holds above the keep
-- level and the ms its lease has left unless renewed (0 and 0 when no run holds one; -1 for a
-- hold with no lease, written by hand). A key of another type is none here, as in the scripts
-- that refuse it.
local held = rcall('TYPE', K.replacing)['ok'] == 'string'
  and read_hold(rcall('GET', K.replacing))
counts.spare_held = held or 0
counts.spare_held_ms = held and math.max(rcall('PTTL', K.replacing), -1) or 0
local result = {cjson.encode(counts)}
for _, v in ipairs(rcall('HGETALL', K.stats)) do result[#result + 1] = v end
return result
