-- The pool key vector, in the order of provisioner/keys.py POOL_KEY_ORDER.
-- Every script receives it as KEYS[1..31]; per-user and per-node keys are built from the prefixes.
local K = {
  ready = KEYS[1],          -- list: ready node ids, head = idle the longest (served first)
  waiting = KEYS[2],        -- zset: waiting user ids by place in line, lowest = served first
  waiting_since = KEYS[3],  -- hash: user -> ms when the user started waiting
  alloc = KEYS[4],          -- hash: user -> node (the allocation map)
  nodes = KEYS[5],          -- zset: live node ids by creation ms
  booting = KEYS[6],        -- zset: booting node ids by boot start ms
  terminating = KEYS[7],    -- zset: terminating node ids by retry deadline ms
  pending = KEYS[8],        -- zset: create reservations by deadline ms
  unclaimed = KEYS[9],      -- zset: nodes seen on node:status before their POST returned
  active = KEYS[10],        -- zset: user -> last activity ms
  engaged = KEYS[11],       -- zset: user -> ms of the user's Nth most recent activity
  stats = KEYS[12],         -- hash: counters
  tick_lock = KEYS[13],     -- string: start (ms) of the last interval slot decided in
  decisions = KEYS[14],     -- stream: scaling decisions with reasons
  seq = KEYS[15],           -- string: reservation id counter
  levels = KEYS[16],        -- zset: browsing levels and level x age cells (score bands, below)
  model = KEYS[17],         -- hash: learned connect chances per cell, boot time, release rate
  targets = KEYS[18],       -- list: recent targets 'ms:target', strictly decreasing head to tail
  sliding = KEYS[19],       -- list: each tick's 'ms:connects:mean:var:releases:frees'
  node_prefix = KEYS[20],   -- prefix of per-node hashes
  acts_prefix = KEYS[21],   -- prefix of per-user activity windows (zset of event ms)
  seen_prefix = KEYS[22],   -- prefix of per-user first-seen ms (string, expires with the window)
  replicas = KEYS[23],      -- zset: replica id -> server ms (TIME) of its last heartbeat
  replica_info = KEYS[24],  -- hash: replica id -> what its last heartbeat said (JSON)
  sessions = KEYS[25],      -- zset: user -> ms the user was handed their node (mirrors alloc)
  epoch = KEYS[26],         -- string: set once when the pool's state begins (heartbeat.lua)
  applied = KEYS[27],       -- hash: replica id -> 'batch:seq' of its last connect or disconnect
  drains = KEYS[28],        -- zset: node -> ms an operator drained it in its session (ends with it)
  replacing = KEYS[29],     -- string: 'extra:until_ms:run', spare a replace holds (a lease, PX)
  ended = KEYS[30],         -- zset: user -> ms their session (-ms: wait) ended (pool.lua)
  beats = KEYS[31],         -- zset: 'replica@ms' -> server ms of each heartbeat (heartbeat.lua)
}
local rcall = redis.call

-- The server's clock (TIME), in ms: what heartbeats are stamped with and tries' deadlines are
-- judged by, the one clock every replica shares.
local function server_ms()
  local time = rcall('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

-- The type each pool key holds, in the vector's order (the prefixes hold none). A key edited by
-- hand into another type fails every command on it, and Redis undoes nothing a script wrote
-- before the command that failed: a disconnect refused on the stats hash had already taken the
-- user's allocation and left the node allocated to nobody, for good. So every script that
-- writes checks them all before its first write (refuse_wrong_types) and is refused whole.
local KEY_TYPES = {
  {'ready', 'list'}, {'waiting', 'zset'}, {'waiting_since', 'hash'}, {'alloc', 'hash'},
  {'nodes', 'zset'}, {'booting', 'zset'}, {'terminating', 'zset'}, {'pending', 'zset'},
  {'unclaimed', 'zset'}, {'active', 'zset'}, {'engaged', 'zset'}, {'stats', 'hash'},
  {'tick_lock', 'string'}, {'decisions', 'stream'}, {'seq', 'string'}, {'levels', 'zset'},
  {'model', 'hash'}, {'targets', 'list'}, {'sliding', 'list'}, {'replicas', 'zset'},
  {'replica_info', 'hash'}, {'sessions', 'zset'}, {'epoch', 'string'}, {'applied', 'hash'},
  {'drains', 'zset'}, {'replacing', 'string'}, {'ended', 'zset'}, {'beats', 'zset'},
}

-- Releases up to 1f26912 (2026-12-04) kept the waiting queue as a list, whose LREM (a waiting
-- user's disconnect) is linear in the queue; it is a sorted set now. A list found there is taken
-- as the queue it was, head first, and converted by the first script that writes (O(n), 2-4 us
-- a user: 0.6-1.2 s of the server for 300,000; a replica of the release before, run beside,
-- writes a list again into an emptied queue, converted again in turn).
local LEGACY_TYPES = {waiting = 'list'}

-- Raises "WRONGTYPE pool key ..." if a pool key holds another type than its own; O(1) each.
-- Then converts a waiting queue still kept as a list (LEGACY_TYPES): only once every key has
-- passed, so a script refused writes nothing.
local function refuse_wrong_types()
  local legacy = false
  for _, entry in ipairs(KEY_TYPES) do
    local key = K[entry[1]]
    local kind = rcall('TYPE', key)['ok']
    if kind == LEGACY_TYPES[entry[1]] then
      legacy = true
    elseif kind ~= 'none' and kind ~= entry[2] then
      error({err = 'WRONGTYPE pool key ' .. key .. ' holds a ' .. kind .. ', not a '
        .. entry[2] .. ' (an edit by hand?): nothing was changed'})
    end
  end
  if legacy then  -- the waiting queue, the one legacy type
    local users = rcall('LRANGE', K.waiting, 0, -1)
    rcall('DEL', K.waiting)
    for place, user in ipairs(users) do
      rcall('ZADD', K.waiting, 'NX', place, user)  -- a user listed twice keeps the first place
    end
    pcall(rcall, 'HINCRBY', K.stats, 'waiting_list_converted', rcall('ZCARD', K.waiting))
  end
end

-- A terminated node's hash is kept this long so late or repeated status is recognised.
local TOMBSTONE_TTL_MS = 86400000

local function node_key(node_id)
  return K.node_prefix .. node_id
end

-- Whether a node is a boot-time sample (pool.lua new_node). A record without the mark (written
-- before it existed) counts as one: it is learned from and never given up in an idle node's
-- place while booting (reap_idle; a stuck boot is ended all the same).
local function is_boot_sample(node_id)
  return rcall('HGET', node_key(node_id), 'boot_sample') ~= '0'
end

-- Add `by` to a hash field (HINCRBYFLOAT when `float`, else HINCRBY). A field that is not a
-- number of that kind (only an edit by hand writes one) starts again from `by`, counted in
-- stats `values_repaired`, rather than failing every transition that adds to it.
local function add_to(key, field, by, float)
  if not pcall(rcall, float and 'HINCRBYFLOAT' or 'HINCRBY', key, field, by) then
    rcall('HSET', key, field, by)
    pcall(rcall, 'HINCRBY', K.stats, 'values_repaired', 1)
  end
end

-- A counter of the stats hash.
local function stat(field, by)
  add_to(K.stats, field, by or 1, false)
end

-- An entry of the decisions stream (what `provisioner status` lists: scaling actions, misses,
-- operators' releases), the stream kept to about `log_len` entries; `...` are further fields.
local function log_entry(log_len, now, replica, kind, reason, numbers, acted, ...)
  rcall('XADD', K.decisions, 'MAXLEN', '~', log_len, '*', 'now', now, 'replica', replica,
        'kind', kind, 'reason', reason, 'numbers', numbers, 'acted', acted, ...)
end

-- A learned value of the model hash as the scripts write it: a non-negative finite number. Anything
-- else (missing, text, nan, inf, negative: only a hand repair gone wrong writes those) is nil,
-- read as nothing learned yet.
local function learned(raw)
  local v = tonumber(raw)
  if v and v == v and v >= 0 and v < math.huge then
    return v
  end
  return nil
end

-- The numbers of the last scaling decision (scale_decide's summary: ready, booting, spare,
-- target, surge, ...), as a table; nil before the first decision or if unreadable.
local function last_decision_numbers(raw)
  local ok, numbers = pcall(cjson.decode, raw or '')
  if ok and type(numbers) == 'table' then
    return numbers
  end
  return nil
end

-- Browsing cells. A browsing user (activity in the window, no node, not waiting) is at level k
-- while they have at least k activities in the window, and of age a = now - first seen.
-- The forecast counts users per cell (level index i, age bucket j) with O(log n) ZCOUNTs on one
-- sorted set, with no sweep over users. Each count lives in its own band of scores:
--   band LEVELS[i]          member 'k|user'    score band + ms of the k-th latest activity
--                           (the user is at level >= k while that ms is inside the window);
--   band 20 + 4 * i + j     member 'k|j|user'  score band + the ms the user stops being both at
--                           level >= k and younger than AGES[j] (a deadline: counted while > now).
-- The members are named by level_member and young_member (below) only.
local LEVELS = {1, 2, 4, 8, 16}
local AGES = {60000, 120000, 300000}  -- ms; bucket #AGES + 1 is everyone older
local LEVEL_BAND = 1e13  -- above any ms timestamp until the year 2286; 43 bands stay exact

-- A score as exact decimal digits: redis.call would print a number with 14 significant digits,
-- and band scores have 15.
local function score(x)
  return string.format('%.0f', x)
end

-- A replace's hold of spare nodes (hold_spare.lua), `replacing` = 'extra:until_ms:run': its
-- extra and its run; nil for none, or for a value hold_spare did not write (HOLD_MAX: an
-- extra of hundreds of digits, edited by hand, read as inf, which stopped every tick and
-- `status`, or as 1e300, a target no count holds). Read here once for the scripts that hold
-- it, refuse a run's marks without it, and count it in the target.
local HOLD_MAX = 1e6
local function read_hold(value)
  local extra, run = string.match(value or '', '^(%d+):%d+:(.+)$')
  extra = tonumber(extra)
  if not extra or extra > HOLD_MAX then
    return nil
  end
  return extra, run
end

-- Drop at most `limit` members scored in [lo, hi] (inclusive), lowest first: O(log n + limit)
-- however many are stale, so one tick never blocks the server. Returns how many went.
local function trim(key, lo, hi, limit)
  local stale = rcall('ZCOUNT', key, score(lo), score(hi))
  if stale == 0 then
    return 0
  end
  local start = rcall('ZCOUNT', key, '-inf', '(' .. score(lo))
  local n = math.min(stale, limit)
  rcall('ZREMRANGEBYRANK', key, start, start + n - 1)
  return n
end

local function young_band(i, j)
  return (20 + 4 * i + j) * LEVEL_BAND
end

-- What has gone stale in each set, defined once for the tick's bounded trim (scale_decide) and
-- the sweep that pays for each new member (record_activity). `active` and `engaged` count a
-- score within the window (>= now - window); a level band counts a k-th event strictly after
-- now - window; a young cell counts a deadline still ahead (> now).
local function trim_stale(key, now, window, limit)
  return trim(key, 0, now - window - 1, limit)
end

local function trim_stale_level(k, now, window, limit)
  local band = k * LEVEL_BAND
  return trim(K.levels, band, band + now - window, limit)
end

local function trim_stale_young(i, j, now, limit)
  local band = young_band(i, j)
  return trim(K.levels, band, band + now, limit)
end

-- A new member removes up to this many stale ones from its set or band: every stale entry was
-- once a new member, so removal keeps pace with arrivals at any rate, O(log n) per event.
local SWEEP_PER_ADD = 2

-- A user's members of `levels`. The separator is one no id may hold (ids may hold ':', the
-- pattern of provisioner/events.py ID_PATTERN): with ':', user '1:x' at level 1 and user 'x' in
-- the young cell of level 1, age 1 were one member, '1:1:x', and one user's write moved the
-- other's entry.
local function level_member(k, user)
  return k .. '|' .. user
end

local function young_member(k, j, user)
  return k .. '|' .. j .. '|' .. user
end

local function forget_levels(user)
  local members = {}
  for i, k in ipairs(LEVELS) do
    members[#members + 1] = level_member(k, user)
    for j = 1, #AGES do
      members[#members + 1] = young_member(k, j, user)
    end
  end
  rcall('ZREM', K.levels, unpack(members))
end

-- The user's first-seen ms, or nil for a user not browsing at `now`. record_activity writes
-- 'first:until_ms', until_ms on the pool's clock: the key's PX runs on the server's, which a
-- replay's virtual hours never reach, and a user silent for longer than the key's life was
-- still the old arrival there, a new one live (a review). The PX only cleans up. A bare
-- number is a first-seen time written before 2026-12-06, whose PX alone ends it.
local function first_seen(user, now)
  local value = rcall('GET', K.seen_prefix .. user)
  if not value then
    return nil
  end
  local first, till = string.match(value, '^([^:]*):([^:]*)$')
  if not first then
    return tonumber(value)
  end
  if not tonumber(till) or tonumber(till) <= now then
    return nil
  end
  return tonumber(first)
end

-- A session starts or ends: the user's activity window and age start afresh.
local function forget_browsing(user)
  rcall('DEL', K.acts_prefix .. user, K.seen_prefix .. user)
end

-- The cell (level index 1..#LEVELS, age bucket 1..#AGES+1) of a user whose window holds
-- `count` events at time t and who was first seen at `first`; nil when not browsing then.
local function cell_of(count, first, t)
  if count < 1 or not first or t < first then
    return nil
  end
  local level = 1
  for i, k in ipairs(LEVELS) do
    if count >= k then level = i end
  end
  local age = #AGES + 1
  for j, limit in ipairs(AGES) do
    if t - first < limit then
      age = j
      break
    end
  end
  return level, age
end
