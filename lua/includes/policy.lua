-- The scaling policy: what the pool observes and how many spare nodes it wants.
-- scale_decide and reap_idle share it, so growing and shrinking never disagree on the target.
-- This is the seam where the predictor of a later issue plugs in: target_spare() only.

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

-- Spare nodes (ready + booting + creating - waiting) the pool wants to hold, and why.
-- Heuristic: every engaged user (>= N activities within the window, holding no node) converts
-- with probability `conversion`; keep their expected number ready, never below the floor.
local function target_spare(s, p)
  local predicted = math.ceil(s.engaged * p.conversion - 1e-9)
  if predicted > p.min_ready then
    return predicted, string.format('engaged=%d x conversion=%.2f', s.engaged, p.conversion)
  end
  return p.min_ready, string.format('floor min_ready=%d', p.min_ready)
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
