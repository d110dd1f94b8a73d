#!lua
--[[
  reap_idle: choose the nodes to terminate now. Called by the replica that won scale_decide.

    1. boots stuck: running longer than boot_timeout and STUCK_BOOT_MEANS times the mean boot
       the pool has learned (below);
    2. terminations whose deadline passed (the DELETE failed, its replica died, or no
       node:status terminated came): sent again; and the nodes an operator drained
       (drain_node.lua), whose first DELETE is due at once;
    3. idle ready nodes, oldest idle first (the head of the ready list), idle for at least
       idle_timeout, while spare exceeds the keep level and more than min_ready are ready. The
       keep level is the highest target scale_decide set within keep_window (policy.lua
       peak_target), so a dip in the forecast does not reap a node it will want back.
       Where a node is still booting, the youngest of those that are not boot-time samples
       (pool.lua new_node) goes in the idle node's place: the spare left is the same, the ready
       node serves the next connect at once, and the rest of the boot is not paid for.
  Allocated nodes are never chosen. Every chosen node moves to `terminating` atomically here,
  so concurrent calls never pick the same node; the caller sends the DELETEs and reports each
  with confirm_terminate.

  KEYS: the pool key vector (lua/includes/keys.lua)
  ARGV: the policy parameters (lua/includes/policy.lua read_params)

  Returns a flat list {node_id, reason, ...}; reason is boot_timeout | retry | drained (an
  operator's drain, its first DELETE) | idle | surplus_boot (a boot given up in an idle
  node's place).
]]
--@include "includes/keys.lua"
--@include "includes/pool.lua"
--@include "includes/policy.lua"

refuse_wrong_types()  -- before any write: a script refused half-way keeps what it wrote

local p = read_params()
local now = p.now
local deadline = now + p.delete_deadline_ms
local out = {}

-- The retries are of terminations begun before this call: read before the stuck boots below
-- join `terminating`, or one begun here with a deadline of now (a delete timeout under a
-- millisecond) would be returned a second time, as a retry.
local due = rcall('ZRANGEBYSCORE', K.terminating, '-inf', now, 'LIMIT', 0, p.max_batch)

-- A boot is stuck once it has run boot_timeout and 3 times the mean boot learned from the sample
-- boots (apply_node_status): where nodes are learned to take 8 minutes, a boot of 11 is slow,
-- not lost, and ending it at a fixed 10 minutes threw a third of the boots away and started them
-- again. 3 means: 1.2% of the recorded traces' boots run longer, and a boot that slow still
-- has less left to run (0.7 of a mean, for a lognormal of their spread) than a new one would
-- take. 4 means saved one more miss of 251 on very-slow-boots but kept slow boots of the
-- held-out slow-boots shape past the point a new node would have been ready (two seeds' cost
-- over the bar). The recorded one-minute boots keep the timeout (600 s is 8.6 of their means).
-- Never past a day, the longest boot timeout one may set (a model imported with a mean boot of
-- a day would otherwise keep a boot that never ends for three).
-- The stuck line backs off while no boot ends: a boot stuck with none ended ready since it
-- began (any node's, 'boot_seen_ms', apply_node_status) raises it by --boot-timeout
-- ('stuck_line_ms', a day at most), and the boots younger than the new line run on. Where
-- every boot outlasts the timeout (a Node API whose boots take 12 minutes, against the default
-- 10), none ever ended, none was learned, and each was ended and asked again, for good: no
-- user was ever served (a review's replay). A boot that ends within the line as it was before
-- it was raised ('stuck_base_ms', pool.lua learn_boot) says the stuck ones were lost nodes,
-- and the line comes back; one that ends past it is learned as any boot, and once 3 learned
-- means pass the raised line it is moot and dropped. Only boots that ended teach the boot time:
-- an earlier version taught each stuck boot as a boot of the stuck line's length, and a quiet
-- pool whose Node API lost two boots of three ran its mean, and the line, towards a day (two
-- reviews). A boot stuck while others end (a lost node) raises nothing. A pool whose boots were
-- learned by a release before 'boot_seen_ms' takes it as now at the first look.
local stuck_after, raised, held = stuck_line(p, learned(rcall('HGET', K.model, 'boot_ms')) or 0)
if held and not raised then
  -- the learned mean has caught up; or past a day, as no raise goes (an edit by hand)
  rcall('HDEL', K.model, 'stuck_line_ms', 'stuck_base_ms')
end
local stuck = rcall('ZRANGEBYSCORE', K.booting, '-inf', now - stuck_after,
                    'LIMIT', 0, p.max_batch)
local boot_seen = learned(rcall('HGET', K.model, 'boot_seen_ms'))
if boot_seen and boot_seen > now then
  -- Past now (an edit by hand, a replica's clock ahead): kept by every boot after it (the
  -- larger of the two), it stopped the line ever backing off. Taken as seen now.
  boot_seen = now
  rcall('HSET', K.model, 'boot_seen_ms', now)
end
if not boot_seen and (learned(rcall('HGET', K.model, 'boot_n')) or 0) == 0 then
  boot_seen = 0  -- no boot learned yet: none ended
elseif not boot_seen then
  -- Learned with no 'boot_seen_ms' (a release before it, an import of boot_n alone): not
  -- known, taken as seen now, so the boots begun after this count. Left unknown, it stayed
  -- unknown for good where no boot ends any more.
  rcall('HSET', K.model, 'boot_seen_ms', now)
end
local ended_stuck, ended_past = 0, stuck_after  -- the line the boots ended here were past
for _, node in ipairs(stuck) do
  local began = tonumber(rcall('ZSCORE', K.booting, node))
  if began and began > now - stuck_after then
    break  -- the line was raised in this call: this boot, and the younger after it, run on
  end
  -- read before start_terminating, which takes the node off `unclaimed`
  local unclaimed = rcall('ZSCORE', K.unclaimed, node)
  if start_terminating(node, now, deadline, 'boot_timeout') then
    out[#out + 1] = node
    out[#out + 1] = 'boot_timeout'
    ended_stuck = ended_stuck + 1
    local asked, created, origin = unpack(rcall('HMGET', node_key(node), 'asked_ms',
                                                'created_ms', 'origin'))
    local start = tonumber(asked) or tonumber(created) or began
    if start and boot_seen and boot_seen < start and origin ~= 'listed' and not unclaimed
        and stuck_after < LONGEST_BOOT_MS then
      if not raised then
        rcall('HSET', K.model, 'stuck_base_ms', stuck_after)
      end
      stuck_after = math.min(LONGEST_BOOT_MS, stuck_after + p.boot_timeout_ms)
      raised = stuck_after
      rcall('HSET', K.model, 'stuck_line_ms', stuck_after)
      stat('stuck_line_raised')
    end
  end
end

-- A node an operator drained has had no DELETE yet (drain_node.lua): its first is `drained`.
local drained = 0
for _, node in ipairs(due) do
  local nk = node_key(node)
  local reason = 'retry'
  local asked, why = unpack(rcall('HMGET', nk, 'delete_attempts', 'term_reason'))
  if why == 'drained' and (tonumber(asked) or 0) == 0 then
    reason, drained = 'drained', drained + 1
  end
  rcall('ZADD', K.terminating, deadline, node)
  add_to(nk, 'delete_attempts', 1, false)
  out[#out + 1] = node
  out[#out + 1] = reason
end

-- The youngest boot that may be given up, or nil: among the 20 youngest still booting, so the
-- work is bounded. The boots are read once per call, SWAP_LOOK + max_batch of them, and walked
-- with a cursor: each boot given up lets the window of 20 reach one further, exactly as reading
-- the 20 youngest again would, without reading them again for every node reaped.
local SWAP_LOOK = 20
local boots, cursor = nil, 0
local function youngest_surplus_boot(given_up)
  boots = boots or rcall('ZREVRANGE', K.booting, 0, SWAP_LOOK + p.max_batch - 1)
  while cursor < math.min(#boots, SWAP_LOOK + given_up) do
    cursor = cursor + 1
    -- Nor a boot whose create is still in flight (unclaimed): ended, its create counts as spare
    -- again (policy.lua observe), and the swap would lower no spare.
    if not is_boot_sample(boots[cursor])
        and not rcall('ZSCORE', K.unclaimed, boots[cursor]) then
      return boots[cursor]
    end
  end
  return nil
end

-- The ready node idle the longest, if it has been idle for idle_timeout; else nil.
local function oldest_idle()
  local node = first_ready()
  if not node then return nil end
  local idle_since = tonumber(rcall('HGET', node_key(node), 'idle_since_ms')) or now
  if now - idle_since < p.idle_timeout_ms then return nil end
  return node
end

-- The keep level is the larger of the forecast's target and the peak target. The forecast is the
-- dearest read here, and it can only lower the excess: it is worked out only when the peak
-- alone leaves an excess and the oldest idle node has been idle long enough to go (or, below,
-- for the log line). Every tick calls this; most ticks reap nothing.
local s = observe(p)
local peak = peak_target(now, p.keep_window_ms)
local held = replace_extra()  -- spare a `provisioner replace` holds above the keep level
local target, forecast = nil, nil
local excess = math.min(s.spare - peak - held, s.ready - p.min_ready)
if excess > 0 and oldest_idle() then
  local _
  target, _, forecast = target_spare(s, p, false)
  excess = math.min(s.spare - math.max(target, peak) - held, s.ready - p.min_ready)
else
  excess = 0
end
local reaped, swapped = 0, 0
while excess > 0 and reaped < p.max_batch do
  local node = oldest_idle()
  if not node then break end
  local reason = 'idle'
  local boot = youngest_surplus_boot(swapped)
  if boot then
    node, reason, swapped = boot, 'surplus_boot', swapped + 1
  end
  if not start_terminating(node, now, deadline, reason) then
    break  -- not a node the pool may end (first_ready's check makes this unreachable)
  end
  out[#out + 1] = node
  out[#out + 1] = reason
  excess = excess - 1
  reaped = reaped + 1
end

if #out > 0 then
  if not target then
    local _
    target, _, forecast = target_spare(s, p, false)
  end
  local keep = math.max(target, peak) + held
  stat('terminations_started', #out / 2)
  local reason = string.format(
    'terminate %d (stuck %d%s, retry %d%s, idle %d, booting in an idle node\'s place %d); '
    .. 'spare %d, keep %d (peak target of %.0fs%s), target %d', #out / 2, ended_stuck,
    ended_stuck > 0 and string.format(' past %.0fs', ended_past / 1000) or '', #due - drained,
    drained > 0 and string.format(', drained %d', drained) or '',
    reaped - swapped, swapped, s.spare, keep, p.keep_window_ms / 1000,
    held > 0 and string.format(', and %d held for a replace', held) or '', target)
  log_decision(p, 'scale_down', reason,
               summary(s, target, nil, held > 0 and held or nil, nil, forecast), #out / 2)
end
return out
