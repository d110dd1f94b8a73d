"""A pool edited by hand: every value the scripts write, replaced by garbage, must not stop a
transition. (A key of the wrong type is beyond this: every command on it fails.)"""

from __future__ import annotations

import redis.asyncio as aioredis

from provisioner.clock import ManualClock
from provisioner.config import PoolConfig
from provisioner.keys import PoolKeys
from provisioner.scripts import Scripts
from tests.helpers import T0, PoolUnderTest

CONFIG = PoolConfig()


async def _every_transition(pool: PoolUnderTest) -> None:
    """Activity, nodes booting and ready, connects (one waits), a tick's creates, a
    disconnect and a reap: every script that writes."""
    scripts, now = pool.scripts, pool.now
    await scripts.record_activity(now, "u1", now, CONFIG.window_ms, 3, 100)
    for node in ("n1", "n2", "n3"):
        await scripts.apply_node_status(now, node, "booting")
        await scripts.apply_node_status(now, node, "ready")
    for user in ("u1", "u2", "u3", "u4"):
        await scripts.allocate(now, user)
    decision = await scripts.scale_decide(CONFIG.policy_args(now, "r1"))
    for rid in decision.reservations:
        await scripts.register_node(now, rid, "n-" + rid.replace(":", "-"))
    await scripts.release(now + 1_000, "u1")
    await scripts.reap_idle(CONFIG.policy_args(now + 400_000, "r1"))
    await scripts.snapshot(now + 400_000, CONFIG.window_ms)


async def test_no_value_written_by_the_scripts_stops_a_transition_when_broken_by_hand(
    aredis: aioredis.Redis,
) -> None:
    keys = PoolKeys("edited")

    def fresh() -> PoolUnderTest:
        return PoolUnderTest(aredis, keys, Scripts(aredis, keys), ManualClock(T0))

    await _every_transition(fresh())
    values: list[tuple[str, str | None]] = []
    async for key in aredis.scan_iter(match=keys.pattern()):
        kind = await aredis.type(key)
        if kind == "string":
            values.append((key, None))
        elif kind == "hash":
            values += [(key, field) for field in await aredis.hkeys(key)]
    assert len(values) > 80  # every counter, learned field, node field and string

    failed = []
    for key, field in values:
        await aredis.flushdb()
        pool = fresh()
        await _every_transition(pool)
        if field is None:
            await aredis.set(key, "garbage")
        else:
            await aredis.hset(key, field, "garbage")
        pool.clock.advance(1_000_000)
        try:
            await _every_transition(pool)
        except Exception as exc:  # every failure is reported below
            failed.append(f"{key.removeprefix(keys.base)} {field or ''}: {exc}"[:160])
    assert failed == []
