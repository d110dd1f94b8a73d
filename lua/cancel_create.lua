#!lua
--[[
  cancel_create: a create reservation's POST definitely failed (an answer other than 202, or a
  connection that was never made), so no node will come of it; or it made a node whose id the
  pool cannot take, which the replica deletes at once (provisioner/service.py _create).

  Not for timeouts: a POST that timed out may have created a node; its reservation is left to
  expire at its deadline, and the node, if any, is adopted when its node:status arrives.

  KEYS: the pool key vector (lua/includes/keys.lua)
  ARGV[1] reservation id

  Returns 1 if the reservation was pending, 0 otherwise (already expired or cancelled).
]]
--@include "includes/keys.lua"

refuse_wrong_types()  -- before any write: a script refused half-way keeps what it wrote

local removed = rcall('ZREM', K.pending, ARGV[1])
if removed == 1 then
  stat('creates_failed')
end
return removed
