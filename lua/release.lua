#!lua
--[[
  release: a user:disconnect event.

  A user holding a node gives it back: the node goes to the oldest waiting user at once (published
  as user:allocated with the measured waited_ms) or becomes ready (idle) at the tail of the ready
  list, which is in idle order. A user still waiting leaves the queue and counts as abandoned.
  Anyone else: nothing.
  Either way the user's activity window starts afresh: browsing after a session is new browsing.
  Each release is one event of the release rate the forecast learns ('rel' in the model).

  Idempotent: a second disconnect finds the user holding nothing.

  KEYS: the pool key vector (lua/includes/keys.lua)
  ARGV[1] now (ms)
  ARGV[2] user id

  Returns {code, node_id, served...}
    1 RELEASED   {1, node, [user, node, waited_ms] if the node went to a waiting user}
    2 ABANDONED  {2, ''}
    0 UNKNOWN    {0, ''}
]]
--@include "includes/keys.lua"
--@include "includes/pool.lua"

local now = tonumber(ARGV[1])
local user = ARGV[2]

local node = rcall('HGET', K.alloc, user)
if node or rcall('HEXISTS', K.waiting_since, user) == 1 then
  forget_browsing(user)
end
if node then
  rcall('HDEL', K.alloc, user)
  stat('releases')
  local nk = node_key(node)
  local result = {1, node}
  -- The node's own record must agree; if it does not (it was already declared gone), the
  -- allocation entry was stale and there is nothing to free.
  if rcall('HGET', nk, 'state') == 'allocated' and rcall('HGET', nk, 'user') == user then
    local since = tonumber(rcall('HGET', nk, 'allocated_ms')) or now
    stat('busy_ms_total', math.max(0, now - since))
    rcall('HINCRBYFLOAT', K.model, 'rel', 1)
    local served = node_free(node, now)
    for _, v in ipairs(served) do result[#result + 1] = v end
  end
  return result
end

if rcall('HEXISTS', K.waiting_since, user) == 1 then
  rcall('LREM', K.waiting, 0, user)
  rcall('HDEL', K.waiting_since, user)
  stat('abandoned')
  return {2, ''}
end
return {0, ''}
