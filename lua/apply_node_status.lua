#!lua
--[[
  apply_node_status: a node:status event (booting | ready | terminated).

  Transitions of a node, by its state before the event:
    unknown     + booting     -> booting      (NEW: status beat the POST's answer, or a node
                                               whose create timed out; it is ours, adopted)
    unknown     + ready       -> ready/alloc  (NEW, then served like any ready node)
    unknown     + terminated  -> tombstone    (NEW: a late booting/ready is then ignored)
    booting     + ready       -> ready, or straight to the oldest waiting user (READY)
    any live    + terminated  -> gone; an allocated node's user goes back to the head of the
                                 waiting queue (TERMINATED)
    terminating + booting/ready -> unchanged (IGNORED: we are deleting it)
    tombstone   + anything    -> unchanged (IGNORED)
    same or older status      -> unchanged (DUPLICATE: ready twice, booting after ready, ...)
  A node first seen here while create reservations are pending is also marked unclaimed, so the
  scaler does not count it and its reservation as two nodes.

  KEYS: the pool key vector (lua/includes/keys.lua)
  ARGV[1] now (ms)
  ARGV[2] node id
  ARGV[3] status: booting | ready | terminated
  ARGV[4] (optional) 'listed': the status was read from the Node API's list by reconciliation,
          not received: a ready found that way teaches no boot time (when the node became
          ready is not known, only that it is by now)

  Returns {code, previous_state, requeued_user, served...}
    1 NEW  2 READY  3 TERMINATED  4 DUPLICATE  5 IGNORED
  served is a flat list {user, node, waited_ms, ...} of waiting users this event served.
  Publishes: user:allocated for every user served, user:waiting for a requeued user.
]]
--@include "includes/keys.lua"
--@include "includes/pool.lua"

refuse_wrong_types()  -- before any write: a script refused half-way keeps what it wrote

local now = tonumber(ARGV[1])
local node = ARGV[2]
local status = ARGV[3]
local listed = ARGV[4] == 'listed'

local nk = node_key(node)
local state = rcall('HGET', nk, 'state')

local function with_served(result, served)
  for _, v in ipairs(served) do result[#result + 1] = v end
  return result
end

if not state then
  if status == 'terminated' then
    rcall('HSET', nk, 'id', node, 'state', 'terminated', 'terminated_ms', now, 'updated_ms', now,
          'end_reason', 'unknown_terminated')
    rcall('PEXPIRE', nk, TOMBSTONE_TTL_MS)
    return {1, '', ''}
  end
  -- Listed by reconciliation: its create was some time before, how long is not known.
  new_node(node, 'booting', now, listed and 'listed' or 'status')
  stat('nodes_adopted')
  if rcall('ZCARD', K.pending) > 0 then
    rcall('ZADD', K.unclaimed, now, node)
  end
  if status == 'booting' then
    rcall('ZADD', K.booting, now, node)
    return {1, '', ''}
  end
  rcall('HSET', nk, 'ready_ms', now)
  if not listed then
    boot_ended(now)  -- heard ready now: a boot seen to end, whenever it began (reap_idle.lua)
  end
  return with_served({1, '', ''}, node_free(node, now))
end

if state == 'terminated' then
  return {5, state, ''}
end

if status == 'terminated' then
  local requeued, served = node_gone(node, now, 'node_status')
  return with_served({3, state, requeued or ''}, served)
end

if state == 'terminating' then
  return {5, state, ''}
end

if status == 'ready' and state == 'booting' then
  rcall('ZREM', K.booting, node)
  rcall('HSET', nk, 'ready_ms', now)
  -- Boot time from the create's POST (register_node's `asked_ms`), the call's latency included,
  -- or from the pool's first record of the node where that time is not known: the horizon.
  -- Learned from the sample nodes only (pool.lua new_node, learn_boot). Not from a node first
  -- seen in the Node API's list: it was stamped when it was listed, maybe a reconcile interval
  -- after its create, and would teach a boot that short. A node still unclaimed is ready
  -- before its POST answered: when it was asked comes with the answer, so register_node
  -- learns its boot then ('boot_unlearned'); if the answer never comes (the replica that asked
  -- stopped), the boot is not learned, rather than learned short from its `booting`.
  if is_boot_sample(node) and not listed and rcall('HGET', nk, 'origin') ~= 'listed' then
    if rcall('ZSCORE', K.unclaimed, node) then
      rcall('HSET', nk, 'boot_unlearned', 1)
    else
      learn_boot(tonumber(rcall('HGET', nk, 'asked_ms'))
                 or tonumber(rcall('HGET', nk, 'created_ms')) or now, now)
    end
  end
  -- Any boot ended ready, not only a sample's, says a boot stuck since before it is lost: a
  -- new pool's lost sample boot beside one that was no sample and ended was learned as a boot
  -- of the whole stuck line. A node adopted by listing too: when it began is not known, but
  -- its ready, heard now, is a boot seen to end now.
  if not listed then
    boot_ended(now)
  else
    -- Found ready by listing: when is not known, but after its create was asked (or first
    -- recorded), the least time it is known to have ended by: a boot stuck since before that
    -- is lost as well.
    local asked, created = unpack(rcall('HMGET', nk, 'asked_ms', 'created_ms'))
    local start = tonumber(asked) or tonumber(created)
    if start and start <= now then
      boot_ended(start)
    end
  end
  stat('nodes_ready')
  return with_served({2, state, ''}, node_free(node, now))
end

return {4, state, ''}
