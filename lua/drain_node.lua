#!lua
--[[
  drain_node: an operator takes a node out of the pool (`provisioner drain`), one that
  misbehaves or must go for maintenance.

    ready, booting  -> terminating at once, its DELETE due now (DRAINED_DUE_MS, by any
                       replica's clock): the next reap_idle of any replica sends it (reason
                       `drained`), and the forecast boots a replacement if its target wants
                       one, as after any termination.
    allocated       -> marked (`drain_by`, and in `drains`): the session goes on, and when
                       it ends (release.lua) the node is terminated instead of freed; until
                       then the forecast counts no free from it. With ARGV[6]
                       'now', the session ends here: its user goes back to the head of the
                       waiting queue (served at once if a node is ready), as when a node dies,
                       and the node is terminated at once.
    terminating, terminated, unknown -> nothing.

  With ARGV[6] 'cancel', the mark of a node in a session is taken back (`provisioner drain
  --cancel`): the node goes back to the pool when its session ends, as any. So is a mark a
  replica of an earlier release left on a node it freed, ready or booting now. A node
  terminating already cannot come back (its DELETE may be out).

  Idempotent: a second drain finds the node terminating, or marked already (NOTHING).

  KEYS: the pool key vector (lua/includes/keys.lua)
  ARGV[1] now (ms)
  ARGV[2] node id
  ARGV[3] who drains it, for the decisions stream (kind 'drain')
  ARGV[4] most entries kept in the decisions stream (optional, 1000)
  ARGV[5] what the operator was shown and confirmed (optional): 'ready', 'booting' or
          'allocated:USER'; the drain is refused if the node's state is another now (a node
          shown booting that is ready since, handed to no one, is drained all the same)
  ARGV[6] 'now' to end an allocated node's session at once, or 'cancel' to take a mark back
          (optional)
  ARGV[7] with 'allocated:USER', when the session shown began (optional; ms, the user's
          score in `sessions`): a session begun since on the same node (a disconnect and a
          connect while the prompt waited) is refused too
  ARGV[8] a `provisioner replace` run's token (optional): the drain is refused (NOT_HELD)
          unless that run holds the pool's spare (hold_spare.lua), so that once `--cancel`
          lets go of the hold, the run's round under way marks nothing more (a review: a
          cancel read the marks while a slow round still made them)
  ARGV[9] 'last' (optional, with ARGV[8]): the node is of the run's last batch; once it is
          drained (ready or booting), the run's hold is one spare lower (not below 0, its
          lease as it was). The hold booted the last batch's replacements before it went, as
          every batch's; held on after it, it asked for as many again (a pool at a floor of
          one booted a second node as its old one went, and reaped it idle later).

  Returns {code, state, ...}
    1 DRAINING  {1, previous state, requeued user or '', [user, node, waited_ms]...}
    2 MARKED    {2, 'allocated', user}: terminated when its session ends
    3 CHANGED   {3, state or ''}: not what ARGV[5] and ARGV[7] say; nothing done
    0 NOTHING   {0, state or '', user}: terminating, terminated or unknown, or (user) in a
                session and marked already; nothing done
    4 CANCELLED {4, state, user or ''}: the mark taken back (with 'cancel'); with 'cancel',
                any node not marked, or ending, is NOTHING
    5 NOT_HELD  {5, state, the run that holds it or ''}: the run of ARGV[8] holds no spare;
                nothing done
]]
--@include "includes/keys.lua"
--@include "includes/pool.lua"

refuse_wrong_types()  -- before any write: a script refused half-way keeps what it wrote

local now = tonumber(ARGV[1])
local node = ARGV[2]
local by = ARGV[3] or ''
local log_len = tonumber(ARGV[4]) or 1000
local expected = ARGV[5] or ''
local at_once = ARGV[6] == 'now'
local cancel = ARGV[6] == 'cancel'
local session_seen = ARGV[7] or ''
local run = ARGV[8] or ''
local last = ARGV[9] == 'last'

local nk = node_key(node)
local state = rcall('HGET', nk, 'state')
local user = session_user(node)
if expected ~= '' then
  local now_is = state == 'allocated' and ('allocated:' .. user) or (state or '')
  if now_is ~= expected and not (expected == 'booting' and state == 'ready') then
    return {3, state or ''}
  end
  if state == 'allocated' and session_seen ~= '' and
      tonumber(rcall('ZSCORE', K.sessions, user)) ~= tonumber(session_seen) then
    return {3, state}
  end
end
if state ~= 'ready' and state ~= 'booting' and state ~= 'allocated' then
  return {0, state or ''}
end
-- A run's hold, read once: its holder checked here, its extra lowered by a last batch below.
local hold, hold_extra, holder
if run ~= '' and not cancel then
  hold = rcall('GET', K.replacing)
  hold_extra, holder = read_hold(hold)
  if holder ~= run then
    return {5, state, holder or ''}
  end
end

if cancel then
  if not rcall('HGET', nk, 'drain_by') then
    return {0, state or '', ''}
  end
  rcall('HDEL', nk, 'drain_by', 'drain_asked_ms')
  rcall('ZREM', K.drains, node)
  log_entry(log_len, now, by, 'drain', string.format(
      'the drain of node %s taken back by %s: %s', node, by, user ~= '' and string.format(
          'it goes back to the pool when the session of user %s ends', user)
      or 'it stays in the pool'), '{}', 0)
  return {4, state, user}
end

local function log_drain(what)
  stat('operator_drains')
  log_entry(log_len, now, by, 'drain', string.format('node %s drained by %s: %s', node, by, what),
            '{}', 1)
end

if state == 'allocated' and not at_once and user ~= '' then
  if rcall('HGET', nk, 'drain_by') then
    return {0, state, user}
  end
  rcall('HSET', nk, 'drain_by', by, 'drain_asked_ms', now)
  rcall('ZADD', K.drains, now, node)  -- the forecast counts no free from it (observe)
  log_drain(string.format('terminated when the session of user %s ends', user))
  return {2, state, user}
end

local requeued = state == 'allocated' and requeue_session(node, now)
terminate_drained(node, now)
local result = {1, state, requeued or ''}
if last and hold and state ~= 'allocated' and hold_extra > 0 then  -- the run's: checked above
  rcall('SET', K.replacing, (string.gsub(hold, '^%d+', score(hold_extra - 1))), 'KEEPTTL')
end
if state ~= 'allocated' then
  log_drain(string.format('was %s; its DELETE is sent by the next replica to tick', state))
  return result
end
local served = requeued and match_waiting(now) or {}
for _, v in ipairs(served) do result[#result + 1] = v end
log_drain(requeued and string.format('the session of user %s ended, the user back at the head '
                                      .. 'of the queue%s', requeued, served[1]
                                      and (' and served node ' .. served[2]) or '')
          or 'an allocated record with no session of its user')
return result
