#!lua
--[[
  confirm_terminate: the outcome of DELETE /api/nodes/{id} for a node in `terminating`.

    sent    202: wait for node:status terminated until the new deadline; if it never comes,
            reap_idle sends the DELETE again (and a 404 then finishes the node).
    gone    404: the Node API no longer knows the node; it is gone now.
    failed  any other answer or no answer: retry after the new deadline.

  A node that is no longer terminating (its terminated status came first) is left alone.

  KEYS: the pool key vector (lua/includes/keys.lua)
  ARGV[1] now (ms)
  ARGV[2] node id
  ARGV[3] outcome: sent | gone | failed
  ARGV[4] next deadline (ms)

  Returns 1 if applied, 0 if the node was not terminating.
]]
--@include "includes/keys.lua"
--@include "includes/pool.lua"

refuse_wrong_types()  -- before any write: a script refused half-way keeps what it wrote

local now = tonumber(ARGV[1])
local node = ARGV[2]
local outcome = ARGV[3]
local deadline = tonumber(ARGV[4])

if rcall('HGET', node_key(node), 'state') ~= 'terminating' then
  return 0
end
if outcome == 'gone' then
  node_gone(node, now, 'api_404')
  return 1
end
rcall('ZADD', K.terminating, deadline, node)
if outcome == 'sent' then
  rcall('HSET', node_key(node), 'delete_sent_ms', now)
  stat('deletes_sent')
else
  stat('deletes_failed')
end
return 1
