#!lua
--[[
  allocate: a user:connect event.

  A user who holds no node and is not waiting is counted as a connect. If a ready node exists
  (most recently freed first) it is the user's at once: a hit, published as user:allocated with
  waited_ms 0. Otherwise it is a miss: the user joins the back of the waiting queue and
  user:waiting is published; the next node that becomes ready or is freed goes to the oldest
  waiting user.

  A counted connect is credited to the level the user was browsing at, or to the unforeseen
  connects (lua/includes/policy.lua learns connect rates from these).

  Idempotent: a connect of a user who already holds a node or already waits changes nothing and
  publishes nothing, so every replica may apply the same event.

  KEYS: the pool key vector (lua/includes/keys.lua)
  ARGV[1] now (ms)
  ARGV[2] user id

  Returns {code, node_id, queue_position}
    1 ALLOCATED          {1, node, 0}
    2 WAITING            {2, '', position in the queue (1 = next)}
    3 ALREADY_ALLOCATED  {3, node, 0}
    4 ALREADY_WAITING    {4, '', 0}
  Publishes: user:allocated {user_id, node_id, waited_ms} | user:waiting {user_id}
]]
--@include "includes/keys.lua"
--@include "includes/pool.lua"

local now = tonumber(ARGV[1])
local user = ARGV[2]

local held = rcall('HGET', K.alloc, user)
if held then
  return {3, held, 0}
end
if rcall('HEXISTS', K.waiting_since, user) == 1 then
  return {4, '', 0}
end

stat('connects')
-- The forecast learns from every connect: it is credited to the level the user was browsing at
-- (0: no activity in the window). A connect of a user first seen less than a boot time ago is
-- also counted as unforeseen ('cf'): no node booted for it could have been ready in time.
local model = rcall('HMGET', K.model, 'window_ms', 'boot_ms')
local window = tonumber(model[1]) or 120000
local boot = tonumber(model[2]) or 60000
local level = level_of(user, now, window)
rcall('HINCRBYFLOAT', K.model, 'c' .. level, 1)
if level > 0 then
  local first = rcall('ZRANGE', K.acts_prefix .. user, 0, 0, 'WITHSCORES')
  if first[2] and tonumber(first[2]) > now - boot then
    rcall('HINCRBYFLOAT', K.model, 'cf', 1)
  end
end
local node = rcall('LPOP', K.ready)
if node then
  stat('hits')
  assign(node, user, now, 0)
  return {1, node, 0}
end

stat('misses')
enqueue_waiting(user, now, false)
return {2, '', rcall('LLEN', K.waiting)}
