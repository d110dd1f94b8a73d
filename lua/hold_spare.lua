#!lua
--[[
  hold_spare: `provisioner replace` holds spare nodes above the pool's keep level while it
  replaces nodes, so that each batch of ready nodes it drains has been booted before it goes
  (a rolling update's surge): while it is held, scale_decide's target is the keep level (the
  peak target of its window) and `extra` more, and reap_idle keeps them; the run drains a
  batch only while the pool's ready nodes meet that level, in a decision that says it held
  them (`held` in its numbers). Without it, a pool at its floor (one ready node, the target
  1) was drained to none before anything booted in its place, and the next connect missed (a
  review's drill in containers).

  The hold is a lease: `extra:until_ms:run`, written with the lease as the key's expiry (PX),
  so that it ends by the server's clock, the one every replica shares (until_ms, the run's
  `now` plus the lease, is for people to read; a review found a lease judged by each
  replica's own clock ignored by one 30 s ahead, and held on by one behind): a run that dies
  leaves the pool at its own target once the lease ends. The run renews it every round; one
  run holds it at a time, and the marks it makes in sessions are refused once it holds it no
  more (drain_node.lua, ARGV[8]).

    take     -> held by this run (another run's hold is taken over: that run finds it gone
                at its next renewal and stops)
    renew    -> held longer, at `extra` again, only if this run holds it; else nothing
                (TAKEN_BACK): let go by `replace --cancel`, or taken over by another run
    keep     -> as renew, but never more spare than it holds: the run's last batch lowers
                it as it goes (drain_node.lua, ARGV[9]), and the run keeps it so while no
                old node is left to go (renewed at `extra` instead, the pool booted as many
                again as the last batch went); one that comes back (a session's node freed
                before its mark, a drain refused part way) is renewed at `extra` again
    release  -> let go, if this run holds it (with ARGV[4] '', any run's: `replace --cancel`)

  Idempotent: a second take, renew or keep writes the same; a second release finds nothing.

  KEYS: the pool key vector (lua/includes/keys.lua)
  ARGV[1] now (ms)
  ARGV[2] 'take', 'renew', 'keep' or 'release'
  ARGV[3] extra spare nodes (take, renew, keep; 1 to 1000000: keep keeps fewer if fewer are held)
  ARGV[4] the run's token (take, renew, keep; with release, '' lets go of any run's hold)
  ARGV[5] the lease (ms; take, renew, keep)

  Returns {code, the run that held it before or ''}
    1 HELD        held (taken, renewed or kept)
    0 TAKEN_BACK  renew, keep: this run did not hold it; nothing done
    2 RELEASED    release: let go
    3 NOT_HELD    release: no hold of that run; nothing done
]]
--@include "includes/keys.lua"
--@include "includes/pool.lua"

refuse_wrong_types()  -- before any write: a script refused half-way keeps what it wrote

local now = tonumber(ARGV[1])
local mode = ARGV[2]
local extra = tonumber(ARGV[3] or '')
local run = ARGV[4] or ''
local lease_ms = tonumber(ARGV[5] or '')

local held = rcall('GET', K.replacing)
local held_extra, holder = read_hold(held)
holder = holder or ''

if mode == 'release' then
  if not held or (run ~= '' and holder ~= run) then
    return {3, holder}
  end
  rcall('DEL', K.replacing)
  return {2, holder}
end
if mode ~= 'take' and mode ~= 'renew' and mode ~= 'keep' then
  error({err = 'hold_spare: mode ' .. tostring(mode) .. ' is not take, renew, keep or release'})
end
if not now or not extra or extra < 1 or extra > HOLD_MAX or extra ~= math.floor(extra)
    or run == '' or string.find(run, ':', 1, true) or not lease_ms or lease_ms <= 0 then
  error({err = 'hold_spare: take, renew and keep need now, a whole extra of 1 to 1000000, a '
    .. 'run token without a colon and a lease'})
end
if mode ~= 'take' and holder ~= run then
  return {0, holder}
end
if mode == 'keep' then
  extra = math.min(extra, held_extra)
end
rcall('SET', K.replacing, score(extra) .. ':' .. score(now + lease_ms) .. ':' .. run, 'PX',
      score(lease_ms))
return {1, holder}
