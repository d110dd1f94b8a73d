#!lua
--[[
  release: a user:disconnect event.

  A user holding a node gives it back: the node goes to the oldest waiting user at once (published
  as user:allocated with the measured waited_ms) or becomes ready (idle) at the tail of the ready
  list, which is in idle order; a node an operator drained during the session
  (drain_node.lua) is terminated instead, its DELETE due at once (reap_idle sends it). A user
  still waiting leaves the queue and counts as abandoned. Anyone else: nothing.
  Either way the user's activity window starts afresh: browsing after a session is new browsing.
  Each release is one event of the release rate the forecast learns ('rel' in the model). A
  session ended with its node freed, or a wait abandoned, is marked in `ended`, so that the same
  user's connect within RETURN_MS resumes it (includes/pool.lua; allocate.lua takes the release
  back from 'rel').

  Idempotent: a second disconnect finds the user holding nothing.

  An operator ends a session whose disconnect was lost the same way (`provisioner release`),
  naming themselves in ARGV[3]: what that changed is logged to the `decisions` stream (kind
  'release') and counted in `operator_releases`.

  KEYS: the pool key vector (lua/includes/keys.lua)
  ARGV[1] now (ms)
  ARGV[2] user id
  ARGV[3] who released the user, for an operator's release (optional; empty for a disconnect)
  ARGV[4] most entries kept in the decisions stream (optional, 1000)
  ARGV[5] what the operator was shown and confirmed (optional): 'node:ID' for a user holding
          node ID, 'waiting' for a user waiting, 'nothing'; the release is refused if the
          user's state is another now (a session begun, or a node handed out, while the prompt
          waited)
  ARGV[6] when the session the operator was shown began (optional; ms, the user's score in
          `sessions`): with 'node:ID', a session begun since on the same node (a disconnect and
          a connect while the prompt waited, and the node the only one ready) is refused too
  ARGV[7] the replica's mark of a disconnect's call, 'replica:batch:seq' (optional): a
          call made again after a reply lost is not applied again (made_again in
          includes/pool.lua)

  Returns {code, node_id, served...}
    1 RELEASED   {1, node, [user, node, waited_ms] if the node went to a waiting user}
    2 ABANDONED  {2, ''}
    0 UNKNOWN    {0, ''}
    3 CHANGED    {3, node or ''}: not what ARGV[5] and ARGV[6] say; nothing done
    4 STALE      {4, node}: the user's allocation was stale (the node's record names no
                 session of theirs, e.g. the node was declared gone): the entry is dropped,
                 nothing is freed
    5 MADE_AGAIN {5, ''}: this call already ran; nothing done
    6 DRAINED    {6, node}: as RELEASED, but the node was drained during the session
                 (drain_node.lua): it is terminating, its DELETE due at once
]]
--@include "includes/keys.lua"
--@include "includes/pool.lua"

refuse_wrong_types()  -- before any write: a script refused half-way keeps what it wrote

local now = tonumber(ARGV[1])
local user = ARGV[2]
local by = ARGV[3] or ''
local log_len = tonumber(ARGV[4]) or 1000
local expected = ARGV[5] or ''
local session_seen = ARGV[6] or ''

if made_again(ARGV[7]) then
  return {5, ''}
end

-- An operator's release, logged with what it did.
local function log_release(what)
  if by == '' then return end
  stat('operator_releases')
  log_entry(log_len, now, by, 'release',
            string.format('user %s released by %s: %s', user, by, what), '{}', 1)
end

local node = rcall('HGET', K.alloc, user)
local waits = rcall('HEXISTS', K.waiting_since, user) == 1
if expected ~= '' then
  local now_is = node and ('node:' .. node) or (waits and 'waiting') or 'nothing'
  if now_is ~= expected then
    return {3, node or ''}
  end
  if node and session_seen ~= '' and
      tonumber(rcall('ZSCORE', K.sessions, user)) ~= tonumber(session_seen) then
    return {3, node}
  end
end
if node or waits then
  forget_browsing(user)
end
if node then
  rcall('HDEL', K.alloc, user)
  rcall('ZREM', K.sessions, user)
  stat('releases')
  local nk = node_key(node)
  -- The node's own record must agree; if it does not (it was already declared gone), the
  -- allocation entry was stale and there is nothing to free.
  local freed = rcall('HGET', nk, 'state') == 'allocated' and rcall('HGET', nk, 'user') == user
  local result = {freed and 1 or 4, node}
  if freed then
    local since = tonumber(rcall('HGET', nk, 'allocated_ms')) or now
    stat('busy_ms_total', math.max(0, now - since))
    add_to(K.model, 'rel', 1, true)
    local drained_by = rcall('HGET', nk, 'drain_by')
    if drained_by then
      -- An operator drained the node during the session (drain_node.lua): it goes now,
      -- instead of back to the pool.
      terminate_drained(node, now)
      stat('drained_session_ends')  -- a release that freed no node (the forecast's check)
      log_entry(log_len, now, drained_by, 'drain', string.format(
          'node %s terminated after the session of user %s, drained by %s', node, user,
          drained_by), '{}', 1)
      log_release(string.format('node %s freed after a session of %.0fs, and terminated '
                                .. '(drained by %s)', node, (now - since) / 1000, drained_by))
      return {6, node}
    end
    local served = node_free(node, now)
    mark_ended(user, now, true)
    for _, v in ipairs(served) do result[#result + 1] = v end
    log_release(string.format('node %s freed after a session of %.0fs, %s', node,
                              (now - since) / 1000, served[1] and ('to waiting user ' .. served[1])
                              or 'back to the ready list'))
  else
    log_release(string.format('a stale allocation of node %s (state %s) dropped', node,
                              tostring(rcall('HGET', nk, 'state'))))
  end
  return result
end

if waits then
  local since = tonumber(rcall('HGET', K.waiting_since, user)) or now
  rcall('ZREM', K.waiting, user)
  rcall('HDEL', K.waiting_since, user)
  stat('abandoned')
  mark_ended(user, now, false)
  log_release(string.format('left the waiting queue after %.0fs', (now - since) / 1000))
  return {2, ''}
end
return {0, ''}
