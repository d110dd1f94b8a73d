#!lua
--[[
  cancel_create: a create reservation gives up its place in the quota (`pending`), for one of
  three reasons, each counted under its own name in `stats`:
    * 'failed': its POST definitely failed (the API refused it, or no connection was made), so
      no node will come of it                                          -> creates_failed
    * 'unusable': its POST made a node whose id the pool cannot take, which the replica
      deletes at once (provisioner/service.py _create): a node was made, and billed, so it is
      not counted as failed                                            -> creates_unusable
    * 'withdrawn': its POST was never sent, because the reservation had lapsed, or would
      before the call could end (the replica stalled between the decision and the POST):
      sent, its node would have come on top of the one that replaced it -> creates_withdrawn

  Not for timeouts: a POST that timed out may have created a node; its reservation is left to
  expire at its deadline, and the node, if any, is adopted when its node:status arrives.

  KEYS: the pool key vector (lua/includes/keys.lua)
  ARGV[1] reservation id
  ARGV[2] why: 'failed' (also when absent: a replica of an earlier release), 'unusable' or
          'withdrawn'; any other is refused (an error), and nothing is written

  Returns 1 if the reservation was pending, 0 otherwise (already expired or cancelled: counted
  nowhere, as the expiry counted it).
]]
--@include "includes/keys.lua"

local COUNTED = {failed = 'creates_failed', unusable = 'creates_unusable',
                 withdrawn = 'creates_withdrawn'}
local counted = COUNTED[ARGV[2] or 'failed']
if not counted then
  return redis.error_reply('cancel_create: unknown reason ' .. tostring(ARGV[2]))
end

refuse_wrong_types()  -- before any write: a script refused half-way keeps what it wrote

local removed = rcall('ZREM', K.pending, ARGV[1])
if removed == 1 then
  stat(counted)
end
return removed
