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
    keep_window_ms = tonumber(ARGV[18]),
    surge_z = tonumber(ARGV[19]),
    new_session_frees = tonumber(ARGV[20]) or 1,
    overdue_boots = tonumber(ARGV[21]) or 0,
    uncredited_exposure = tonumber(ARGV[22]) or 0,
    estimation_error = tonumber(ARGV[23]) or 0,
    -- The most creates the calling replica may make now, when it holds them because the Node
    -- API is failing (its probe, or none); nil: max_batch.
    creates_held_to = tonumber(ARGV[24]),
    -- The pool's epoch as the calling replica last saw it (lua/heartbeat.lua); '' or nil: none
    -- seen yet, nothing to compare.
    epoch = ARGV[25],
  }
end

-- The nodes an operator drained in their session (drain_node.lua), each to end with it: the
-- forecast counts no free from them. Every script that ends a mark takes its node out of
-- `drains`, so they are its members, counted in O(1); DRAIN_CHECKS of them a tick, those
-- checked longest ago (the head), are checked: a member whose node is not in a session with
-- a mark (an edit by hand, or a replica of an earlier release ended or freed it) is not
-- counted and is listed in `stale` for scale_decide to drop; the others in `checked`, to be
-- moved to the tail. A `provisioner replace` marks every session of the pool, so walking them
-- all was O(sessions) of Redis every tick (26.8 ms a tick at 10^4 marks, a review measured).
local DRAIN_CHECKS = 16
local function drained_in_session(allocated)
  local stale, checked = {}, {}
  for _, node in ipairs(rcall('ZRANGE', K.drains, 0, DRAIN_CHECKS - 1)) do
    local record = rcall('HMGET', node_key(node), 'state', 'drain_by')
    if record[1] == 'allocated' and record[2] then
      checked[#checked + 1] = node
    else
      stale[#stale + 1] = node
    end
  end
  return math.min(rcall('ZCARD', K.drains) - #stale, allocated), stale, checked
end

-- Supply and demand as the pool sees them now. O(1) or O(log n) each.
local function observe(p)
  local s = {}
  s.ready = rcall('LLEN', K.ready)
  s.booting = rcall('ZCARD', K.booting)
  s.allocated = rcall('HLEN', K.alloc)
  s.drained, s.stale_drains, s.checked_drains = drained_in_session(s.allocated)
  s.waiting = rcall('ZCARD', K.waiting)
  s.terminating = rcall('ZCARD', K.terminating)
  s.pending = rcall('ZCARD', K.pending)
  s.unclaimed = rcall('ZCARD', K.unclaimed)
  -- A node seen on node:status before its POST returned is already counted as booting/ready;
  -- one reservation is presumably its own, so it must not be counted twice.
  s.creating = math.max(0, s.pending - s.unclaimed)
  s.engaged = rcall('ZCOUNT', K.engaged, p.now - p.window_ms, '+inf')
  s.active = rcall('ZCOUNT', K.active, p.now - p.window_ms, '+inf')
  -- Nodes being terminated still exist at the Node API and count against max_nodes. So does
  -- every create in flight: an unclaimed node is only presumably one of theirs (one adopted
  -- while they run may be an older create's that timed out), and the quota must hold either
  -- way; a node counted twice only defers a create until its POST answers (or its deadline,
  -- if the POST timed out).
  s.total = s.ready + s.booting + s.allocated + s.terminating + s.pending
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

-- Priors, as pseudo-observations, so that a new pool starts cautious and learns within minutes:
-- a browsing user connects within the horizon with chance 2%, weighted like 5 user-minutes in
-- the cell; users not browsing yet bring 0.05 connects per horizon, weighted like 10 minutes;
-- a session lasts 15 minutes, weighted like one session.
local PRIOR_Q = 0.02
local PRIOR_EXPOSURE_S = 300
local PRIOR_FRESH = 0.05
local PRIOR_WALL_S = 600
local PRIOR_SESSION_S = 900
-- Panic: the connects of users not browsing yet scale with the arrival rate of the last minute
-- over the long-run one, up to this factor. Here the long-run rate is the decayed arrival count
-- over the weight of a full memory (half-life / ln 2 seconds), not over the time observed: a new
-- pool reads its first hour's arrivals as a crowd (25x at first, 2x after 30 minutes, gone after
-- about two hours) and holds more stock while it has learned little. That caution is deliberate.
local PANIC_MAX = 25
-- A surge: arrivals at SURGE_PANIC times the rate observed so far ('arr' over the decayed time
-- observed, 'x0', of at least a minute) or more, and more than chance gives (SURGE_SIGNIFICANCE
-- Poisson deviations above that rate's count for a minute). While it lasts the buffer is
-- surge_buffer_sd deviations, not buffer_sd: a crowd's connects come faster than the chances
-- learned in calmer times say, and the nodes must be booting before they do. The last minute's
-- count is tested on every tick, so the test must be strict: at two deviations a steady 2
-- arrivals a minute passes on 5% of ticks, at three on 0.5% (docs/history.md, "What was tried").
local SURGE_PANIC = 2
local SURGE_SIGNIFICANCE = 3

-- The model's fields: per cell (i, j) the seconds browsing users spent in it ('x') and the
-- seconds of it that came within a horizon before a connect ('r', credited by allocate); the same
-- for users not browsing ('x0' in wall seconds, 'r0'); releases and allocated node-seconds
-- ('rel', 'bx'); arrivals ('arr'). All decay with the half-life. And the forecast over H averaged
-- over the last lead time ('beyond_mean', below); the mean boot time and the sample boots it
-- learned from ('boot_ms', 'boot_n', written by apply_node_status).
local function model_fields()
  local fields = {'last_ms', 'boot_ms', 'boot_n', 'x0', 'r0', 'rel', 'bx', 'arr', 'beyond_mean'}
  for i = 1, #LEVELS do
    for j = 1, #AGES + 1 do
      fields[#fields + 1] = 'x' .. i .. '_' .. j
      fields[#fields + 1] = 'r' .. i .. '_' .. j
    end
  end
  return fields
end

-- The fields a pool learns, as an export writes them and an import accepts them: all but the
-- decay's clock, 'last_ms', which belongs to the running pool.
local function learned_fields()
  local learned = {}
  for _, f in ipairs(model_fields()) do
    if f ~= 'last_ms' then
      learned[#learned + 1] = f
    end
  end
  return learned
end

-- The model's fields as learned values: m (0 where nothing is learned) and known (nil there). A
-- field that is missing, or not a value a script wrote, is nothing learned yet, so one bad field
-- cannot flood or empty the target.
local function read_model()
  local fields = model_fields()
  local values = rcall('HMGET', K.model, unpack(fields))
  local m, known = {}, {}
  for i, f in ipairs(fields) do
    known[f] = learned(values[i])
    m[f] = known[f] or 0
  end
  return m, known
end

-- What the model says, as the forecast reads it (forecast_target) and `provisioner model show`
-- prints it (model_view.lua). m: the model's fields, 0 when nothing is learned.
-- The chance that a user in cell c connects within H, learned from the cell's credit over its
-- exposure x (seconds), the prior's included.
local function cell_chance(m, c, x)
  return math.min(1, (m['r' .. c] + PRIOR_Q * PRIOR_EXPOSURE_S) / (x + PRIOR_EXPOSURE_S))
end

-- The connects within H of users not browsing yet (a Poisson mean), from their credit over
-- the wall time x0 (seconds), the prior's included; and that credit (its weight).
local function fresh_mean(m, x0)
  local credit = m.r0 + PRIOR_FRESH * PRIOR_WALL_S
  return credit / (x0 + PRIOR_WALL_S), credit
end

-- The long-run arrival rate per second: the decayed arrival count over the weight of a full
-- memory (half-life / ln 2 seconds), the panic's baseline (low while the pool is younger).
local function long_run_arrivals(m, half_life_s)
  return m.arr * math.log(2) / half_life_s
end

-- Releases per allocated node-second: one prior session of PRIOR_SESSION_S.
local function release_rate(m)
  return (m.rel + 1) / (m.bx + PRIOR_SESSION_S)
end

-- Browsing users per cell now: n[i][j] at level index i and age bucket j. O(log n) per count.
local function cell_counts(p)
  local ge = {}  -- ge[i][j]: at level >= LEVELS[i] and younger than AGES[j] (any age: #AGES+1)
  for i, k in ipairs(LEVELS) do
    ge[i] = {}
    for j = 1, #AGES do
      local band = young_band(i, j)
      ge[i][j] = rcall('ZCOUNT', K.levels, '(' .. score(band + p.now), score(band + LEVEL_BAND - 1))
    end
    local band = k * LEVEL_BAND
    ge[i][#AGES + 1] = rcall('ZCOUNT', K.levels, '(' .. score(band + p.now - p.window_ms),
                             score(band + LEVEL_BAND - 1))
  end
  local n = {}
  local function at(i, j)
    if i > #LEVELS or j < 1 then return 0 end
    return ge[i][j]
  end
  for i = 1, #LEVELS do
    n[i] = {}
    for j = 1, #AGES + 1 do
      n[i][j] = math.max(0, (at(i, j) - at(i, j - 1)) - (at(i + 1, j) - at(i + 1, j - 1)))
    end
  end
  return n, ge[1][1]
end

-- P(D > x) for a Poisson count D of mean m: what a Poisson count would give the checks' tail.
-- The pmf is summed in log space, so a large m does not underflow. O(x), once per horizon.
-- A line past POISSON_SUM_MAX (a mean of some 10^5 connects) takes the normal's tail, with a
-- continuity correction: the sum stopped there, and its tail came out 1 whatever the line.
local POISSON_SUM_MAX = 100000
local function poisson_above(m, x)
  local top = math.floor(x)
  if top < 0 then return 1 end
  if m <= 0 then return 0 end
  if top > POISSON_SUM_MAX then
    local z = (top + 0.5 - m) / math.sqrt(m)
    local t = 1 / (1 + 0.2316419 * math.abs(z))  -- Abramowitz and Stegun 26.2.17
    local q = math.exp(-z * z / 2) / math.sqrt(2 * math.pi) * t * (0.319381530 + t * (
      -0.356563782 + t * (1.781477937 + t * (-1.821255978 + t * 1.330274429))))
    return z >= 0 and q or 1 - q
  end
  local log_m, log_p, cdf = math.log(m), -m, 0
  for k = 0, top do
    if k > 0 then log_p = log_p + log_m - math.log(k) end
    cdf = cdf + math.exp(log_p)
  end
  return math.max(0, 1 - cdf)
end

-- The forecast checks itself, so an operator (and the benchmark) can see whether its spread is
-- the one the buffer assumes. Back to back, one lead time L at a time: the connects forecast
-- within L at a check's start (mean, var: within H and beyond it, what the buffer is sized on)
-- are compared with the connects allocate counted by its end. (A check's period is called a
-- horizon in its figures; it is H itself unless boots take longer than the window.)
-- Totals go to the stats hash: checks, connects forecast and seen, the squared errors and the
-- variances (their ratio is 1 if the model's spread is right; a ratio of sums, so that one
-- horizon of a tiny variance, such as a new pool's prior, does not swamp it), the checks whose
-- connects came above the forecast plus buffer_sd deviations, and how many of those a Poisson
-- count of the forecast's mean would give (the normal's 1.2% at 2.25 deviations is far from
-- the tail of counts of 2 or 3). A check closed more than a period late (the ticks stopped)
-- or across a reset of the counters is dropped, not scored.
-- One scored check's tail, shared by both checks: whether the connects that came passed the
-- forecast plus z deviations (counted in above_field), and the chance a Poisson count of the
-- forecast's mean had of passing that line (summed in poisson_field).
local function score_tail(came, m0, v, z, above_field, poisson_field)
  local line = m0 + z * math.sqrt(v)
  if came > line then
    stat(above_field)
  end
  add_to(K.stats, poisson_field, string.format('%.6f', poisson_above(m0, line)), true)
end

-- `seen` is the connects allocate has counted so far (stats 'connects'), less the resumed.
local function check_forecast(p, mean, var, horizon_ms, seen)
  local open = rcall('HMGET', K.model, 'check_until_ms', 'check_connects', 'check_mean',
                     'check_var')
  local due = tonumber(open[1])
  if due and p.now < due then
    return
  end
  local before, m0, v0 = tonumber(open[2]), tonumber(open[3]), tonumber(open[4])
  if due and before and m0 and v0 and p.now < due + horizon_ms and seen >= before then
    local came = seen - before
    local v = math.max(v0, 1e-9)
    stat('forecast_checks')
    add_to(K.stats, 'forecast_expected', string.format('%.6f', m0), true)
    stat('forecast_seen', came)
    add_to(K.stats, 'forecast_sq_error', string.format('%.6f', (came - m0) ^ 2), true)
    add_to(K.stats, 'forecast_variance', string.format('%.6f', v), true)
    score_tail(came, m0, v, p.z, 'forecast_above_buffer', 'forecast_above_poisson')
    rcall('HSET', K.stats, 'forecast_check_sd', p.z)
  end
  rcall('HSET', K.model, 'check_until_ms', p.now + horizon_ms, 'check_connects', seen,
        'check_mean', mean, 'check_var', var)
end

-- The same check from every tick, not back to back: each tick's forecast over the lead time is
-- queued ('sliding'), and once the lead time has passed it is compared with the connects that
-- came in it. The windows overlap, so the checks are not independent; what they give is the
-- share of ticks whose next lead time brought more connects than the forecast plus buffer_sd
-- deviations, the per-instant stock-out chance the buffer aims at (frees left out), against
-- what a Poisson count of each forecast's mean would give. It also sums the connects that came,
-- their squares and the squared errors, for the forecast's skill: 1 - its squared error over a
-- constant forecast's at the connects' mean (0: it tells no more than the long-run mean; only
-- a forecast that follows the traffic's changes scores well above it). Each tick's frees
-- forecast (all the target counts on: the allocated nodes' sessions ending within L, and the
-- sessions forecast to begin and end within it) is queued too, with the releases
-- counted so far, and summed against the releases that came. Amortised O(1) per tick
-- (and the Poisson tail, O(mean)); at most SLIDING_MAX entries wait, and one matured more than
-- a lead time late (the ticks stopped) is dropped, not scored.
local SLIDING_MAX = 1000

local function check_sliding(p, mean, var, lead_ms, seen, frees, released)
  while true do
    local head = rcall('LINDEX', K.sliding, 0)
    if not head then break end
    local ms, before, m0, v0, rest = string.match(head,
      '^(%d+):(%d+):([%d.e+-]+):([%d.e+-]+)(.*)$')
    ms, before, m0, v0 = tonumber(ms), tonumber(before), tonumber(m0), tonumber(v0)
    if ms and ms + lead_ms > p.now then break end
    rcall('LPOP', K.sliding)
    if ms and before and m0 and v0 and p.now < ms + 2 * lead_ms and seen >= before then
      local came = seen - before
      stat('sliding_checks')
      score_tail(came, m0, math.max(v0, 1e-9), p.z, 'sliding_above', 'sliding_above_poisson')
      -- The sums, over the ticks counted in 'sliding_summed': for the forecast's skill (its
      -- squared error against a constant's at the mean) and for the frees (those forecast
      -- against the releases that came). An entry an earlier release of the scripts queued has
      -- no frees and is left out of them all, so the sums always share their count.
      local r0, f0 = string.match(rest or '', '^:(%d+):([%d.e+-]+)$')
      r0, f0 = tonumber(r0), tonumber(f0)
      if r0 and f0 and released >= r0 then
        stat('sliding_summed')
        stat('sliding_came', came)
        stat('sliding_came_sq', came * came)
        add_to(K.stats, 'sliding_sq_error', string.format('%.6f', (came - m0) ^ 2), true)
        stat('sliding_frees_came', released - r0)
        add_to(K.stats, 'sliding_frees_forecast', string.format('%.6f', f0), true)
      end
    end
  end
  -- A lead time of more ticks than SLIDING_MAX: every tick queued, the oldest were trimmed
  -- before their lead time passed, and none was ever scored. So the lead time is cut into
  -- SLIDING_MAX - 1 slots, and a tick in the slot of the newest entry takes its place: at most
  -- SLIDING_MAX entries span a lead time, and with ticks further apart than a slot (a minute's
  -- boots at 1 s ticks) every tick is queued, as before.
  local entry = string.format('%.0f:%d:%.6f:%.6f:%d:%.6f', p.now, seen, mean, var, released,
                              frees)
  local slot_ms = lead_ms / (SLIDING_MAX - 1)
  local tail = tonumber(string.match(rcall('LINDEX', K.sliding, -1) or '', '^(%d+):'))
  if tail and math.floor(tail / slot_ms) == math.floor(p.now / slot_ms) then
    rcall('LSET', K.sliding, -1, entry)
    return
  end
  rcall('RPUSH', K.sliding, entry)
  rcall('LTRIM', K.sliding, -SLIDING_MAX, -1)
end

-- The boot lead time L, in ms: the mean boot time learned from the finished sample boots
-- (apply_node_status), with the sample boots still running that have outlasted it counted as if
-- they ended now, as far as `overdue_boots` says (0, the default: not at all). A boot still
-- running says nothing to the mean until it ends, and the short ones end first, so a mean of
-- the finished ones alone reads short while the long ones run (in a new pool above all, whose
-- first boots all start together). Each overdue boot is one more boot next to the ones the
-- mean is worth: as many as it has learned from, at most BOOT_WORTH, the effective count of a
-- weighted mean at 0.2 ((2 - 0.2) / 0.2 = 9). Before any sample boot has ended, L is the
-- prior, or (at 1) the age of the oldest sample boot if longer. It only ever lengthens L, and only
-- while a sample boot runs longer than the mean. O(log n + OVERDUE_LOOK). boot_ms and boot_n
-- are the model's (0 when nothing is learned). Returns L, and why it is not the mean (for the
-- decision's reason) or nil.
local BOOT_WORTH = 9
local OVERDUE_LOOK = 64

-- How long a boot runs before reap_idle ends it as stuck: boot_timeout, and STUCK_BOOT_MEANS
-- times the mean boot learned (boot_ms, 0 when none), never past a day (see reap_idle.lua).
local STUCK_BOOT_MEANS = 3
local LONGEST_BOOT_MS = 86400000
local function stuck_after_ms(p, boot_ms)
  return math.max(p.boot_timeout_ms, math.min(LONGEST_BOOT_MS, STUCK_BOOT_MEANS * boot_ms))
end

-- The stuck line as reap_idle ends boots by it: stuck_after_ms, or the line boots stuck while
-- none ended raised ('stuck_line_ms', reap_idle.lua) where that stands, above it and a day at
-- most. Returns the line; the raised line if it stands, else nil; and the value the model
-- holds (nil if none, or not a number a script wrote), which the reaper drops when it does not
-- stand. Read-only: lead_time reads it in scripts that write nothing.
local function stuck_line(p, boot_ms)
  local line = stuck_after_ms(p, boot_ms)
  local held = learned(rcall('HGET', K.model, 'stuck_line_ms'))
  if held and held > line and held <= LONGEST_BOOT_MS then
    return held, held, held
  end
  return line, nil, held
end

local function lead_time(p, boot_ms, boot_n)
  local share = p.overdue_boots
  if share <= 0 then
    return boot_ms > 0 and boot_ms or p.boot_prior_ms, nil
  end
  -- A boot past the stuck line is one the reaper ends (--max-batch of them a tick), not a boot
  -- still to come: after a pause of the ticks its age is unbounded.
  -- The line as reap_idle reads it: raised while no boot ends, the boots short of it run on.
  local live = '(' .. score(p.now - stuck_line(p, boot_ms))
  if boot_ms <= 0 then
    local oldest = rcall('ZRANGEBYSCORE', K.booting, live, '+inf', 'WITHSCORES',
                         'LIMIT', 0, OVERDUE_LOOK)
    for i = 1, #oldest, 2 do
      if is_boot_sample(oldest[i]) then
        local age = p.now - tonumber(oldest[i + 1])
        if age > p.boot_prior_ms then
          return p.boot_prior_ms + share * (age - p.boot_prior_ms),
              string.format('no sample boot ended yet, the oldest running %.0fs', age / 1000)
        end
        break
      end
    end
    return p.boot_prior_ms, nil
  end
  local overdue = rcall('ZRANGEBYSCORE', K.booting, live, p.now - boot_ms, 'WITHSCORES',
                        'LIMIT', 0, OVERDUE_LOOK)
  local excess, k = 0, 0
  for i = 1, #overdue, 2 do
    -- Running longer than the mean, not as long: one that has run exactly the mean is not
    -- overdue (the range above includes it).
    local over = p.now - tonumber(overdue[i + 1]) - boot_ms
    if over > 0 and is_boot_sample(overdue[i]) then
      k = k + 1
      excess = excess + over
    end
  end
  if k == 0 then
    return boot_ms, nil
  end
  local worth = math.max(1, math.min(boot_n, BOOT_WORTH))
  return boot_ms + share * excess / (worth + k),
      string.format('the mean boot %.0fs, %d sample boot%s running longer', boot_ms / 1000, k,
                    k == 1 and '' or 's')
end

-- The forecast: a base-stock policy over the boot lead time L (the learned mean boot time,
-- lead_time above).
-- Chances are learned over H = min(L, one window), because a user's activity is kept for two
-- windows and the credit looks back H from a connect; when boots take longer than a window,
-- demand over L is the demand within H plus, for the rest of L, the rate of the last lead time
-- (below: 'beyond').
--
-- Demand within H: each browsing user connects with the chance learned for their cell (level x
-- age), a Bernoulli; users not browsing yet add a Poisson mean learned the same way, scaled up
-- while arrivals run above their long-run rate (panic). Supply returns: each allocated node is
-- freed within L with the chance given by the learned release rate. Target spare =
-- mean demand - expected frees + z standard deviations of the difference, never below min_ready.
-- With `update` (scale_decide, once per interval) the exposures accrue, everything decays, and
-- the horizon and window are written for allocate's credit.
local function forecast_target(s, p, update)
  local m, known = read_model()
  local n, young = cell_counts(p)
  local lead_ms, lead_why = lead_time(p, m.boot_ms, m.boot_n)
  -- At least a millisecond: a boot time learned or imported far below (1e-322 ms is a
  -- non-negative finite number) is 0 s once in seconds, and L / H, dt / L were 0 / 0.
  lead_ms = math.max(lead_ms, 1)
  local horizon_ms = math.min(lead_ms, p.window_ms)
  local H = horizon_ms / 1000
  local L = lead_ms / 1000
  local half_life_s = p.half_life_ms / 1000

  local dt = 0
  local writes = {}  -- the model's new values, written in one HSET once the forecast is made
  if update then
    local last = m.last_ms > 0 and m.last_ms or p.now
    dt = math.min(math.max(0, p.now - last), 60000) / 1000
    local decay = math.exp(-dt * math.log(2) / half_life_s)
    writes = {'last_ms', p.now, 'window_ms', p.window_ms, 'horizon_ms', horizon_ms}
    local function put(field, value)
      m[field] = value
      writes[#writes + 1] = field
      writes[#writes + 1] = value
    end
    for i = 1, #LEVELS do
      for j = 1, #AGES + 1 do
        local c = i .. '_' .. j
        put('x' .. c, m['x' .. c] * decay + n[i][j] * dt)
        put('r' .. c, m['r' .. c] * decay)
      end
    end
    put('x0', m.x0 * decay + dt)
    put('r0', m.r0 * decay)
    put('bx', m.bx * decay + s.allocated * dt)
    put('rel', m.rel * decay)
    put('arr', m.arr * decay)
  end

  -- The browsing of the last horizon is exposure whose connects may still come: a user seen in
  -- a cell s seconds ago is credited only if they connect within H of it, and only the first s
  -- of that H has passed. With a constant hazard half of it is uncredited on average, so the
  -- chances discount `uncredited_exposure` times half of it (0, the default: none, as
  -- released). That exposure is taken as what the cell's users now spend in it in H, never more
  -- than all the cell has. It matters while a cell's exposure is young: a new pool's first
  -- minutes, or an age band its users have only just reached; in a long run it is H over twice
  -- the memory (1.3% with 70 s boots).
  local pending = p.uncredited_exposure / 2
  local function credited(exposure, recent)  -- exposure less the uncredited part of `recent`
    return exposure - pending * math.min(exposure, recent)
  end
  -- The chances are estimates, and a cell's users all share its estimate's error, so the
  -- connects within H vary by more than their Bernoulli and Poisson terms: by count^2 times the
  -- chance's own variance, q (1 - q) / (N + 1) for a chance learned from N user-horizons
  -- (exposure over H, the prior's included), and for the users not browsing yet by their mean
  -- squared over the connects it was learned from. That mean is taken before the panic, which
  -- is itself a new pool's caution: squared in this term too, it cost 0.034 more of cost ratio
  -- on a short-sessions replay. `estimation_error` weighs the term in the buffer (0, the
  -- default: left out, as released). It is largest where little is learned: a new pool's first
  -- minutes, a cell few users reach. N counts exposure as if unweighted: in a long run the
  -- half-life's weights make the effective count twice that, so there the term is twice what it
  -- should be, about 2% of the cell's Bernoulli variance (with 60 s boots) instead of 1%.
  local mean, var, browsing, estimated = 0, 0, {}, 0
  for i = 1, #LEVELS do
    browsing[i] = 0
    for j = 1, #AGES + 1 do
      local c = i .. '_' .. j
      local count = n[i][j]
      if count > 0 then
        local x = credited(m['x' .. c], count * H)
        local q = cell_chance(m, c, x)
        mean = mean + count * q
        var = var + count * q * (1 - q)
        estimated = estimated + count * count * q * (1 - q) / ((x + PRIOR_EXPOSURE_S) / H + 1)
        browsing[i] = browsing[i] + count
      end
    end
  end
  local fresh, fresh_credit = fresh_mean(m, credited(m.x0, H))
  local minute_s = AGES[1] / 1000  -- 'young' counts the users first seen within it
  local arrivals = young / minute_s
  local usual = long_run_arrivals(m, half_life_s)
  local panic = 1
  if usual > 0 and arrivals > usual then
    panic = math.min(arrivals / usual, PANIC_MAX)
  end
  estimated = estimated + fresh * fresh * H / fresh_credit
  fresh = fresh * panic
  -- The surge, in arrivals per minute_s: the rate observed so far expects `expected` of them.
  local expected = m.arr / math.max(m.x0, minute_s) * minute_s
  s.surge = expected > 0 and young >= SURGE_PANIC * expected
    and young >= expected + SURGE_SIGNIFICANCE * math.sqrt(expected) and p.surge_z > p.z
  -- Beyond H, up to L, the connects come at a rate: the forecast's own over H, averaged over
  -- the last lead time (an exponential average with time constant L, in the model's
  -- 'beyond_mean'), and never below what users not browsing yet bring now, so that a crowd's
  -- panic is not lagged. Scaling the whole forecast by L / H instead amplified every browsing
  -- user's step by as much: with 3-minute boots a user moving to a cell of higher chance raised
  -- the target half as much again, and the keep level held each such peak for its window.
  local within = mean + fresh
  local average = known.beyond_mean or within  -- none yet, or a bad one: start afresh
  if update then
    average = average + (within - average) * (1 - math.exp(-dt / L))
    writes[#writes + 1] = 'beyond_mean'
    writes[#writes + 1] = average
    rcall('HSET', K.model, unpack(writes))
  end
  local stretch = L / H
  local beyond = (stretch - 1) * math.max(average, fresh)
  mean = within + beyond
  -- The error of the chances runs on beyond H: the rate there is the forecast's own.
  local estimation = p.estimation_error * estimated * stretch * stretch
  var = var + fresh + beyond + estimation
  local rate = release_rate(m)
  local q = 1 - math.exp(-rate * L)
  -- A node drained in its session ends with it (drain_node.lua): no free. (s.drained is never
  -- above the sessions: drained_in_session.)
  local freeing = s.allocated - s.drained
  local frees = freeing * q
  local frees_var = freeing * q * (1 - q)
  -- The frees of sessions that begin within L (new_session_frees, 1 by default): a connect at
  -- a uniform time within L has its session end within L with chance phi = 1 - q / (rL), so
  -- that share of the connects forecast comes back within L. Only the mean counts them; the
  -- buffer stays on the gross connects, since a node freed late in L serves no connect before.
  local again = 0
  if p.new_session_frees > 0 then
    local phi = math.max(0, 1 - q / (rate * L))  -- rate > 0: it has a prior
    again = mean * phi * p.new_session_frees
  end
  if update then
    -- A resumed session (allocate.lua) is neither a connect the forecast owes nor a free: its
    -- connect and the release it took back are both left out. (A release counted before a
    -- tick and taken back after it makes the count of that tick's lead time one short: with no
    -- other release in it the count goes back and the tick is left out of the frees' sums, as
    -- a count set back by hand is; with another, the tick is summed one free short.)
    local counted = rcall('HMGET', K.stats, 'connects', 'releases', 'drained_session_ends',
                          'resumed', 'releases_taken_back')
    local seen = (tonumber(counted[1]) or 0) - (tonumber(counted[4]) or 0)
    check_forecast(p, mean, var, lead_ms, seen)
    -- The frees checked are all the target counts on: the running sessions' and the new ones'
    -- (a drained node's session's end freed none).
    check_sliding(p, mean, var, lead_ms, seen, frees + again,
                  (tonumber(counted[2]) or 0) - (tonumber(counted[3]) or 0)
                  - (tonumber(counted[5]) or 0))
  end
  local z = s.surge and p.surge_z or p.z
  local buffer = z * math.sqrt(var + frees_var)
  local target = math.max(0, math.ceil(mean - again - frees + buffer - 1e-9))
  local why = string.format(
    'forecast %.2f connects in %.0fs (%.2f not browsing yet, panic x%.1f) - %.2f frees'
    .. ' + buffer %.2f (z=%.2f%s); browsing by level %s', mean, L, fresh, panic,
    frees, buffer, z, s.surge and ', surge' or '', table.concat(browsing, '/'))
  if lead_why then
    why = why .. string.format('; lead time %.0fs: %s', L, lead_why)
  end
  if estimation > 0 then
    why = why .. string.format('; variance %.2f of it the chances\' own error', estimation)
  end
  if again > 0 then
    why = why .. string.format('; %.2f of the connects freed again within %.0fs', again, L)
  end
  if s.drained > 0 then
    why = why .. string.format('; %d node(s) drained in a session, no frees counted from them',
                               s.drained)
  end
  if stretch > 1 then
    why = why .. string.format('; learned over %.0fs, %.2f of them in the %.0fs beyond at the'
                               .. ' rate of the last boot time', H, beyond, L - H)
  end
  -- The same terms as numbers, for the decision's `numbers` and the replicas' gauges (a
  -- dashboard's "why were three nodes booted at 10:02", without parsing the reason).
  -- To 4 places; a term not finite is left out (cjson refuses it, and the decision with it).
  local function r4(x)
    if x ~= x or x == math.huge or x == -math.huge then return nil end
    local y = math.floor(x * 10000 + 0.5) / 10000
    return (y == y and y ~= math.huge and y ~= -math.huge) and y or x
  end
  local terms = {
    connects = r4(mean), not_browsing_yet = r4(fresh), panic = r4(panic), frees = r4(frees),
    frees_of_new_sessions = r4(again), buffer = r4(buffer), z = r4(z), lead_time_s = r4(L),
  }
  if target < p.min_ready then
    return p.min_ready, why .. string.format('; floor min_ready=%d', p.min_ready), terms
  end
  return target, why, terms
end

-- Spare nodes (ready + booting + creating - waiting) the pool wants to hold, and why.
local function target_spare(s, p, update)
  if p.policy == 'heuristic' then
    return heuristic_target(s, p)
  end
  return forecast_target(s, p, update)
end

-- The spare a `provisioner replace` holds above the keep level (hold_spare.lua), 0 when none:
-- the key ends with its lease, by the server's clock.
local function replace_extra()
  return read_hold(rcall('GET', K.replacing)) or 0
end

-- Scale-down hysteresis. The reaper keeps the highest target of the last keep_window, not just
-- the current one: the forecast moves with every connect and release, and a node reaped on a dip
-- would have to be booted again a boot time later. scale_decide records each target in the
-- `targets` list as 'ms:target', a sliding-window maximum: entries strictly decrease from head
-- to tail, so the head is the peak and the list holds at most one entry per distinct value.
-- Amortised O(1) per tick.
local function target_entry(entry)
  local ms, target = string.match(entry or '', '^(%d+):(%d+)$')
  return tonumber(ms), tonumber(target)
end

local function remember_target(now, target, keep_window_ms)
  -- Entries not above the new target can never be the peak again; nor can unreadable ones.
  while true do
    local tail = rcall('LINDEX', K.targets, -1)
    if not tail then break end
    local _, last = target_entry(tail)
    if last and last > target then break end
    rcall('RPOP', K.targets)
  end
  rcall('RPUSH', K.targets, score(now) .. ':' .. score(target))
  -- Expired or unreadable heads go; the entry just pushed is inside the window and stops this
  -- (and should it be unreadable after all, the list's end does).
  while true do
    local head = rcall('LINDEX', K.targets, 0)
    if not head then break end
    local ms = target_entry(head)
    if ms and ms >= now - keep_window_ms then break end
    rcall('LPOP', K.targets)
  end
end

-- The highest target recorded within keep_window of now (0 when none): the first entry inside
-- it, read from the head PEAK_LOOK at a time. The list holds an entry for every fall of the
-- target in the window (thousands, for a large pool's long decline), and read whole at every
-- tick it cost scale_decide and reap_idle all of them; the entries before the first inside are
-- only those expired since remember_target last dropped them.
local PEAK_LOOK = 16
local function peak_target(now, keep_window_ms)
  local from = 0
  while true do
    local entries = rcall('LRANGE', K.targets, from, from + PEAK_LOOK - 1)
    for _, entry in ipairs(entries) do
      local ms, target = target_entry(entry)
      if ms and ms >= now - keep_window_ms then
        return target
      end
    end
    if #entries < PEAK_LOOK then
      return 0
    end
    from = from + PEAK_LOOK
  end
end

-- A decision's numbers; `keep` (scale_decide's): the reaper's keep level, the peak target of
-- the keep window, which `provisioner replace` holds its ready nodes to.
-- `held`: the spare a replace held above the keep level in the decision (its target and keep
-- level include it), which the run reads to know its hold was applied; `base`, the target
-- the policy set before it, from which the next decision counts the target's moves.
local function summary(s, target, keep, held, base, forecast)
  return cjson.encode({
    ready = s.ready, booting = s.booting, allocated = s.allocated, waiting = s.waiting,
    terminating = s.terminating, creating = s.creating, engaged = s.engaged,
    active = s.active, spare = s.spare, target = target, total = s.total,
    surge = s.surge == true, keep = keep, held = held, base = base, forecast = forecast,
  })
end

local function log_decision(p, kind, reason, numbers, acted)
  log_entry(p.log_len, p.now, p.replica, kind, reason, numbers, acted)
end
