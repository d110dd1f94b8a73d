#!lua
--[[
  heartbeat: a replica says it is running, and how far its listener is behind the events, so
  `provisioner status` can list the pool's replicas. Called by each replica every
  --heartbeat-interval; no other script reads what it writes.

  `replicas` scores each replica by the ms of its last heartbeat; `replica_info` holds what it
  said. A replica not heard from for `forget_ms` is forgotten (a restarted replica comes back
  under a new id, so the dead ones would otherwise pile up): at most 10 per call, O(log n) each.
  Applying the same heartbeat twice leaves the same state; an older one (a late retry) never
  moves a replica's time back.

  KEYS: the pool key vector (lua/includes/keys.lua)
  ARGV[1] now (ms)
  ARGV[2] replica id
  ARGV[3] what the replica says: a JSON object (lag_s, subscribed, started_ms, interval_s)
  ARGV[4] forget_ms

  Returns {replicas heard from within forget_ms, forgotten by this call}
  Refused (an error) if ARGV[3] is not a JSON object: nothing is written.
]]
--@include "includes/keys.lua"

local now = tonumber(ARGV[1])
local replica = ARGV[2]
local info = ARGV[3]
local forget_ms = tonumber(ARGV[4])

local ok, decoded = pcall(cjson.decode, info)
if not ok or type(decoded) ~= 'table' or decoded[1] ~= nil then
  return redis.error_reply('heartbeat: the replica info is not a JSON object')
end
if rcall('ZADD', K.replicas, 'GT', 'CH', now, replica) == 1
    or rcall('HEXISTS', K.replica_info, replica) == 0 then
  rcall('HSET', K.replica_info, replica, info)
end
local gone = rcall('ZRANGEBYSCORE', K.replicas, '-inf', '(' .. (now - forget_ms), 'LIMIT', 0, 10)
if #gone > 0 then
  rcall('ZREM', K.replicas, unpack(gone))
  rcall('HDEL', K.replica_info, unpack(gone))
end
return {rcall('ZCARD', K.replicas), #gone}
