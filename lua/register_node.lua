#!lua
--[[
  register_node: POST /api/nodes answered 202 {"id": node} for create reservation `rid`.

  The reservation is consumed and the node recorded as booting. The races:
    * node:status already arrived (the mock publishes `booting` before answering): the record
      exists; it is only claimed (removed from `unclaimed`), and a boot that ended in `ready`
      before this answer is learned now, from the ask.                  -> ALREADY_KNOWN
    * the reservation expired first (the replica was slow or the POST timed out): the node is
      recorded all the same, so it is never leaked.                      -> LATE
    * the node was already declared terminated: nothing is resurrected. -> TOMBSTONE
  Idempotent: a second call finds the reservation gone and the node known.

  KEYS: the pool key vector (lua/includes/keys.lua)
  ARGV[1] now (ms)
  ARGV[2] reservation id
  ARGV[3] node id
  ARGV[4] when the POST was sent (ms), optional. Kept as the node's `asked_ms`, where the boot
          time it teaches starts (apply_node_status; here, for a node ready before this
          answer), so the create call's own latency is part of the lead time learned.
          Without it (a replica of an older release, a call that outlasted its reservation)
          the boot is timed from the pool's first record.

  Returns {code, state}
    1 REGISTERED  2 ALREADY_KNOWN  3 LATE  4 TOMBSTONE
]]
--@include "includes/keys.lua"
--@include "includes/pool.lua"

refuse_wrong_types()  -- before any write: a script refused half-way keeps what it wrote

local now = tonumber(ARGV[1])
local rid = ARGV[2]
local node = ARGV[3]
local asked = tonumber(ARGV[4])
if asked and not (asked >= 0 and asked <= now) then
  asked = nil  -- NaN, -inf, before 0, or after the answer: not a time this create was asked at
end

local had = rcall('ZREM', K.pending, rid)
local nk = node_key(node)
local state = rcall('HGET', nk, 'state')
if state then
  rcall('ZREM', K.unclaimed, node)
  rcall('HSET', nk, 'reservation', rid)
  -- Its status came first (the mock publishes `booting` before answering): the create was
  -- asked for before that first record.
  local created = tonumber(rcall('HGET', nk, 'created_ms'))
  if not (asked and created and asked < created) then
    asked = nil
  end
  -- Ready before this answer (apply_node_status): its boot is learned now, from the ask. Once:
  -- the mark goes. A node ended since was still a boot.
  if rcall('HGET', nk, 'boot_unlearned') then
    rcall('HDEL', nk, 'boot_unlearned')
    local ready = tonumber(rcall('HGET', nk, 'ready_ms'))
    local start = asked or created
    if ready and start then
      learn_boot(start, ready)
    end
  end
  if state == 'terminated' then
    return {4, state}
  end
  if asked then
    rcall('HSET', nk, 'asked_ms', asked)
  end
  return {2, state}
end

new_node(node, 'booting', now, had == 1 and 'api' or 'late', rid)
if asked then
  rcall('HSET', nk, 'asked_ms', asked)
end
rcall('ZADD', K.booting, now, node)
stat('nodes_created')
if had == 1 then
  return {1, 'booting'}
end
stat('nodes_registered_late')
return {3, 'booting'}
