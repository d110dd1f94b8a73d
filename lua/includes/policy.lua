-- The scaling policy: what the pool observes and how many spare nodes it wants.
-- scale_decide and reap_idle share it, so growing and shrinking never disagree on the target.
-- The seam is target_spare(): 'forecast' (the default) or the first release's 'heuristic'.

-- ARGV layout shared by scale_decide and reap_idle (built by provisioner/config.py).
local function read_params()
  return {
    now = tonumber(ARGV[1]),
    replica = ARGV[2],
    interval_ms = tonumber(ARGV[3]),
    min_ready = tonumber(ARGV[4]),
    max_nodes = tonumber(ARGV[5]),
    window_ms = tonumber(ARGV[6]),
    conversion = tonumber(ARGV[7]),
    idle_timeout_ms = tonumber(ARGV[8]),
    boot_timeout_ms = tonumber(ARGV[9]),
    create_deadline_ms = tonumber(ARGV[10]),
    delete_deadline_ms = tonumber(ARGV[11]),
    max_batch = tonumber(ARGV[12]),
    log_len = tonumber(ARGV[13]),
    policy = ARGV[14],
    z = tonumber(ARGV[15]),
    half_life_ms = tonumber(ARGV[16]),
    boot_prior_ms = tonumber(ARGV[17]),
  }
end

-- Supply and demand as the pool sees them now. O(1) or O(log n) each.
local function observe(p)
  local s = {}
  s.ready = rcall('LLEN', K.ready)
  s.booting = rcall('ZCARD', K.booting)
  s.allocated = rcall('HLEN', K.alloc)
  s.waiting = rcall('LLEN', K.waiting)
  s.terminating = rcall('ZCARD', K.terminating)
  s.pending = rcall('ZCARD', K.pending)
  s.unclaimed = rcall('ZCARD', K.unclaimed)
  -- A node seen on node:status before its POST returned is already counted as booting/ready;
  -- one reservation is presumably its own, so it must not be counted twice.
  s.creating = math.max(0, s.pending - s.unclaimed)
  s.engaged = rcall('ZCOUNT', K.engaged, p.now - p.window_ms, '+inf')
  s.active = rcall('ZCOUNT', K.active, p.now - p.window_ms, '+inf')
  -- Nodes being terminated still exist at the Node API and count against max_nodes.
  s.total = s.ready + s.booting + s.allocated + s.terminating + s.creating
  s.spare = s.ready + s.booting + s.creating - s.waiting
  return s
end

-- The first release's heuristic: every engaged user (>= N activities within the window, holding
-- no node) converts with probability `conversion`; keep their expected number, never below the
-- floor.
local function heuristic_target(s, p)
  local predicted = math.ceil(s.engaged * p.conversion - 1e-9)
  if predicted > p.min_ready then
    return predicted, string.format('engaged=%d x conversion=%.2f', s.engaged, p.conversion)
  end
  return p.min_ready, string.format('floor min_ready=%d', p.min_ready)
end

-- Priors of the learned rates, as pseudo-observations: one connect per 20 minutes of exposure,
-- weighted like 10 minutes of data, so a new pool starts cautious and learns within minutes.
local PRIOR_EXPOSURE_S = 600
local PRIOR_CONNECTS = 0.5

-- The forecast: a base-stock policy over the boot lead time.
--
-- Demand: each browsing user at level i (>= LEVELS[i] activities in the window, no node) connects
-- within the horizon H (the learned mean boot time) with probability 1 - exp(-h_i H), where h_i
-- is the connect rate per user-second learned online at that level (connects credited by
-- allocate / user-seconds observed here, both decayed with a half-life). Users with no recent
-- activity connect at a pool-wide rate h_0. Supply returns: each allocated node is freed within
-- H with probability 1 - exp(-H / mean session). The target spare is the mean net demand plus z
-- standard deviations of it (Bernoulli and Poisson variances), never below min_ready.
-- With `update` (scale_decide, once per interval) the exposure is accrued and the rates decay.
local function forecast_target(s, p, update)
  local m = {}
  local fields = {'last_ms', 'x0', 'c0', 'x1', 'c1', 'x2', 'c2', 'x3', 'c3', 'x4', 'c4',
                  'x5', 'c5', 'cf', 'boot_ms', 'session_ms'}
  local values = rcall('HMGET', K.model, unpack(fields))
  for i, f in ipairs(fields) do m[f] = tonumber(values[i]) end
  -- Users at each level now: n_ge[i] have >= LEVELS[i] events in the window.
  local n_ge = {}
  for i, k in ipairs(LEVELS) do
    n_ge[i] = rcall('ZCOUNT', K.levels, k * LEVEL_BAND + p.now - p.window_ms,
                    k * LEVEL_BAND + LEVEL_BAND - 1)
  end
  local n = {}
  for i = 1, #LEVELS do n[i] = n_ge[i] - (n_ge[i + 1] or 0) end

  if update then
    local last = m.last_ms or p.now
    local dt = math.min(math.max(0, p.now - last), 60000) / 1000
    local decay = math.exp(-dt * 1000 * math.log(2) / p.half_life_ms)
    local writes = {'last_ms', p.now, 'window_ms', p.window_ms}
    for i = 0, #LEVELS do
      local exposure = (i == 0) and dt or n[i] * dt
      m['x' .. i] = (m['x' .. i] or 0) * decay + exposure
      m['c' .. i] = (m['c' .. i] or 0) * decay
      writes[#writes + 1] = 'x' .. i
      writes[#writes + 1] = m['x' .. i]
      writes[#writes + 1] = 'c' .. i
      writes[#writes + 1] = m['c' .. i]
    end
    m.cf = (m.cf or 0) * decay
    writes[#writes + 1] = 'cf'
    writes[#writes + 1] = m.cf
    rcall('HSET', K.model, unpack(writes))
  end

  local horizon = (m.boot_ms or p.boot_prior_ms) / 1000
  local mean, var = 0, 0
  local rates = {}
  for i = 0, #LEVELS do
    local rate = ((m['c' .. i] or 0) + PRIOR_CONNECTS) / ((m['x' .. i] or 0) + PRIOR_EXPOSURE_S)
    rates[#rates + 1] = string.format('%.2g', rate * 3600)
    if i == 0 then
      mean = mean + rate * horizon
      var = var + rate * horizon
    else
      local q = 1 - math.exp(-rate * horizon)
      mean = mean + n[i] * q
      var = var + n[i] * q * (1 - q)
    end
  end
  -- Users not yet seen who will arrive and connect within a boot time: a Poisson rate of its own.
  local fresh = (m.cf or 0) / ((m.x0 or 0) + PRIOR_EXPOSURE_S) * horizon
  mean = mean + fresh
  var = var + fresh
  local frees, frees_var = 0, 0
  if m.session_ms and m.session_ms > 0 and s.allocated > 0 then
    local q = 1 - math.exp(-horizon * 1000 / m.session_ms)
    frees = s.allocated * q
    frees_var = s.allocated * q * (1 - q)
  end
  local buffer = p.z * math.sqrt(var + frees_var)
  local target = math.max(0, math.ceil(mean - frees + buffer - 1e-9))
  local why = string.format(
    'forecast %.2f connects in %.0fs (%.2f unforeseen) - %.2f frees + buffer %.2f (z=%.1f);'
    .. ' browsing by level %s; rates/h %s', mean, horizon, fresh, frees, buffer, p.z,
    table.concat(n, '/'),
    table.concat(rates, '/'))
  if target < p.min_ready then
    return p.min_ready, why .. string.format('; floor min_ready=%d', p.min_ready)
  end
  return target, why
end

-- Spare nodes (ready + booting + creating - waiting) the pool wants to hold, and why.
local function target_spare(s, p, update)
  if p.policy == 'heuristic' then
    return heuristic_target(s, p)
  end
  return forecast_target(s, p, update)
end

local function summary(s, target)
  return cjson.encode({
    ready = s.ready, booting = s.booting, allocated = s.allocated, waiting = s.waiting,
    terminating = s.terminating, creating = s.creating, engaged = s.engaged,
    active = s.active, spare = s.spare, target = target, total = s.total,
  })
end

local function log_decision(p, kind, reason, numbers, acted)
  rcall('XADD', K.decisions, 'MAXLEN', '~', p.log_len, '*', 'now', p.now, 'replica',
        p.replica, 'kind', kind, 'reason', reason, 'numbers', numbers, 'acted', acted)
end
