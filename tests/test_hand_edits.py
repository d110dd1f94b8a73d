"""A pool edited by hand: every value the scripts write, replaced by garbage, must not stop a
transition; a key replaced by one of another type stops every transition whole, changing
nothing."""

from __future__ import annotations

import json

import pytest
import redis
import redis.asyncio as aioredis

from provisioner.clock import ManualClock
from provisioner.config import PoolConfig
from provisioner.keys import PoolKeys
from provisioner.scripts import ID_BYTES, Release, Scripts
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



async def test_a_wait_start_that_is_not_a_time_stops_no_snapshot(aredis: aioredis.Redis) -> None:
    """nan or inf where a waiting user's start belongs stopped the snapshot's JSON, and with it
    `status` and every gauge; a negative read as 56 years. Each is read as unknown."""
    keys = PoolKeys("edited")
    pool = PoolUnderTest(aredis, keys, Scripts(aredis, keys), ManualClock(T0))
    for user in ("u1", "u2"):
        await pool.scripts.allocate(pool.now, user)
    for value in ("nan", "inf", "-inf", "1e400", "-1", "0", "garbage"):
        await aredis.hset(keys.key("waiting_since"), mapping={"u1": value, "u2": value})
        snap = await pool.snap()
        assert snap.counts["waiting"] == 2 and snap.longest_wait_s(T0 + 60_000) is None, value
    await aredis.hset(keys.key("waiting_since"), "u2", T0)  # one start that is a time
    assert (await pool.snap()).longest_wait_s(T0 + 60_000) == 60.0


#: Every script that writes, each on a pool where it would write (from _every_transition's).
_WRITERS = {
    "activity": lambda p: p.scripts.record_activity(p.now, "u9", p.now, CONFIG.window_ms, 3, 100),
    "connect": lambda p: p.scripts.allocate(p.now, "u9"),
    "disconnect": lambda p: p.scripts.release(p.now, "u2"),
    "node ready": lambda p: p.scripts.apply_node_status(p.now, "b1", "ready"),
    "node terminated": lambda p: p.scripts.apply_node_status(p.now, "n2", "terminated"),
    "tick": lambda p: p.scripts.scale_decide(CONFIG.policy_args(p.now + 5_000, "r1")),
    "reap": lambda p: p.scripts.reap_idle(CONFIG.policy_args(p.now + 400_000, "r1")),
    "create answered": lambda p: p.scripts.register_node(p.now, "r1:9", "n9"),
    "create failed": lambda p: p.scripts.cancel_create("r1:9"),
    "terminate sent": lambda p: p.scripts.confirm_terminate(p.now, "n1", "gone", p.now),
    "model loaded": lambda p: p.scripts.load_model(p.now, {"boot_ms": 50_000.0}, replace=True),
    "heartbeat": lambda p: p.scripts.heartbeat("r1", {"lag_s": 0}, 600_000),
    "spare held": lambda p: p.scripts.hold_spare(p.now, "take", "run1", 1, 30_000),
    "node drained": lambda p: p.scripts.drain_node(p.now, "b1", "op"),
}


async def test_a_key_of_another_type_refuses_every_transition_whole(
    aredis: aioredis.Redis,
) -> None:
    """Found by a review: Redis undoes nothing a script wrote before a command failed, so a
    disconnect refused on a stats hash made a string by hand had already taken the user's
    allocation: once the key was repaired, the node was allocated to nobody, for good, and
    neither `release` nor reconciliation could end it. Every script that writes now checks
    the pool's keys first."""
    from redis.exceptions import ResponseError

    from provisioner.keys import POOL_KEY_ORDER

    keys = PoolKeys("typed")
    failed = []
    for name in [n for n in POOL_KEY_ORDER if not n.endswith("_prefix")]:
        for writer, write in _WRITERS.items():
            await aredis.flushdb()
            pool = PoolUnderTest(aredis, keys, Scripts(aredis, keys), ManualClock(T0))
            await _every_transition(pool)
            await pool.scripts.apply_node_status(pool.now, "b1", "booting")
            await pool.redis.zadd(keys.key("pending"), {"r1:9": pool.now + 60_000})
            key = keys.key(name)
            await aredis.delete(key)
            if name in ("tick_lock", "seq", "epoch", "replacing"):  # strings; the others are not
                await aredis.hset(key, "by", "hand")
            else:
                await aredis.set(key, "by hand")
            before = await pool.dump()
            try:
                await write(pool)
            except ResponseError as exc:
                if not str(exc).startswith(f"WRONGTYPE pool key {key} holds a "):
                    failed.append(f"{name}, {writer} | {exc}"[:160])
            else:
                failed.append(f"{name}, {writer} | went through")
            if await pool.dump() != before:
                failed.append(f"{name}, {writer} | changed the pool")
    assert failed == []


async def test_a_ready_entry_whose_node_is_not_ready_is_dropped_not_handed_out(
    aredis: aioredis.Redis,
) -> None:
    # Found by a review: an id written by hand into the ready list, with no node record, was
    # handed to the next user who connected.
    keys = PoolKeys("phantom")
    pool = PoolUnderTest(aredis, keys, Scripts(aredis, keys), ManualClock(T0))
    await pool.boot("n1")
    await aredis.lpush(keys.key("ready"), "phantom")
    assert (await pool.scripts.allocate(pool.now, "u1")).node_id == "n1"
    await pool.scripts.allocate(pool.now, "u2")  # waits
    await aredis.rpush(keys.key("ready"), "phantom")
    await pool.boot("n2")  # served to the waiting user, past the phantom
    assert await aredis.hgetall(keys.key("alloc")) == {"u1": "n1", "u2": "n2"}
    snap = await pool.snap()
    assert snap.stat("values_repaired") == 2 and snap.counts["ready"] == 0


@pytest.mark.parametrize("entry", ["ready", "booting"])
async def test_the_reaper_never_ends_an_allocated_node_a_ready_or_booting_entry_names(
    aredis: aioredis.Redis, entry: str,
) -> None:
    # Found by a review of the fix above: the reaper read the same list's head and chose an
    # allocated node written there by hand, which the replica then DELETEd under its user.
    # And its twin for the stuck boots: an allocated node in the booting set (by hand, or a
    # state put back from an older copy) is no boot to end, however long it ran.
    keys = PoolKeys(f"phantom-{entry}")
    pool = PoolUnderTest(aredis, keys, Scripts(aredis, keys), ManualClock(T0))
    config = PoolConfig(min_ready=0, scaling_policy="heuristic", conversion=0, idle_timeout_s=60)
    await pool.boot("n1")
    assert (await pool.scripts.allocate(pool.now, "u1")).node_id == "n1"
    if entry == "ready":
        await aredis.lpush(keys.key("ready"), "n1")
    else:
        await aredis.zadd(keys.key("booting"), {"n1": 0})
    pool.clock.advance(120_000)
    assert await pool.scripts.reap_idle(config.policy_args(pool.now, "r1")) == []
    node = await pool.node("n1")
    assert (node["state"], node["user"]) == ("allocated", "u1")
    assert (await pool.snap()).counts["ready"] == 0
    assert await aredis.zcard(keys.key("terminating")) == 0


async def test_a_release_by_a_user_whose_allocation_another_holds_frees_nothing(
    aredis: aioredis.Redis,
) -> None:
    # An allocation entry naming a node whose record gives it to another user (written by
    # hand, or left by a state put back from an older copy) is stale: the disconnect drops it,
    # and the node stays with the user its record names.
    keys = PoolKeys("stale")
    pool = PoolUnderTest(aredis, keys, Scripts(aredis, keys), ManualClock(T0))
    await pool.boot("n1")
    assert (await pool.scripts.allocate(pool.now, "u1")).node_id == "n1"
    await aredis.hset(keys.key("alloc"), "u2", "n1")
    assert (await pool.scripts.release(pool.now, "u2")).code is Release.STALE
    node = await pool.node("n1")
    assert (node["state"], node["user"]) == ("allocated", "u1")
    assert await pool.alloc() == {"u1": "n1"}
    assert await pool.ready_list() == []


async def test_a_node_gone_whose_record_names_a_user_of_another_node_requeues_nobody(
    aredis: aioredis.Redis,
) -> None:
    # A node's record naming a user whose allocation is another node (written by hand, or left
    # by a state put back from an older copy): when the node goes, that user keeps their node
    # and is not put in the queue.
    keys = PoolKeys("stale-gone")
    pool = PoolUnderTest(aredis, keys, Scripts(aredis, keys), ManualClock(T0))
    await pool.boot("n1")
    await pool.boot("n2")
    await pool.scripts.allocate(pool.now, "u1")
    await pool.scripts.allocate(pool.now, "u2")
    assert await pool.alloc() == {"u1": "n1", "u2": "n2"}
    await aredis.hset(keys.node("n1"), "user", "u2")
    gone = await pool.scripts.apply_node_status(pool.now, "n1", "terminated")
    assert gone.requeued_user == "" and gone.served == []
    assert (await pool.alloc())["u2"] == "n2" and await pool.waiting_list() == []
    assert (await pool.snap()).stat("requeued") == 0


def test_ids_that_are_not_text_stop_no_view(redis_url: str, sync_redis: redis.Redis) -> None:
    """Bytes that are not UTF-8, written by hand where the scripts keep ids: every view of the
    CLI still answers, the bytes shown replaced."""
    from typer.testing import CliRunner

    from provisioner.cli import app

    keys = PoolKeys("bytes")
    sync_redis.rpush(keys.key("waiting"), b"\xff\xfeuser")
    sync_redis.zadd(keys.key("nodes"), {b"\xff\xfenode": 1})
    for command in ("users", "nodes", "check", "status"):
        result = CliRunner().invoke(app, [command, "--redis-url", redis_url, "--pool", "bytes"])
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            command, result.exception)
        assert result.exit_code in (0, 1), (command, result.output)
    shown = CliRunner().invoke(app, ["nodes", "--redis-url", redis_url, "--pool", "bytes",
                                     "--json"]).output
    assert len(json.loads(shown)) == 1
    # Its waiting time is not found under the replaced text: unknown, not 56 years.
    sync_redis.hset(keys.key("waiting_since"), b"\xff\xfeuser", 1)
    shown = CliRunner().invoke(app, ["users", "--redis-url", redis_url, "--pool", "bytes",
                                     "--json"]).output
    assert [w["waiting_s"] for w in json.loads(shown)["waiting"]] == [None]


async def test_an_id_that_is_not_text_goes_back_to_redis_as_it_came(redis_url: str) -> None:
    """The replica's client decodes nothing: an id of bytes that are not UTF-8 is taken back
    to Redis as it found it, so reconciliation ends that node."""
    from provisioner.config import ServiceConfig
    from provisioner.metrics import Metrics
    from provisioner.service import Replica
    from tests.fakes import FakeNodeApi

    keys = PoolKeys("bytes")
    # As serve() makes the service's client: bytes replies, ids sent back as they came.
    raw = aioredis.Redis.from_url(redis_url, encoding_errors=ID_BYTES)
    try:
        clock = ManualClock(T0)
        # A node of that id, as a status written by hand would have made it.
        await Scripts(raw, keys).apply_node_status(clock.now_ms(), "\udcff\udcfenode", "ready")
        assert await raw.zrange(keys.key("nodes"), 0, -1) == [b"\xff\xfenode"]
        clock.advance(3_600_000)
        api = FakeNodeApi()
        api.listed = []
        service = ServiceConfig("redis://x", "http://api", pool="bytes", replica_id="r1")
        replica = Replica(raw, service, CONFIG, api, clock=clock, metrics=Metrics())
        counts = await replica.reconcile()
        assert counts is not None and counts["vanished"] == 1
        assert await raw.zrange(keys.key("nodes"), 0, -1) == []
    finally:
        await raw.aclose()
