-- The pool key vector, in the order of provisioner/keys.py POOL_KEY_ORDER.
-- Every script receives it as KEYS[1..19]; per-event keys are built from the two prefixes.
local K = {
  ready = KEYS[1],          -- list: ready node ids, head = most recently freed
  waiting = KEYS[2],        -- list: waiting user ids, head = oldest
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
  tick_lock = KEYS[13],     -- string: the last interval slot a decision was taken in
  decisions = KEYS[14],     -- stream: scaling decisions with reasons
  seq = KEYS[15],           -- string: reservation id counter
  levels = KEYS[16],        -- zset: 'k:user' -> k * LEVEL_BAND + ms of k-th latest activity
  model = KEYS[17],         -- hash: learned connect rates per level, boot and session times
  node_prefix = KEYS[18],   -- prefix of per-node hashes
  acts_prefix = KEYS[19],   -- prefix of per-user activity windows
}
local rcall = redis.call

-- A terminated node's hash is kept this long so late or repeated status is recognised.
local TOMBSTONE_TTL_MS = 86400000

local function node_key(node_id)
  return K.node_prefix .. node_id
end

local function stat(field, by)
  rcall('HINCRBY', K.stats, field, by or 1)
end

-- Browsing levels: a user is at level k while they have at least k activities in the window.
-- One sorted set holds every level, each in its own band of scores, so "users at level >= k now"
-- is one ZCOUNT over the band's window: O(log n), with no sweep over users.
local LEVELS = {1, 2, 4, 8, 16}
local LEVEL_BAND = 1e13  -- above any ms timestamp until the year 2286

local function forget_levels(user)
  for _, k in ipairs(LEVELS) do
    rcall('ZREM', K.levels, k .. ':' .. user)
  end
end

-- The user's level index now (0 = no activity in the window, i = LEVELS[i]).
local function level_of(user, now, window)
  local index = 0
  for i, k in ipairs(LEVELS) do
    local score = tonumber(rcall('ZSCORE', K.levels, k .. ':' .. user))
    if not score or score - k * LEVEL_BAND < now - window then
      break
    end
    index = i
  end
  return index
end
