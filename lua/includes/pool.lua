-- An exponentially weighted mean kept in the model hash (boot and session times).
local function learn_mean(field, value, weight)
  local old = learned(rcall('HGET', K.model, field))  -- none, or not one a script wrote: restart
  local new = old and (old + weight * (value - old)) or value
  rcall('HSET', K.model, field, new)
end

-- A boot seen to end ready at `ready_ms`, a sample's or not (apply_node_status): a stuck boot
-- begun before it is a lost node, not a slow one (reap_idle.lua).
local function boot_ended(ready_ms)
  local seen = learned(rcall('HGET', K.model, 'boot_seen_ms'))
  rcall('HSET', K.model, 'boot_seen_ms', math.max(seen or 0, ready_ms))
end

-- A sample node's boot, from `start_ms` (its create's POST, or the pool's first record of it)
-- to `ready_ms`: the horizon the forecast looks ahead. Half of all nodes are samples (new_node),
-- so each weighs 0.2; 'boot_n' counts them, for the weight of the sample boots still running
-- (policy.lua lead_time). A boot that ends within the stuck line as it was before stuck boots
-- raised it ('stuck_base_ms', reap_idle.lua) says they were lost nodes: the line comes back.
-- (That it ended, apply_node_status says with boot_ended when its ready comes.)
local function learn_boot(start_ms, ready_ms)
  local took = math.max(0, ready_ms - start_ms)
  learn_mean('boot_ms', took, 0.2)
  rcall('HSET', K.model, 'boot_n', (learned(rcall('HGET', K.model, 'boot_n')) or 0) + 1)
  local base = learned(rcall('HGET', K.model, 'stuck_base_ms'))
  local line = learned(rcall('HGET', K.model, 'stuck_line_ms'))
  if base and took <= base then
    rcall('HDEL', K.model, 'stuck_line_ms', 'stuck_base_ms')
  elseif base and line and line > took + base then
    -- Ended past the old line, within the raised one: the line need run no further past this
    -- boot than the old line's length (lost boots raised it on, with none ended to stop them)
    rcall('HSET', K.model, 'stuck_line_ms', took + base)
  end
end

-- A connect or disconnect a replica makes again, after a try whose reply it never read (a
-- stall past its client's timeout, a connection cut): the try may have run. Made again, a
-- user's disconnect and connect would end the session the first try began and begin another,
-- perhaps on another node, while the product's user is on the first. So a replica marks each
-- such call 'replica:batch:seq' (the batch a tag of its own for the events it read together,
-- the seq the call's place among them), and the pool keeps, per replica, the mark of the last
-- one applied, 'batch:seq', and the seqs of that batch passed over on the way to it
-- (':lo-hi,...'): calls the server refused (out of memory, NOSCRIPT, BUSY) while a later one
-- ran. A call of the same batch at or before the last one has run, since a batch's calls run
-- in order, and is not run again (stats 'calls_made_again'); unless it was passed over: then
-- it never ran, and made again it would apply after a later event, so it is refused (an
-- error), dropped and named by the listener as a call refused before one that ran is.
-- Another batch's mark is never compared. No mark (an operator's release, an older replica):
-- applied as ever. A mark ending in '?' only asks: a call the pool's mark does not cover is
-- refused ('NOT RUN'), never applied (the listener asks so about a call refused before a later
-- one that ran, after a try whose reply was lost: it may have run in that try).
-- An entry of `applied` as made_again writes it: its batch, its last seq and the ranges of
-- seqs passed over, {{lo, hi}, ...}, rising and each under the last seq; nil if it is not one
-- (an edit by hand, even one that keeps the pattern: a dash or a colon gone).
local function read_applied(entry)
  local batch, last, rest = string.match(entry, '^([^:]+):(%d+)(.*)$')
  if not batch then
    return nil
  end
  last = tonumber(last)
  local ranges = {}
  if rest ~= '' then
    local list = string.match(rest, '^:([%d,-]+)$')
    if not list then
      return nil
    end
    local after = 0
    for part in string.gmatch(list .. ',', '([^,]*),') do
      local lo, hi = string.match(part, '^(%d+)%-(%d+)$')
      lo, hi = tonumber(lo), tonumber(hi)
      if not lo or lo <= after or hi < lo or hi >= last then
        return nil
      end
      ranges[#ranges + 1] = {lo, hi}
      after = hi
    end
  end
  return batch, last, ranges
end

local function made_again(mark)
  if not mark or mark == '' then
    return false
  end
  -- A try's mark may end in '@ms': the server's time (as its replica reads it) past which the
  -- replica has stopped waiting for it (its client's timeout). A try that comes later, bytes
  -- the network held through a cut and delivered as it healed, or a call a paused server ran
  -- as it came back, is refused whole: its replica counts it as not run, and has since tried
  -- it again, or dropped it, or judged the gap (judge_gap.lua); applied, it would be a late
  -- copy (a second review: a disconnect delivered as a cut healed ended the session its user
  -- had begun since, though the replica dropped the batch). Before any write.
  local base, not_after = string.match(mark, '^(.*)@(%d+)$')
  if base then
    local ran_ms = server_ms()
    if ran_ms > tonumber(not_after) then
      -- counted, as no replica reads the refusal (its client has closed the connection): the
      -- one write of a refused call, to the pool's counters
      stat('calls_late')
      error({err = 'LATE call ' .. base .. ': run ' .. (ran_ms - tonumber(not_after))
        .. ' ms after its replica stopped waiting for it; not applied'})
    end
    mark = base
  end
  local replica, batch, seq, ask = string.match(mark, '^([^:]+):([^:]+):(%d+)(%??)$')
  if not replica then
    error({err = 'bad call mark ' .. mark .. ' (replica:batch:seq)'})
  end
  seq = tonumber(seq)
  local last = rcall('HGET', K.applied, replica)
  local last_batch, last_seq, ranges
  if last then
    last_batch, last_seq, ranges = read_applied(last)
    if not last_batch then
      -- Not one this function wrote (an edit by hand): another batch's is of no use, and is
      -- written over below; of this batch, which of its calls ran cannot be told, so none is
      -- applied (made again, it may have run) nor skipped silently: refused, named by the
      -- listener, until the next batch writes the entry afresh. Counted once: the entry is
      -- noted as found ('batch:?', which no call's mark reads as run), so that the calls of
      -- its batch refused after the first, or questions refused before the next batch writes
      -- it, do not count it again.
      local of_batch = string.match(last, '^([^:]*)')
      if last ~= of_batch .. ':?' then
        stat('values_repaired')
        rcall('HSET', K.applied, replica, of_batch .. ':?')
      end
      if of_batch == batch then
        error({err = 'UNREADABLE mark of replica ' .. replica .. ' in applied, of the batch of '
          .. 'call ' .. mark .. ': whether it ran cannot be told; not applied'})
      end
    end
  end
  if last_batch ~= batch then
    last_seq, ranges = 0, {}
  end
  if seq <= last_seq then
    for _, range in ipairs(ranges) do
      if seq >= range[1] and seq <= range[2] then
        error({err = 'PASSED OVER call ' .. mark .. ': refused while a later call of its '
          .. 'batch ran, so it never ran; not applied after that call'})
      end
    end
    stat('calls_made_again')
    return true
  end
  if ask ~= '' then
    error({err = 'NOT RUN call ' .. mark .. ': the pool applied none of its batch at or after '
      .. 'it, so it never ran; not applied after a later call'})
  end
  if seq > last_seq + 1 then
    ranges[#ranges + 1] = {last_seq + 1, seq - 1}
  end
  local written = {}
  for i, range in ipairs(ranges) do
    written[i] = range[1] .. '-' .. range[2]
  end
  rcall('HSET', K.applied, replica,
        batch .. ':' .. seq .. (#written > 0 and ':' .. table.concat(written, ',') or ''))
  return false
end

-- Shared transitions of the pool. Every script that changes who holds what goes through these,
-- so that the invariants live in one place:
--   * a node is in exactly one of: ready list, booting zset, terminating zset, alloc map values;
--   * a user is in at most one of: waiting queue (with waiting_since), alloc map;
--   * at the end of every script, never both a waiting user and a ready node (match_waiting).

-- Hand node_id to user_id and announce it. The only place that publishes user:allocated.
local function assign(node_id, user_id, now, waited_ms)
  rcall('HSET', node_key(node_id), 'state', 'allocated', 'user', user_id,
        'allocated_ms', now, 'updated_ms', now)
  rcall('HSET', K.alloc, user_id, node_id)
  rcall('ZADD', K.sessions, now, user_id)
  rcall('ZREM', K.engaged, user_id)
  forget_levels(user_id)
  stat('allocations')
  rcall('PUBLISH', 'user:allocated',
        cjson.encode({user_id = user_id, node_id = node_id, waited_ms = waited_ms}))
end

-- The ready node idle the longest, left at the head of the list; nil if none. An entry whose
-- node's record does not say ready (only an edit by hand writes one: an id with no record, a
-- node allocated or gone) is dropped on the way, counted in stats `values_repaired`: never
-- handed to a user, nor chosen by the reaper (an allocated node's was, and DELETEd).
local function first_ready()
  while true do
    local node = rcall('LINDEX', K.ready, 0)
    if not node or rcall('HGET', node_key(node), 'state') == 'ready' then
      return node
    end
    rcall('LPOP', K.ready)
    stat('values_repaired')
  end
end

-- The ready node idle the longest, taken off the list (first_ready's); nil if none.
local function take_ready()
  local node = first_ready()
  if node then
    rcall('LPOP', K.ready)
  end
  return node
end

-- Serve waiting users (oldest first) from ready nodes (idle the longest first), until one of
-- the two runs out. Returns a flat list {user, node, waited_ms, ...} of what it did.
local function match_waiting(now)
  local served = {}
  while rcall('ZCARD', K.waiting) > 0 and rcall('LLEN', K.ready) > 0 do
    local node = take_ready()
    if not node then
      break
    end
    local user = rcall('ZPOPMIN', K.waiting)[1]
    local since = tonumber(rcall('HGET', K.waiting_since, user)) or now
    rcall('HDEL', K.waiting_since, user)
    local waited = math.max(0, now - since)
    assign(node, user, now, waited)
    stat('served_after_wait')
    stat('wait_ms_total', waited)
    served[#served + 1] = user
    served[#served + 1] = node
    served[#served + 1] = waited
  end
  return served
end

-- A node is free (just booted, or its user left): it goes to the oldest waiting user, if any,
-- else to the tail of the ready list. The list is in idle order: connects take the head (idle
-- the longest, as FORMAT.md's reference pool does) and the reaper looks at the head too.
local function node_free(node_id, now)
  rcall('HSET', node_key(node_id), 'state', 'ready', 'user', '', 'idle_since_ms', now,
        'updated_ms', now)
  rcall('RPUSH', K.ready, node_id)
  return match_waiting(now)
end

-- A session resumed: a connect within RETURN_MS of the same user's session ending (its node
-- freed back to the pool), or of their wait for a node being abandoned, is that session going
-- on (a client that dropped and came back, or one in a loop), not a new one. The connect needs
-- a node as any does, but the forecast learned the session's connect already, and the release
-- before it taught a session's end ('rel'): taken back. A client flapping 200 times a second
-- took the target to 101 and the pool to its max_nodes, one node ever held (a review); behind a
-- user waiting, its node handed on, it waits and abandons in turn. The nearest reconnect of any
-- recorded trace is 66 s after the session (fast-converters), and generated users connect
-- once, so no replay sees one.
local RETURN_MS = 30000

-- The end of a user's session, or of their wait, in `ended`: scored by when, negated for a
-- wait abandoned (no release to take back). Marks over 2 x RETURN_MS old go at each mark (one
-- range, both signs), so that a replica whose clock runs ahead trims none another may still
-- read as within RETURN_MS.
local function mark_ended(user, now, released)
  local old = now - 2 * RETURN_MS
  rcall('ZREMRANGEBYSCORE', K.ended, '(' .. -old, '(' .. old)
  rcall('ZADD', K.ended, released and now or -now, user)
end

-- Whether the user's session or wait ended within RETURN_MS of `now` (either side: a replica
-- whose clock runs behind the one that marked it), and whether by a release (to be taken
-- back); the mark is taken either way.
local function session_resumed(user, now)
  local score = tonumber(rcall('ZSCORE', K.ended, user))
  if not score then
    return false, false
  end
  rcall('ZREM', K.ended, user)
  return math.abs(now - math.abs(score)) <= RETURN_MS, score > 0
end

-- Places in line: whole numbers, so one past the last (or before the first) is exact while
-- they stay within 2^53. Users who join at the back hold places from 1 up, a crashed node's
-- users put at the front places from -1 down, so the two meet at 0: the snapshot finds the
-- longest wait there, however many crashes lead the queue (the users at the back waited the
-- longest at the front of theirs, the crashed nodes' users since their crash, the earliest
-- nearest 0). A place that cannot move by one (inf, or beyond 2^53: only an edit by hand
-- writes one) would tie every later user with it, served then by id, not by arrival; the queue
-- is numbered again in its order (below 0 from -1 down, the rest from 1 up), counted in stats
-- `values_repaired`. O(n), once.
local EXACT_PLACES = 2 ^ 53

local function waiting_edge(at_head)
  local edge = rcall('ZRANGE', K.waiting, at_head and 0 or -1, at_head and 0 or -1, 'WITHSCORES')
  return tonumber(edge[2])
end

local function renumber_waiting()
  local front = rcall('ZRANGEBYSCORE', K.waiting, '-inf', '(0')
  for k, user in ipairs(front) do
    rcall('ZADD', K.waiting, k - #front - 1, user)
  end
  for place, user in ipairs(rcall('ZRANGEBYSCORE', K.waiting, 0, '+inf')) do
    rcall('ZADD', K.waiting, place, user)
  end
  stat('values_repaired')
end

-- Put a user at the back (or, after a crash of their node, the front) of the waiting queue: a
-- sorted set scored by place in line, so a waiting user's disconnect is a ZREM, O(log n).
local function enqueue_waiting(user_id, now, at_head)
  local edge = waiting_edge(at_head)
  if edge and not (math.abs(edge) < EXACT_PLACES) then
    renumber_waiting()
    edge = waiting_edge(at_head)
  end
  local place
  if at_head then
    place = math.min((edge or 0) - 1, -1)
  else
    place = math.max((edge or 0) + 1, 1)
  end
  rcall('ZADD', K.waiting, place, user_id)
  rcall('HSET', K.waiting_since, user_id, now)
  rcall('ZREM', K.engaged, user_id)
  forget_levels(user_id)
  rcall('PUBLISH', 'user:waiting', cjson.encode({user_id = user_id}))
end

-- Create the record of a node the pool has not seen. origin: api | status | listed | late.
-- About half the nodes are boot-time samples, chosen by a hash of the id (so by neither the
-- order the pool records them in, which races between replicas, nor their boot time): the boot
-- time is learned from these only, and reap_idle never gives one up in an idle node's place
-- while booting (a stuck one is ended all the same). Giving up
-- boots picked from all nodes would leave mostly the short ones to learn from (a long boot stays
-- a candidate for longer), and the horizon learned would come out short.
-- `creates_seen`: how many creates the pool had reserved (`seq`) when it first recorded the
-- node, by which `provisioner replace` tells a node adopted after its run began (a create
-- whose POST timed out, seen on node:status) from the nodes it replaces.
local function new_node(node_id, state, now, origin, reservation)
  local sample = tonumber(string.sub(redis.sha1hex(node_id), -1), 16) % 2
  rcall('HSET', node_key(node_id), 'id', node_id, 'state', state, 'created_ms', now,
        'updated_ms', now, 'origin', origin, 'reservation', reservation or '', 'user', '',
        'boot_sample', sample, 'creates_seen', tonumber(rcall('GET', K.seq)) or 0)
  rcall('ZADD', K.nodes, now, node_id)
  stat('nodes_seen')
end

-- The deadline of a drained node's first DELETE, which nobody has sent: due at once by any
-- replica's clock (the operator's `now` is the CLI host's, and a clock ahead there held the
-- DELETE back until the replicas' clocks reached it).
local DRAINED_DUE_MS = 0

-- A node out of every other state's structure becomes `terminating` until `deadline`. The
-- DELETE is the caller's to send now; `unsent` (an operator's drain, which sends none): it is
-- due at the deadline, when reap_idle sends it and counts it.
local function mark_terminating(node_id, now, deadline, reason, unsent)
  local nk = node_key(node_id)
  rcall('HSET', nk, 'state', 'terminating', 'term_reason', reason, 'term_requested_ms', now,
        'updated_ms', now)
  if not unsent then
    add_to(nk, 'delete_attempts', 1, false)
  end
  rcall('ZADD', K.terminating, deadline, node_id)
  rcall('ZREM', K.unclaimed, node_id)
end

-- Move a node to 'terminating' and schedule a retry deadline; the caller sends the DELETE
-- (see mark_terminating). Only ready and booting nodes can be terminated by the pool: allocated
-- ones never (an operator's drain ends the session first, drain_node.lua).
local function start_terminating(node_id, now, deadline, reason, unsent)
  local state = rcall('HGET', node_key(node_id), 'state')
  if state == 'ready' then
    rcall('LREM', K.ready, 0, node_id)
  elseif state == 'booting' then
    rcall('ZREM', K.booting, node_id)
  elseif state ~= 'terminating' then
    return false
  end
  mark_terminating(node_id, now, deadline, reason, unsent)
  return true
end

-- An operator's drain takes the node now (drain_node.lua; release.lua at the end of the
-- session it was drained in): out of its state's structure, terminating, its first DELETE due
-- at once by any replica's clock (DRAINED_DUE_MS), sent and counted by reap_idle. A node in a
-- session loses its user: the caller has ended the session.
local function terminate_drained(node_id, now)
  local nk = node_key(node_id)
  rcall('ZREM', K.drains, node_id)
  if rcall('HGET', nk, 'state') == 'allocated' then
    rcall('HSET', nk, 'user', '')
    mark_terminating(node_id, now, DRAINED_DUE_MS, 'drained', true)
  else
    start_terminating(node_id, now, DRAINED_DUE_MS, 'drained', true)
  end
end

-- The user whose session is on the node: its record's user, if that user's allocation is this
-- node; '' if none (a record a hand edit, or a state put back from an older copy, left).
local function session_user(node_id)
  local user = rcall('HGET', node_key(node_id), 'user')
  if user and user ~= '' and rcall('HGET', K.alloc, user) == node_id then
    return user
  end
  return ''
end

-- The session on an allocated node ends with the node (it died, or an operator drains it at
-- once): its user goes back to the head of the waiting queue, served by the caller's
-- match_waiting. Returns the user, or false if the node's record names no session of theirs.
local function requeue_session(node_id, now)
  local nk = node_key(node_id)
  local user = session_user(node_id)
  if user == '' then
    return false
  end
  rcall('HDEL', K.alloc, user)
  rcall('ZREM', K.sessions, user)
  local since = tonumber(rcall('HGET', nk, 'allocated_ms')) or now
  stat('busy_ms_total', math.max(0, now - since))
  enqueue_waiting(user, now, true)
  stat('requeued')
  return user
end

-- The node no longer exists. Whatever it was doing stops; its user, if any, goes back to the
-- head of the waiting queue (and is served at once if a ready node exists). Keeps a tombstone.
-- Returns the requeued user id or false, and the list match_waiting produced.
local function node_gone(node_id, now, reason)
  local nk = node_key(node_id)
  local state = rcall('HGET', nk, 'state')
  local requeued = false
  if state == 'ready' then
    rcall('LREM', K.ready, 0, node_id)
  elseif state == 'booting' then
    rcall('ZREM', K.booting, node_id)
  elseif state == 'terminating' then
    rcall('ZREM', K.terminating, node_id)
  elseif state == 'allocated' then
    requeued = requeue_session(node_id, now)
  end
  rcall('ZREM', K.nodes, node_id)
  rcall('ZREM', K.unclaimed, node_id)
  rcall('ZREM', K.drains, node_id)
  rcall('HSET', nk, 'id', node_id, 'state', 'terminated', 'terminated_ms', now,
        'updated_ms', now, 'end_reason', reason, 'user', '')
  rcall('PEXPIRE', nk, TOMBSTONE_TTL_MS)
  stat('nodes_terminated')
  local served = {}
  if requeued then
    served = match_waiting(now)
  end
  return requeued, served
end
