#!lua
--[[
  heartbeat: a replica says it is running, and how far its listener is behind the events, so
  `provisioner status` can list the pool's replicas. Called by each replica every
  --heartbeat-interval. Of what it writes, the transitions read only the epoch (scale_decide)
  and, by their absence, the marks it drops from `applied` (pool.lua made_again).

  `replicas` scores each replica by the server's clock (TIME, in ms) at its last heartbeat;
  `replica_info` holds what it said then. Every replica's heartbeats are stamped and judged by
  the one clock they all share, so a replica whose own clock runs ahead or behind the others'
  is neither taken for silent nor makes another look silent. A replica not heard from for
  `forget_ms` is forgotten (a restarted replica comes back under a new id, so the dead ones
  would otherwise pile up): at most 10 per call, O(log n) each. A replica forgotten, or
  leaving, takes its mark of the last connect or disconnect it applied (`applied`, pool.lua
  made_again) with it. A replica's heartbeats are
  sequential (each waits for the one before), so the last one applied is the latest it sent.
  It takes no `now`, unlike the transitions, whose times are events' times, which a replay runs
  ahead of the wall clock; a heartbeat's is when a process was alive, compared across
  processes, which only a clock they share can tell (no replay sends heartbeats).

  It also keeps the pool's epoch: the first heartbeat of a pool's state sets `epoch` to
  `<the server's time, ms>-<the replica's token>`, and every heartbeat returns the epoch that
  stands. The time is the server's for the reason above: `provisioner status` says how long ago
  the state began, by the server's clock, and a replica whose own clock was off would have
  made a new state look hours old, or not yet begun. A replica that sees it
  change under it knows the state it was running on is gone (a server restarted without
  persistence, a flush, a failover to an empty replica): nothing else in the pool can tell.
  Each replica's ticks pass the epoch they run on to scale_decide, which decides nothing under
  another, until that replica has taken the Node API's nodes back.

  Every heartbeat is also kept in `beats` for forget_ms, as `replica@ms` scored by the server's
  time: the record of when the server served the pool's replicas, which judge_gap.lua reads to
  tell a replica that could not reach the server whether the server served the others
  meanwhile (it was cut off alone) or no one (the server was paused). O(log n + m) a call, m
  the beats trimmed: those added forget_ms before, about one a call.

  A state put back from an older copy (a snapshot, a replica promoted before it caught up)
  holds the same epoch. So every heartbeat also counts itself in stats `heartbeats` and
  returns the count, with the server's time the count began (`heartbeats_since`): a replica
  that gets a count of the same beginning no higher than the one its last heartbeat got is
  running on an older copy of the pool than it wrote to (an older copy by less than one
  heartbeat interval cannot be told). A count that is not there, or not a number (deleted or
  edited by hand, a copy from before the count existed), begins again, with a new beginning:
  no replica compares counts of two beginnings.

  KEYS: the pool key vector (lua/includes/keys.lua)
  ARGV[1] replica id
  ARGV[2] what the replica says: a JSON object (lag_s, subscribed, started_ms, interval_s,
          scripts, unsubscribed_s, and clock_offset_s and other_pools once known)
  ARGV[3] forget_ms
  ARGV[4] this replica's token for the epoch, should the pool have none (random, so that no
          two epochs are alike)
  ARGV[5] (optional) 'leaving': the replica is stopping cleanly; its entry goes at once, so
          `provisioner status` does not list it as silent (a crash still shows so)

  It returns the server's clock too: each replica's clock stamps every transition it applies
  (activity windows, boots, sessions, interval slots), so one far off the others' is a fault
  the replica must see; the server's clock is the one they all can read.

  Returns {replicas heard from within forget_ms, forgotten by this call, the pool's epoch,
           the server's time (ms), the pool's count of heartbeats with this one and the
           time it began (0 and '' when leaving)}
  Refused (an error) if ARGV[2] is not a JSON object or ARGV[4] is missing, or a pool key holds
  another type than its own (keys.lua refuse_wrong_types): nothing is written. A heartbeat that
  went through while the transitions were refused told the replica its writes go through again.
]]
--@include "includes/keys.lua"

refuse_wrong_types()  -- before any write: a script refused half-way keeps what it wrote

local replica = ARGV[1]
local info = ARGV[2]
local forget_ms = tonumber(ARGV[3])
local proposed = ARGV[4]

local ok, decoded = pcall(cjson.decode, info)
if not ok or type(decoded) ~= 'table' or decoded[1] ~= nil then
  return redis.error_reply('heartbeat: the replica info is not a JSON object')
end
if not proposed or proposed == '' then
  return redis.error_reply('heartbeat: no token for the epoch (ARGV[4])')
end
if ARGV[5] == 'leaving' then
  rcall('ZREM', K.replicas, replica)
  rcall('HDEL', K.replica_info, replica)
  rcall('HDEL', K.applied, replica)
  return {rcall('ZCARD', K.replicas), 0, rcall('GET', K.epoch) or '', 0, 0, ''}
end
local now = server_ms()
rcall('ZADD', K.replicas, now, replica)
rcall('ZADD', K.beats, now, replica .. '@' .. now)
rcall('ZREMRANGEBYSCORE', K.beats, '-inf', '(' .. (now - forget_ms))
rcall('HSET', K.replica_info, replica, info)
local gone = rcall('ZRANGEBYSCORE', K.replicas, '-inf', '(' .. (now - forget_ms),
                   'LIMIT', 0, 10)
if #gone > 0 then
  rcall('ZREM', K.replicas, unpack(gone))
  rcall('HDEL', K.replica_info, unpack(gone))
  rcall('HDEL', K.applied, unpack(gone))
end
rcall('SET', K.epoch, now .. '-' .. proposed, 'NX')
local ok, count = pcall(rcall, 'HINCRBY', K.stats, 'heartbeats', 1)
local since = rcall('HGET', K.stats, 'heartbeats_since')
if not ok or count == 1 or not since then
  if not ok then  -- not a number: begun again, counted as a repair like any other value
    stat('values_repaired')
  end
  count, since = 1, tostring(now)
  rcall('HSET', K.stats, 'heartbeats', count, 'heartbeats_since', since)
end
return {rcall('ZCARD', K.replicas), #gone, rcall('GET', K.epoch), now, count, since}
