#!lua
--[[
  load_model: an operator's import of a learned model (`provisioner model import`): what another
  pool learned, or this pool before its data was lost, so that a new pool starts from it instead
  of from the priors (lua/includes/policy.lua). The fields are those the forecast learns
  (model_fields: the cells' exposures and credits, the users not browsing yet's, the releases,
  the arrivals, the boot time); all of them are replaced at once, and the fields the import
  does not name are dropped, so nothing of the old model is mixed into the new. The forecast's
  check of itself starts afresh (its counts are the old pool's), and the decay runs from now.

  Refused as a whole, writing nothing, when any field is not one the forecast learns or its
  value not a non-negative finite number (the same test the forecast reads its fields with)
  or more than any pool learns (MOST_LEARNED),
  when there is no field, or when the pool has a model already (learned or imported: the
  forecast's clock, a boot time or a release rate) and `replace` is not given: an import never
  overwrites what a running pool learned by accident.

  KEYS: the pool key vector (lua/includes/keys.lua)
  ARGV[1] now (ms)
  ARGV[2] '1' to replace a model the pool has (learned or imported), '0' to refuse
  ARGV[3..] field, value pairs

  Returns {1, fields written} | {0, reason, problem...}
]]
--@include "includes/keys.lua"
--@include "includes/policy.lua"

refuse_wrong_types()  -- before any write: a script refused half-way keeps what it wrote

local now = tonumber(ARGV[1])
local replace = ARGV[2] == '1'

-- The most a pool can have learned: a mean boot time up to the longest boot timeout (a boot
-- that runs longer is ended, reap_idle's learned timeout being capped there too, and teaches
-- nothing), a decayed sum (user-seconds, counts) far
-- past any real pool's. A value beyond is a file made by hand or damaged, and would set the
-- target to nonsense (a boot of 1e308 ms made an idle pool create max_batch nodes a tick).
local MOST_LEARNED = {boot_ms = 86400000, default = 1e12}

local fields = model_fields()
local known = {}
for _, f in ipairs(learned_fields()) do
  known[f] = true
end
local problems, writes, seen = {}, {}, {}
if (#ARGV - 2) % 2 ~= 0 then
  problems[#problems + 1] = 'a field without a value'
end
for i = 3, #ARGV - 1, 2 do
  local f, v = ARGV[i], ARGV[i + 1]
  if not known[f] then
    problems[#problems + 1] = f .. ': not a field the forecast learns'
  elseif seen[f] then
    problems[#problems + 1] = f .. ': given twice'
  elseif learned(v) == nil then
    problems[#problems + 1] = f .. ': ' .. v .. ' is not a non-negative finite number'
  elseif learned(v) > (MOST_LEARNED[f] or MOST_LEARNED.default) then
    problems[#problems + 1] = string.format('%s: %s is more than any pool learns (at most %.15g)',
                                            f, v, MOST_LEARNED[f] or MOST_LEARNED.default)
  else
    seen[f] = true
    writes[#writes + 1] = f
    writes[#writes + 1] = v
  end
end
if #problems > 0 then
  -- the first 50, then how many more: a reply unpacks onto Lua's stack, which a file of 200,000
  -- unknown fields overflowed ("too many results to unpack")
  local shown = {0, 'refused: the model is not valid'}
  for i = 1, math.min(#problems, 50) do shown[#shown + 1] = problems[i] end
  if #problems > 50 then shown[#shown + 1] = (#problems - 50) .. ' more problems' end
  return shown
end
if #writes == 0 then
  return {0, 'refused: the model has no field'}
end
-- A model the pool has: the forecast's clock (its first tick writes it), or a boot time or a
-- release rate learned without one (--scaling-policy heuristic learns both: the stuck-boot
-- timeout reads the boot time). Arrivals alone are not: a new pool counts them from its first
-- activity, before an import is likely to come.
local has_model = false
for _, f in ipairs({'last_ms', 'boot_n', 'rel'}) do
  has_model = has_model or rcall('HEXISTS', K.model, f) == 1
end
if not replace and has_model then
  return {0, 'refused: the pool has a model already, learned or imported'
    .. ' (replace it on purpose: `provisioner model import FILE --replace`)'}
end

-- An imported boot time stands for boots seen to end by now (reap_idle.lua: a stuck boot begun
-- after, with none ended since, raises the stuck line); the line the old model raised, and its
-- base, go with it.
local old = {'check_until_ms', 'check_connects', 'check_mean', 'check_var', 'boot_seen_ms',
             'stuck_line_ms', 'stuck_base_ms'}
for _, f in ipairs(fields) do old[#old + 1] = f end
rcall('HDEL', K.model, unpack(old))
rcall('HSET', K.model, 'last_ms', now, unpack(writes))
if seen.boot_ms then
  rcall('HSET', K.model, 'boot_seen_ms', now)
end
stat('model_imports')
return {1, #writes / 2}
