#!lua
--[[
  scale_decide: the scaling tick. Every replica calls it every interval; the first call in an
  interval slot (floor(now / interval)) records the slot's start (ms) in `tick_lock` and
  decides, the others return at once.

  The decision:
    1. drops create reservations whose deadline has come (their POST never came back: the replica
       died, or the POST timed out; a node that does exist is adopted by apply_node_status);
    2. trims entries that left the activity window (bounded per tick);
    3. observes supply (ready + booting + creating - waiting) against the policy's target
       (lua/includes/policy.lua) and reserves the shortfall as create reservations, within
       max_nodes and max_batch. The winning replica POSTs one node per reservation and reports
       each through register_node or cancel_create;
    4. closes the forecast's check of itself when its horizon is over, and opens the next
       (policy.lua check_forecast: totals in the stats hash, `forecast_*`);
    5. counts how far the target moved up and down (stats `target_raised`, `target_lowered`),
       and why each create was reserved: the target rose in this tick (`creates_on_rise`, up to
       the rise), or spare was used up under a target that did not rise (`creates_to_refill`:
       connects took ready nodes, boots failed, reservations expired).
  Terminations are reap_idle's, called next by the same replica.

  KEYS: the pool key vector (lua/includes/keys.lua)
  ARGV: the policy parameters (lua/includes/policy.lua read_params)

  A replica passes the pool's epoch as it last saw it (ARGV[25]). If the pool holds another, or
  none, its state was lost since (lua/heartbeat.lua): the pool it would decide on is empty, not
  the one whose nodes are still running, and a decision there would boot a second pool beside
  them. Nothing is decided or written until the replica has seen the loss and taken the Node
  API's nodes back (provisioner/service.py).

  Returns {0} when another replica holds this interval ({0, 'ahead'} when its slot is over a
  minute ahead of this replica's clock, on a lease not lapsed: one of the two clocks is
  wrong), {-1} when the epoch is not the replica's, else
    {1, reason, numbers_json, reservation_id...}
  Logs every decision that creates to the `decisions` stream, and one that wants nodes and can
  create none (max_nodes, creates held) once per 30 s while it lasts (stats field
  `unmet_logged_ms`); the latest observation is kept in stats field `last_decision`.
]]
--@include "includes/keys.lua"
--@include "includes/policy.lua"

refuse_wrong_types()  -- before any write: a script refused half-way keeps what it wrote

local p = read_params()
local now = p.now

if p.epoch and p.epoch ~= '' and rcall('GET', K.epoch) ~= p.epoch then
  return {-1}
end

-- One decision per interval slot of the pool's own clock (`now`), not the server's: replays
-- run hours of virtual time in seconds and must decide every virtual interval. The slot is
-- held on a lease of the server's clock, TICK_LEASE_MS past two intervals, which every
-- decision renews. A replica whose clock runs ahead of the others' keeps the slot ahead of
-- theirs, so it alone decides while it lives (the slot taken over whenever it was over a
-- minute ahead, a replica 90 s behind and one on time each decided every interval, each
-- counting the other's 90 s as time observed); when it dies its lease lapses within seconds,
-- where the pool decided nothing until real time caught up with its clock. A slot over
-- TICK_LOCK_AHEAD_MS ahead with no lease (written by hand or by a release before the lease)
-- is taken over.
-- The lock holds the slot's start in ms, not its number: replicas whose --tick-interval
-- differs (a rolling change of it) compare the same times (slot numbers a factor apart read as
-- a clock hours ahead).
local TICK_LOCK_AHEAD_MS = 60000
local TICK_LEASE_MS = 10000
local slot = math.floor(now / p.interval_ms) * p.interval_ms
local last = tonumber(rcall('GET', K.tick_lock))
if last and last >= slot then
  -- Ahead of this replica's clock, not of its slot: a slot is up to 600 s long, and the next
  -- one's start, taken by a clock a millisecond ahead, is a whole interval past this slot's.
  if last - now <= TICK_LOCK_AHEAD_MS then
    return {0}
  end
  if rcall('PTTL', K.tick_lock) >= 0 then
    stat('tick_lock_ahead')
    return {0, 'ahead'}
  end
  stat('tick_lock_taken_over')
end
rcall('SET', K.tick_lock, slot, 'PX', 2 * p.interval_ms + TICK_LEASE_MS)

local expired = rcall('ZRANGEBYSCORE', K.pending, '-inf', now, 'LIMIT', 0, 100)
for _, rid in ipairs(expired) do
  rcall('ZREM', K.pending, rid)
end
if #expired > 0 then
  stat('reservations_expired', #expired)
  -- A reservation that expired may have been an unclaimed node's (its POST timed out after the
  -- node's status came): that node is no longer a create in flight, and left unclaimed it would
  -- cancel a newer reservation out of `creating`, and the pool would create past max_nodes. The
  -- oldest go, one per reservation expired; one that was not its reservation's node is counted
  -- twice until its own is claimed, the safe side of the quota.
  rcall('ZPOPMIN', K.unclaimed, #expired)
end
if rcall('ZCARD', K.pending) == 0 then
  rcall('DEL', K.unclaimed)
else
  rcall('ZREMRANGEBYSCORE', K.unclaimed, '-inf', now - p.create_deadline_ms)
end
-- Entries that left the window are already ignored by every count (they are scored by time);
-- dropping them only frees memory, so at most TRIM_LIMIT per set and band go per tick.
local TRIM_LIMIT = 500
local trimmed = trim_stale(K.active, now, p.window_ms, TRIM_LIMIT)
  + trim_stale(K.engaged, now, p.window_ms, TRIM_LIMIT)
for i, k in ipairs(LEVELS) do
  trimmed = trimmed + trim_stale_level(k, now, p.window_ms, TRIM_LIMIT)
  for j = 1, #AGES do
    trimmed = trimmed + trim_stale_young(i, j, now, TRIM_LIMIT)
  end
end
if trimmed > 0 then
  stat('entries_trimmed', trimmed)
end

local s = observe(p)
if #s.stale_drains > 0 then
  rcall('ZREM', K.drains, unpack(s.stale_drains))
end
for _, node in ipairs(s.checked_drains) do  -- checked now: to the tail, the next ones first
  rcall('ZADD', K.drains, 'XX', now, node)
end
local target, why, forecast = target_spare(s, p, true)
-- How much the target moves: every rise is a create to come, every fall a node to reap later.
-- The previous target is the last decision's, in its numbers: the policy's before a replace's
-- hold (`base`, there when one was held), so the counts are the forecast's moves alone.
local last_numbers = last_decision_numbers(rcall('HGET', K.stats, 'last_numbers'))
-- A new pool's first target (none before it) rises from 0, as its creates count it (below):
-- a helper's audit read "1 create on a rise" beside "raised by 0".
local previous = last_numbers and (tonumber(last_numbers.base) or tonumber(last_numbers.target))
if target > (previous or 0) then
  stat('target_raised', target - (previous or 0))
elseif previous and target < previous then
  stat('target_lowered', previous - target)
end
remember_target(now, target, p.keep_window_ms)
-- A `provisioner replace` holds spare above the keep level (hold_spare.lua): its target is
-- the keep level and that many more, so that the pool boots them before the run drains a
-- batch (held above the target alone, a recent peak above it took the hold in: a review).
local base = target
local keep = math.max(target, peak_target(now, p.keep_window_ms))
local spare_held = replace_extra()  -- not the creates held while the Node API fails (below)
if spare_held > 0 then
  target = keep + spare_held
  why = why .. string.format('; %d held above the keep level %d while nodes are replaced',
                             spare_held, keep)
end
local want = target - s.spare
local created = {}
local reason
if want > 0 then
  local held = p.creates_held_to and p.creates_held_to < p.max_batch
  local n = math.min(want, p.max_nodes - s.total, held and p.creates_held_to or p.max_batch)
  for i = 1, n do
    local rid = p.replica .. ':' .. rcall('INCR', K.seq)
    rcall('ZADD', K.pending, now + p.create_deadline_ms, rid)
    created[#created + 1] = rid
  end
  if #created > 0 then
    stat('creates_reserved', #created)
    local on_rise = math.min(#created, math.max(0, base - (previous or 0)))
    if on_rise > 0 then
      stat('creates_on_rise', on_rise)
    end
    if #created > on_rise then
      stat('creates_to_refill', #created - on_rise)
    end
  end
  reason = string.format('spare %d < target %d (%s): create %d', s.spare, target, why,
                         math.max(0, n))
  if n < want and held and n == p.creates_held_to then
    reason = reason .. string.format(
      ' of %d (creates held while the Node API fails, is full or refuses)', want)
  elseif n < want then
    reason = reason .. string.format(' of %d (max_nodes %d, batch %d)', want, p.max_nodes,
                                     p.max_batch)
  end
else
  reason = string.format('spare %d >= target %d (%s): hold', s.spare, target, why)
end

-- Whether a decision that wants nodes and creates none (max_nodes, creates held while the Node
-- API fails) goes to the decisions stream: once per UNMET_LOG_MS while it lasts. It is decided
-- again at every tick, and one entry a second pushed the stream's 1,000 out in 17 minutes of
-- an outage, misses and all; the latest is always the pool's last decision. A decision that
-- wants none ends the shortage (`unmet_ended`), and the next one is logged at once, however
-- soon, but once per UNMET_LOG_MS (`unmet_early_ms`): a target that flickers a node above
-- the pool at max_nodes and back at every tick logged one entry every two ticks.
local UNMET_LOG_MS = 30000
local function within(field, at)
  local last = tonumber(rcall('HGET', K.stats, field))
  return last and at >= last and at - last < UNMET_LOG_MS
end
local function unmet_to_log(at)
  if within('unmet_logged_ms', at) then
    if not rcall('HGET', K.stats, 'unmet_ended') or within('unmet_early_ms', at) then
      return false
    end
    rcall('HSET', K.stats, 'unmet_early_ms', at)
  end
  rcall('HSET', K.stats, 'unmet_logged_ms', at)
  rcall('HDEL', K.stats, 'unmet_ended')
  return true
end

local numbers = summary(s, target, keep + spare_held, spare_held > 0 and spare_held or nil,
                        spare_held > 0 and base or nil, forecast)
rcall('HSET', K.stats, 'last_decision', reason, 'last_numbers', numbers,
      'last_decision_ms', now, 'last_replica', p.replica)
if #created > 0 then
  log_decision(p, 'scale_up', reason, numbers, #created)
elseif want > 0 and unmet_to_log(now) then
  log_decision(p, 'scale_up', reason, numbers, 0)
elseif want <= 0 then
  rcall('HSET', K.stats, 'unmet_ended', 1)
end

local result = {1, reason, numbers}
for _, rid in ipairs(created) do result[#result + 1] = rid end
return result
