"""The one place where Redis key names are built.

Every key of a pool carries the pool's hash tag, ``prov:{<pool>}:…``, so that every script
touches a single cluster slot. Scripts receive the whole pool key vector in KEYS (the order of
:data:`POOL_KEY_ORDER`, mirrored by ``lua/includes/keys.lua``) and never build a key name from
scratch: per-node and per-user keys are made from the two *prefix* entries of that vector.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

POOL_NAME = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")

#: The order of the pool key vector passed as KEYS to every script. Keep in sync with
#: lua/includes/keys.lua (tests/test_scripts.py checks it).
POOL_KEY_ORDER: tuple[str, ...] = (
    "ready",          # list of ready (idle) node ids; head = idle the longest (served first)
    "waiting",        # zset: waiting user ids by place in line; lowest = served first
    "waiting_since",  # hash user id -> ms the user started waiting
    "alloc",          # hash user id -> node id (the allocation map)
    "nodes",          # zset of live node ids, scored by creation ms
    "booting",        # zset of booting node ids, scored by boot start ms
    "terminating",    # zset of node ids being terminated, scored by retry deadline ms
    "pending",        # zset of create reservations, scored by deadline ms
    "unclaimed",      # zset of nodes first seen through node:status, not yet registered
    "active",         # zset user id -> last activity ms
    "engaged",        # zset user id -> ms of the Nth most recent activity
    "stats",          # hash of counters (connects, hits, misses, ...)
    "tick_lock",      # string: the start (ms) of the last interval slot a decision was taken in
    "decisions",      # stream of scaling decisions with their reasons
    "seq",            # string counter for reservation ids
    "levels",         # zset: browsing levels and level x age cells of users (score bands)
    "model",          # hash: the forecast's learned chances, boot time and release rate
    "targets",        # list: recent targets "ms:target", decreasing (the reaper's keep level)
    "sliding",        # list: each tick's "ms:connects:mean:var:releases:frees", one lead time
    "node_prefix",    # prefix of per-node hashes: <prefix><node id>
    "acts_prefix",    # prefix of per-user activity windows: <prefix><user id>
    "seen_prefix",    # prefix of per-user first-seen times: <prefix><user id>
    "replicas",       # zset: replica id -> server ms (TIME) of its last heartbeat
    "replica_info",   # hash: replica id -> what its last heartbeat said (JSON)
    "sessions",       # zset: user id -> ms the user was handed their node (one per alloc entry)
    "epoch",          # string: set once when the pool's state begins; a new one means it was lost
    "applied",        # hash: replica id -> "batch:seq[:lo-hi,...]", its last call marked applied
    "drains",         # zset: node id -> ms an operator drained it in its session (ends with it)
    "replacing",      # string: "extra:until_ms:run", spare a replace holds (a lease: PX)
    "ended",          # zset: user id -> ms their session ended (-ms: their wait), a minute
    "beats",          # zset: "replica@ms" -> server ms of each heartbeat, for FORGET_REPLICA_MS
)


@dataclass(frozen=True)
class PoolKeys:
    """Key names of one pool."""

    pool: str

    def __post_init__(self) -> None:
        if not POOL_NAME.match(self.pool):
            raise ValueError(
                f"pool name {self.pool!r} must be 1-64 characters of letters, digits, '_.-'"
            )

    @property
    def base(self) -> str:
        return f"prov:{{{self.pool}}}:"

    def key(self, name: str) -> str:
        """The full key for an entry of :data:`POOL_KEY_ORDER`."""
        if name == "node_prefix":
            return self.base + "node:"
        if name == "acts_prefix":
            return self.base + "acts:"
        if name == "seen_prefix":
            return self.base + "seen:"
        if name not in POOL_KEY_ORDER:
            raise KeyError(name)
        return self.base + name

    def vector(self) -> list[str]:
        """The KEYS vector every script receives."""
        return [self.key(name) for name in POOL_KEY_ORDER]

    def node(self, node_id: str) -> str:
        return self.key("node_prefix") + node_id

    def acts(self, user_id: str) -> str:
        return self.key("acts_prefix") + user_id

    def seen(self, user_id: str) -> str:
        return self.key("seen_prefix") + user_id

    @property
    def reconcile_lock(self) -> str:
        return self.base + "reconcile_lock"

    @property
    def config(self) -> str:
        return self.base + "config"

    def pattern(self) -> str:
        """A SCAN pattern matching every key of the pool."""
        return f"prov:{{{self.pool}}}:*"
