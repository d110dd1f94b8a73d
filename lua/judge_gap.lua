#!lua flags=no-writes
--[[
  judge_gap: a replica that could not reach the server for a while, and holds the events it
  was applying, asks whether the server served the pool's other replicas meanwhile. Asked by
  the listener once the server answers again, for a batch held past UNREACHABLE_HOLD_S
  (provisioner/service.py `_run_events`).

  Every event comes through this server. So while it served no one (paused, stalled, its host
  cut off), no one published a later event, nor applied one since the gap began, and the batch held
  can be applied late
  without being taken for a later one: 'pause'. While it served the others, they applied the
  same messages in time and those after them, and a late copy would be (the payloads carry no
  id: a disconnect held would end the session its user began since): 'served', the batch is
  dropped. The evidence is the pool's heartbeats (`beats`, kept by heartbeat.lua for
  forget_ms): each replica beats every `interval_s` it says in `replica_info`, so in a span of
  twice the longest interval any replica the server serves has beaten at least once.

  The span judged is the gap less an edge at each end: at its start for the replica's
  estimate of when its first unanswered try reached the server; at its end for what the
  server ran once it answered again (every replica's heartbeats queued while it did not, and
  the beats of the others that came before this question). Not from when the question was
  sent: one sent to a paused server waits there (the client's timeout, 5 s), and runs as it
  comes back (a helper's drill: so judged, a pause of 15 s with heartbeats every 5 s was too
  short to tell). One held up connecting instead (SYNs resent to a server that took none)
  runs seconds after the server came back: the others' beats since may then be taken for a
  cut, and the batch dropped, as before gaps were judged.

  'unknown' if the beats cannot vouch for the pool: the span shorter than twice the longest
  interval; no heartbeat in that length before the gap (the pool's heartbeats not running); a
  replica that applies events and keeps no beats, which could have applied this replica's
  events in the gap unseen: one run with --heartbeat-interval 0 (a mark in `applied`, no
  entry in `replica_info`), or one of a release before `beats` (its entry not saying
  `keeps_beats`: a rolling upgrade; a review proved either taken for a pause). The listener
  drops the batch then, as it does for 'served', but not the messages behind it.

  O(r + log n): r the replicas in replica_info and applied, n the beats kept. Writes nothing.

  KEYS: the pool key vector (lua/includes/keys.lua)
  ARGV[1] began_ms: the server's time, as the replica estimates it from its last heartbeat
          and its own monotonic clock, when it sent the first try the server did not answer
  ARGV[2] start_edge_ms
  ARGV[3] end_edge_ms
  Returns {verdict ('pause', 'served' or 'unknown'), the heartbeats in the span, the span's
           length (ms), the length it needs (ms), the heartbeats in that length before the gap,
           the gap's length (ms, by the server's clock), why the beats cannot vouch for the
           pool ('' if they can)}
]]
--@include "includes/keys.lua"

local began = tonumber(ARGV[1])
local start_edge = tonumber(ARGV[2])
local end_edge = tonumber(ARGV[3])
if not began or not start_edge or not end_edge then
  return redis.error_reply('judge_gap: ARGV must be three numbers (began_ms, start_edge_ms, '
    .. 'end_edge_ms)')
end
local now = server_ms()

local longest = 0
local unvouched = ''
local infos = rcall('HGETALL', K.replica_info)
local listed = {}
for i = 1, #infos, 2 do
  local replica, info = infos[i], infos[i + 1]
  listed[replica] = true
  local ok, said = pcall(cjson.decode, info)
  -- a value edited by hand (not JSON, no interval, not a positive number) says nothing
  if ok and type(said) == 'table' and type(said.interval_s) == 'number'
      and said.interval_s > 0 and said.interval_s < math.huge then
    longest = math.max(longest, said.interval_s * 1000)
  end
  if unvouched == '' and not (ok and type(said) == 'table' and said.keeps_beats == true) then
    unvouched = 'replica ' .. replica .. ' runs a release that keeps no beats'
  end
end
if unvouched == '' then
  for _, replica in ipairs(rcall('HKEYS', K.applied)) do
    if not listed[replica] then
      unvouched = 'replica ' .. replica .. ' applies events with no heartbeat'
      break
    end
  end
end
local needed = math.ceil(2 * longest)
local lo, hi = began + start_edge, now - end_edge
local span = hi - lo
local within, before = 0, 0
if span > 0 then
  within = rcall('ZCOUNT', K.beats, '(' .. lo, '(' .. hi)
end
if needed > 0 then
  before = rcall('ZCOUNT', K.beats, began - needed, began)
end
local verdict = 'unknown'
if within > 0 then
  verdict = 'served'
elseif needed > 0 and span >= needed and before > 0 and unvouched == '' then
  verdict = 'pause'
end
return {verdict, within, math.floor(span), needed, before, now - began, unvouched}
