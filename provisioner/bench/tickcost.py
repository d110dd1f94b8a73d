"""What one scaling tick costs the server as the number of browsing users grows.

Loads N browsing users into a pool (the pool-wide sorted sets exactly as record_activity leaves
them, written in bulk: tests/test_forecast.py checks the two agree), then times scale_decide +
reap_idle, the work one tick does in Redis, over consecutive ticks of virtual time. The events
are spread over the whole activity window, so from the first timed tick on, entries leave it
and every tick does its share of the (bounded) trimming, as a pool in steady traffic does.
Nothing is created (max_nodes is reached by a filler node), so the samples measure the
decision itself.

After the ticks it times record_activity, the per-event script that touches the same sets: one
request each from new users (arrivals), the costliest kind, since each new entry in `active`
and in a cell band also sweeps up to two entries that left the window.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from provisioner.config import PoolConfig
from provisioner.keys import PoolKeys
from provisioner.redis_server import server_label
from provisioner.scripts import Scripts, clear_pool

T0 = 1_767_225_600_000


@dataclass(frozen=True)
class TickCost:
    users: int
    load_s: float
    median_ms: float
    p95_ms: float
    used_memory_mb: float
    trimmed_median: float  # entries removed per tick (at most TRIM_LIMIT per set and band)
    activity_median_ms: float  # one record_activity of a new user, round trip
    activity_p95_ms: float
    server: str  # name and version, e.g. "valkey 8.1.8"


LEVELS = (1, 2, 4, 8, 16)
AGES_MS = (60_000, 120_000, 300_000)
LEVEL_BAND = 10**13


def young_band(i: int, j: int) -> int:
    """Score band of the cell 'level >= LEVELS[i-1] and younger than AGES_MS[j-1]' (1-based, as
    in lua/includes/keys.lua)."""
    return (20 + 4 * i + j) * LEVEL_BAND


SPREAD_MS = 120_000  # the default window: from the second tick on, the oldest events leave it


def user_events(i: int) -> list[int]:
    """User i's activity timestamps (ms, oldest first): 1 to 20 events over the last 120 s, so
    every level is populated and some users' events leave the window at every tick."""
    return sorted(T0 - (i * 7_919 + j * 5_000) % SPREAD_MS for j in range(1 + i % 20))


async def bulk_load(redis: aioredis.Redis, keys: PoolKeys, users: int, window_ms: int,
                    threshold: int = 3) -> None:
    """The `active`, `engaged` and `levels` sets of `users` browsing users, in big ZADDs, as
    record_activity leaves them when each user's events arrive in order at T0."""
    batch = 5000
    for first in range(0, users, batch):
        active: dict[str, int] = {}
        engaged: dict[str, int] = {}
        levels: dict[str, int] = {}
        for i in range(first, min(users, first + batch)):
            user = f"user-{i}"
            events = [ts for ts in user_events(i) if ts >= T0 - window_ms]
            active[user] = events[-1]
            if len(events) >= threshold:
                engaged[user] = events[-threshold]
            first = events[0]
            for i, k in enumerate(LEVELS, start=1):
                if len(events) < k:
                    break
                levels[f"{k}|{user}"] = k * LEVEL_BAND + events[-k]
                for j, limit in enumerate(AGES_MS, start=1):
                    if first + limit > T0:
                        deadline = min(events[-k] + window_ms, first + limit)
                        levels[f"{k}|{j}|{user}"] = young_band(i, j) + deadline
        async with redis.pipeline(transaction=False) as pipe:
            pipe.zadd(keys.key("active"), active)
            if engaged:
                pipe.zadd(keys.key("engaged"), engaged)
            pipe.zadd(keys.key("levels"), levels)
            await pipe.execute()


def _median_p95(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(0.95 * (len(ordered) - 1))]


async def measure(redis_url: str, users: int, *, ticks: int = 50, events: int = 1000,
                  pool_name: str = "tickcost") -> TickCost:
    redis = aioredis.Redis.from_url(redis_url)
    keys = PoolKeys(pool_name)
    scripts = Scripts(redis, keys)
    config = PoolConfig(max_nodes=1)
    try:
        await clear_pool(redis, keys)
        started = time.perf_counter()
        await bulk_load(redis, keys, users, config.window_ms)
        load_s = time.perf_counter() - started
        await scripts.apply_node_status(T0, "filler", "booting")  # max_nodes reached
        samples, trimmed = [], []
        for tick in range(ticks):
            args = config.policy_args(T0 + tick * config.interval_ms, "bench")
            before = int(await redis.hget(keys.key("stats"), "entries_trimmed") or 0)
            begin = time.perf_counter()
            await scripts.scale_decide(args)
            await scripts.reap_idle(args)
            samples.append((time.perf_counter() - begin) * 1000)
            after = int(await redis.hget(keys.key("stats"), "entries_trimmed") or 0)
            trimmed.append(after - before)
        info = await redis.info("memory")
        about = await redis.info("server")
        server = server_label(about)
        now = T0 + ticks * config.interval_ms
        per_event = []
        for k in range(events):
            begin = time.perf_counter()
            await scripts.record_activity(now, f"arrival-{k}", now, config.window_ms,
                                          config.engaged_threshold, config.max_events_per_user)
            per_event.append((time.perf_counter() - begin) * 1000)
        return TickCost(users, load_s, *_median_p95(samples),
                        int(info["used_memory"]) / 2**20, statistics.median(trimmed),
                        *_median_p95(per_event), server)
    finally:
        await clear_pool(redis, keys)
        await redis.aclose()


def run(redis_url: str, users: list[int], ticks: int = 50) -> list[TickCost]:
    return [asyncio.run(measure(redis_url, n, ticks=ticks)) for n in users]
