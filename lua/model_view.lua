#!lua flags=no-writes
--[[
  model_view: what the pool has learned, as the forecast reads it, for `provisioner model show`.
  Changes nothing. Per cell (browsing level x age since first seen): the seconds users spent in
  it and the chance that a user there connects within the horizon H, from the same functions
  the forecast uses (lua/includes/policy.lua), the priors included; the users not browsing
  yet's connects per H; the boot lead time; the mean session; the long-run arrivals per minute
  (the decayed count over a full memory, the panic's baseline: low in a new pool); and the
  names of the fields the forecast learns (`learned_fields`: what `provisioner model export`
  writes and load_model accepts, the model hash's other fields belonging to the running pool).
  The chances are as learned, without the discount `uncredited_exposure` may apply to the last
  horizon's exposure of the cells browsing now.

  KEYS: the pool key vector (lua/includes/keys.lua)
  ARGV: the policy parameters (lua/includes/policy.lua read_params), as scale_decide takes them

  Returns a JSON object.
]]
--@include "includes/keys.lua"
--@include "includes/policy.lua"

local p = read_params()
local m, known = read_model()
local lead_ms = lead_time(p, m.boot_ms, m.boot_n)
local horizon_ms = math.min(lead_ms, p.window_ms)
local cells = {}
for i, k in ipairs(LEVELS) do
  for j = 1, #AGES + 1 do
    local c = i .. '_' .. j
    cells[#cells + 1] = {
      level = k, age_from_s = j == 1 and 0 or AGES[j - 1] / 1000,
      age_to_s = AGES[j] and AGES[j] / 1000 or cjson.null,
      exposure_s = m['x' .. c], credit_s = m['r' .. c], chance = cell_chance(m, c, m['x' .. c]),
    }
  end
end
local half_life_s = p.half_life_ms / 1000
return cjson.encode({
  -- a model the pool has, as load_model refuses to overwrite it: the forecast's clock, or a
  -- boot time or a release rate learned without one (--scaling-policy heuristic learns both)
  learned = known.last_ms ~= nil or known.boot_n ~= nil or known.rel ~= nil,
  horizon_s = horizon_ms / 1000,
  lead_s = lead_ms / 1000,
  boot_learned = (known.boot_ms or 0) > 0,
  boots = m.boot_n,
  not_browsing_per_horizon = fresh_mean(m, m.x0),
  session_mean_s = 1 / release_rate(m),
  releases = m.rel,
  arrivals_per_min = long_run_arrivals(m, half_life_s) * 60,
  memory_min = half_life_s / math.log(2) / 60,
  cells = cells,
  learned_fields = learned_fields(),
})
