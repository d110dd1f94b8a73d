"""The forecast policy in the Lua scripts: browsing levels, online learning, the target."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from provisioner.bench.tickcost import LEVEL_BAND, LEVELS, T0, bulk_load, user_events
from provisioner.clock import ManualClock
from provisioner.config import PoolConfig
from provisioner.keys import PoolKeys
from provisioner.scripts import Scripts
from tests.helpers import PoolUnderTest


@pytest.fixture
async def pool(aredis: aioredis.Redis) -> AsyncIterator[PoolUnderTest]:
    keys = PoolKeys("fc")
    yield PoolUnderTest(aredis, keys, Scripts(aredis, keys), ManualClock(T0))


async def browse(pool: PoolUnderTest, user: str, events: int, gap_ms: int = 5_000) -> None:
    """`events` activities of `user`, the last one now."""
    for j in range(events):
        ts = pool.now - (events - 1 - j) * gap_ms
        await pool.scripts.record_activity(pool.now, user, ts, pool.config.window_ms, 3, 100)


async def level_counts(pool: PoolUnderTest) -> list[int]:
    """Users at level >= k now, for each k in LEVELS."""
    start = pool.now - pool.config.window_ms
    return [await pool.redis.zcount(pool.keys.key("levels"), k * LEVEL_BAND + start,
                                    k * LEVEL_BAND + LEVEL_BAND - 1) for k in LEVELS]


async def decide(pool: PoolUnderTest, config: PoolConfig) -> tuple[str, dict[str, int]]:
    decision = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
    assert decision.won
    return decision.reason, json.loads(json.dumps(decision.numbers))


async def test_levels_follow_the_window_and_a_connect_leaves_them(pool: PoolUnderTest) -> None:
    await browse(pool, "a", 5)
    await browse(pool, "b", 1)
    assert await level_counts(pool) == [2, 1, 1, 0, 0]  # a has 5 events: levels 1, 2, 4
    pool.clock.advance(110_000)  # a's two oldest events leave the 120 s window
    assert await level_counts(pool) == [2, 1, 0, 0, 0]
    await pool.scripts.allocate(pool.now, "a")
    assert await level_counts(pool) == [1, 0, 0, 0, 0]
    await browse(pool, "a", 3)  # while waiting or connected a user is not browsing
    assert await level_counts(pool) == [1, 0, 0, 0, 0]


async def test_connects_are_credited_to_the_level_they_browsed_at(pool: PoolUnderTest) -> None:
    await pool.redis.hset(pool.keys.key("model"), mapping={"boot_ms": 1000})
    await browse(pool, "a", 5)
    await browse(pool, "b", 2)
    pool.clock.advance(30_000)  # both first seen more than a boot (1 s) ago
    await pool.scripts.allocate(pool.now, "a")
    await pool.scripts.allocate(pool.now, "b")
    await pool.scripts.allocate(pool.now, "cold")
    model = await pool.redis.hgetall(pool.keys.key("model"))
    assert (float(model["c3"]), float(model["c2"]), float(model["c0"])) == (1, 1, 1)
    assert "cf" not in model
    await pool.scripts.allocate(pool.now, "cold")  # a repeated connect is not credited again
    await browse(pool, "fresh", 3, gap_ms=100)
    await pool.scripts.allocate(pool.now, "fresh")
    model = await pool.redis.hgetall(pool.keys.key("model"))
    assert (float(model["c0"]), float(model["c2"]), float(model["cf"])) == (1, 2, 1)


async def test_the_target_grows_with_users_at_a_level_that_converts(
        pool: PoolUnderTest) -> None:
    config = PoolConfig(min_ready=0, max_nodes=1000)
    # Teach the pool: over 10 minutes, users who reach 8+ events connect a minute later.
    for minute in range(10):
        await browse(pool, f"t{minute}", 10)
        pool.clock.advance(60_000)
        await decide(pool, config)
        await pool.scripts.allocate(pool.now, f"t{minute}")
        await pool.scripts.release(pool.now, f"t{minute}")
    pool.clock.advance(1000)
    _, quiet = await decide(pool, config)
    pool.clock.advance(1000)
    for i in range(10):
        await browse(pool, f"hot{i}", 10)
    reason, busy = await decide(pool, config)
    assert busy["target"] >= quiet["target"] + 5
    assert "forecast" in reason and "browsing by level 0/0/0/10/0" in reason
    # The same number of users at level 1 (one event each) forecast far less.
    pool.clock.advance(200_000)
    for i in range(10):
        await browse(pool, f"cold{i}", 1)
    pool.clock.advance(1000)
    _, cold = await decide(pool, config)
    assert cold["target"] < busy["target"]


async def test_boot_and_session_times_are_learned(pool: PoolUnderTest) -> None:
    await pool.scripts.apply_node_status(pool.now, "n1", "booting")
    pool.clock.advance(40_000)
    await pool.scripts.apply_node_status(pool.now, "n1", "ready")
    await pool.scripts.allocate(pool.now, "u")
    pool.clock.advance(300_000)
    await pool.scripts.release(pool.now, "u")
    model = await pool.redis.hgetall(pool.keys.key("model"))
    assert float(model["boot_ms"]) == 40_000
    assert float(model["session_ms"]) == 300_000


async def test_reap_keeps_what_the_forecast_needs(pool: PoolUnderTest) -> None:
    config = PoolConfig(min_ready=0, idle_timeout_s=1, max_nodes=1000)
    for node in ("n1", "n2", "n3"):
        await pool.scripts.apply_node_status(pool.now, node, "booting")
    pool.clock.advance(60_000)  # boots take a minute: the forecast's horizon
    for node in ("n1", "n2", "n3"):
        await pool.scripts.apply_node_status(pool.now, node, "ready")
    for i in range(30):
        await browse(pool, f"u{i}", 10)
    pool.clock.advance(2_000)
    _, numbers = await decide(pool, config)
    reaped = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert numbers["target"] >= 3 and reaped == []  # all three are wanted
    pool.clock.advance(400_000)  # the browsers are gone: the forecast needs (almost) nothing
    _, numbers = await decide(pool, config)
    reaped = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert len(reaped) == 3 - numbers["target"] and len(reaped) >= 1


async def test_bulk_loader_matches_record_activity(aredis: aioredis.Redis) -> None:
    """The tick-cost benchmark's bulk loader writes what the script would."""
    window = PoolConfig().window_ms
    scripted, bulk = PoolKeys("scripted"), PoolKeys("bulk")
    scripts = Scripts(aredis, scripted)
    for i in range(60):
        for ts in user_events(i):
            await scripts.record_activity(T0, f"user-{i}", ts, window, 3, 100)
    await bulk_load(aredis, bulk, 60, window)
    for name in ("active", "engaged", "levels"):
        assert await aredis.zrange(scripted.key(name), 0, -1, withscores=True) == \
            await aredis.zrange(bulk.key(name), 0, -1, withscores=True), name
