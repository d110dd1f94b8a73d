"""Every Lua transition, by its transitions: duplicates, races and unknown ids included."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from provisioner.clock import ManualClock
from provisioner.config import PoolConfig
from provisioner.keys import POOL_KEY_ORDER, PoolKeys
from provisioner.scripts import (
    Activity,
    Allocation,
    Call,
    Drain,
    Heartbeat,
    Hold,
    NodeStatusOutcome,
    RegisterResult,
    Registration,
    Release,
    ReplicaSeen,
    Scripts,
)
from provisioner.view import check_invariants
from tests.helpers import T0, PoolUnderTest, Subscriber, heard_ago


@pytest.fixture
async def pool(aredis: aioredis.Redis) -> AsyncIterator[PoolUnderTest]:
    keys = PoolKeys("test")
    yield PoolUnderTest(aredis, keys, Scripts(aredis, keys), ManualClock(T0))


async def engage(pool: PoolUnderTest, users: str | tuple[str, ...], window_ms: int) -> None:
    """Three activities of each user within the last two seconds: engaged (the heuristic's
    threshold is 3), so the heuristic's target is ceil(engaged users x 0.5)."""
    for user in users:
        for offset in (0, 1000, 2000):
            await pool.scripts.record_activity(pool.now, user, pool.now - offset, window_ms, 3,
                                               100)


# --- allocate -------------------------------------------------------------------------------


def test_the_lua_key_table_follows_the_python_key_order() -> None:
    source = (Path(__file__).parent.parent / "lua" / "includes" / "keys.lua").read_text()
    table = source.split("local K = {")[1].split("}")[0]
    entries = re.findall(r"^\s*(\w+) = KEYS\[(\d+)\]", table, re.MULTILINE)
    assert [name for name, _ in entries] == list(POOL_KEY_ORDER)
    assert [int(i) for _, i in entries] == list(range(1, len(POOL_KEY_ORDER) + 1))


def test_the_key_types_the_operator_tools_check_are_the_scripts_own() -> None:
    """`provisioner check` judges each key's type by the table the scripts check (read from
    keys.lua): every key but the per-node and per-user prefixes, the queue's old list with it."""
    from provisioner.scripts import key_types

    types = key_types()
    assert set(types) == {n for n in POOL_KEY_ORDER if not n.endswith("_prefix")}
    assert types["waiting"] == {"zset", "list"} and types["decisions"] == {"stream"}


async def test_connect_with_ready_node_is_a_hit_published_once(pool: PoolUnderTest) -> None:
    await pool.boot("n1")
    async with Subscriber(pool.redis, "user:allocated", "user:waiting") as sub:
        first = await pool.scripts.allocate(pool.now, "u1")
        again = await pool.scripts.allocate(pool.now, "u1")
        messages = await sub.drain()
    assert first.code is Allocation.ALLOCATED and first.node_id == "n1"
    assert again.code is Allocation.ALREADY_ALLOCATED and again.node_id == "n1"
    assert messages == [("user:allocated", {"user_id": "u1", "node_id": "n1", "waited_ms": 0})]
    snap = await pool.snap()
    assert (snap.stat("connects"), snap.stat("hits"), snap.stat("misses")) == (1, 1, 0)
    assert (await pool.node("n1"))["state"] == "allocated"
    assert await pool.alloc() == {"u1": "n1"}


async def test_a_miss_is_logged_once_with_the_decision_before_it(pool: PoolUnderTest) -> None:
    await pool.scripts.allocate(pool.now, "early", "r1")  # before any tick
    await pool.boot("n1")  # serves `early`
    await pool.scripts.scale_decide(PoolConfig(min_ready=1).policy_args(pool.now, "r1"))
    await pool.boot("n2")
    pool.clock.advance(2500)
    hit = await pool.scripts.allocate(pool.now, "u0", "r1")
    miss = await pool.scripts.allocate(pool.now, "u1", "r1", 50)
    again = await pool.scripts.allocate(pool.now, "u1", "r2", 50)  # another replica, same event
    assert (hit.code, miss.code, again.code) == (
        Allocation.ALLOCATED, Allocation.WAITING, Allocation.ALREADY_WAITING)
    entries = [fields for _, fields in await pool.redis.xrange(pool.keys.key("decisions"))]
    misses = [fields for fields in entries if fields["kind"] == "miss"]
    assert [m["reason"] for m in misses] == [
        "user early waits at position 1: no ready node; no scaling decision yet",
        "user u1 waits at position 1: no ready node; the last decision was 2.5s before with "
        "spare 0 (ready 0, booting 0) for a target of 1"]
    assert [m["decision"] for m in misses] == [
        "", await pool.redis.hget(pool.keys.key("stats"), "last_decision")]
    assert misses[1]["replica"] == "r1"
    numbers = json.loads(misses[1]["numbers"])
    assert (numbers["ready"], numbers["target"]) == (0, 1)


async def test_connect_without_ready_node_waits_and_is_served_when_a_node_boots(
    pool: PoolUnderTest,
) -> None:
    async with Subscriber(pool.redis, "user:allocated", "user:waiting") as sub:
        miss = await pool.scripts.allocate(pool.now, "u1")
        again = await pool.scripts.allocate(pool.now, "u1")
        await pool.scripts.apply_node_status(pool.now, "n1", "booting")
        pool.clock.advance(42_000)
        ready = await pool.scripts.apply_node_status(pool.now, "n1", "ready")
        messages = await sub.drain()
    assert miss.code is Allocation.WAITING and miss.queue_position == 1
    assert again.code is Allocation.ALREADY_WAITING
    assert ready.code is NodeStatusOutcome.READY
    assert [(s.user_id, s.node_id, s.waited_ms) for s in ready.served] == [("u1", "n1", 42_000)]
    assert messages == [
        ("user:waiting", {"user_id": "u1"}),
        ("user:allocated", {"user_id": "u1", "node_id": "n1", "waited_ms": 42_000}),
    ]
    snap = await pool.snap()
    assert (snap.stat("connects"), snap.stat("misses"), snap.stat("hits")) == (1, 1, 0)
    assert snap.counts["waiting"] == 0 and snap.counts["allocated"] == 1


async def test_a_node_ready_by_a_clock_behind_the_miss_s_serves_a_wait_of_nothing(
    pool: PoolUnderTest,
) -> None:
    """Replicas stamp events by their own clocks: a node's ready applied by one a second behind
    the one that applied the miss serves the user after no wait, not a negative one."""
    await pool.scripts.allocate(pool.now, "u1")
    await pool.scripts.apply_node_status(pool.now - 1_000, "n1", "booting")
    ready = await pool.scripts.apply_node_status(pool.now - 1_000, "n1", "ready")
    assert [(s.user_id, s.node_id, s.waited_ms) for s in ready.served] == [("u1", "n1", 0)]
    snap = await pool.snap()
    assert (snap.stat("served_after_wait"), snap.stat("wait_ms_total")) == (1, 0)


async def test_waiting_users_are_served_oldest_first(pool: PoolUnderTest) -> None:
    for user in ("u1", "u2", "u3"):
        await pool.scripts.allocate(pool.now, user)
        pool.clock.advance(1000)
    await pool.boot("n1")
    await pool.boot("n2")
    assert await pool.alloc() == {"u1": "n1", "u2": "n2"}
    assert await pool.waiting_list() == ["u3"]


async def test_ready_nodes_are_handed_out_longest_idle_first(pool: PoolUnderTest) -> None:
    await pool.boot("old")
    pool.clock.advance(1000)
    await pool.boot("new")
    result = await pool.scripts.allocate(pool.now, "u1")
    assert result.node_id == "old"
    assert await pool.ready_list() == ["new"]


async def test_an_engaged_user_handed_a_node_is_engaged_no_more(pool: PoolUnderTest) -> None:
    """Engaged users are the heuristic's demand still to come; one who got a node is served,
    and counted on, they would keep a node booting for them until their events left the
    window."""
    await engage(pool, ("u1", "u2"), pool.config.window_ms)
    assert (await pool.snap()).counts["engaged"] == 2
    await pool.boot("n1")
    assert (await pool.scripts.allocate(pool.now, "u1")).code is Allocation.ALLOCATED
    assert (await pool.snap()).counts["engaged"] == 1


# --- release --------------------------------------------------------------------------------


async def test_disconnect_frees_the_node_to_the_ready_list(pool: PoolUnderTest) -> None:
    await pool.boot("n1")
    await pool.scripts.allocate(pool.now, "u1")
    pool.clock.advance(60_000)
    first = await pool.scripts.release(pool.now, "u1")
    again = await pool.scripts.release(pool.now, "u1")
    assert first.code is Release.RELEASED and first.node_id == "n1" and first.served == []
    assert again.code is Release.UNKNOWN
    node = await pool.node("n1")
    assert node["state"] == "ready" and node["idle_since_ms"] == str(pool.now)
    assert await pool.ready_list() == ["n1"]
    assert (await pool.snap()).stat("busy_ms_total") == 60_000


async def test_disconnect_hands_the_node_to_the_oldest_waiting_user(pool: PoolUnderTest) -> None:
    await pool.boot("n1")
    await pool.scripts.allocate(pool.now, "u1")
    await pool.scripts.allocate(pool.now, "u2")
    pool.clock.advance(5_000)
    async with Subscriber(pool.redis, "user:allocated") as sub:
        result = await pool.scripts.release(pool.now, "u1")
        messages = await sub.drain()
    assert [(s.user_id, s.node_id, s.waited_ms) for s in result.served] == [("u2", "n1", 5_000)]
    assert messages == [("user:allocated", {"user_id": "u2", "node_id": "n1", "waited_ms": 5000})]
    assert await pool.ready_list() == []


async def test_disconnect_of_a_waiting_user_abandons_the_queue(pool: PoolUnderTest) -> None:
    await pool.scripts.allocate(pool.now, "u1")
    await pool.scripts.allocate(pool.now, "u2")
    result = await pool.scripts.release(pool.now, "u1")
    assert result.code is Release.ABANDONED
    assert await pool.waiting_list() == ["u2"]
    await pool.boot("n1")
    assert await pool.alloc() == {"u2": "n1"}
    assert (await pool.snap()).stat("abandoned") == 1


async def test_a_waiting_user_who_leaves_the_queue_browses_afresh(pool: PoolUnderTest) -> None:
    """Activity while waiting is recorded; leaving the queue starts the window afresh, as the
    end of a session does: browsing after it is new browsing."""
    window = pool.config.window_ms
    await pool.scripts.allocate(pool.now, "u1")  # waits
    for offset in (2_000, 1_000, 0):
        await pool.scripts.record_activity(pool.now, "u1", pool.now - offset, window, 3, 100)
    assert (await pool.scripts.release(pool.now, "u1")).code is Release.ABANDONED
    assert await pool.redis.exists(pool.keys.acts("u1"), pool.keys.seen("u1")) == 0
    pool.clock.advance(1_000)
    after = await pool.scripts.record_activity(pool.now, "u1", pool.now, window, 3, 100)
    assert after.events_in_window == 1


async def test_the_queue_keeps_its_order_through_a_disconnect_and_a_crash(
    pool: PoolUnderTest,
) -> None:
    """The waiting queue is a sorted set by place in line, so a waiting user's disconnect is a
    ZREM (O(log n)) where a list's LREM read the whole queue; the order is what a list kept:
    the rest in line after a disconnect from the middle, a crashed node's user at the front."""
    await pool.boot("n1")
    await pool.scripts.allocate(pool.now, "held")
    for user in ("u1", "u2", "u3", "u4"):
        pool.clock.advance(1000)
        await pool.scripts.allocate(pool.now, user)
    assert (await pool.scripts.release(pool.now, "u2")).code is Release.ABANDONED
    await pool.scripts.apply_node_status(pool.now, "n1", "terminated")  # "held" goes first
    assert await pool.redis.type(pool.keys.key("waiting")) == "zset"
    assert await pool.waiting_list() == ["held", "u1", "u3", "u4"]
    for k in range(4):
        await pool.boot(f"m{k}")
    assert await pool.alloc() == {"held": "m0", "u1": "m1", "u3": "m2", "u4": "m3"}
    assert await check_invariants(pool.redis, pool.keys.pool) == []


async def test_the_longest_wait_is_found_behind_any_number_of_crashed_nodes_users(
    pool: PoolUnderTest,
) -> None:
    """Twelve nodes crash while two users wait: their users go to the front of the queue, the
    latest crash first. The snapshot read the first ten of the queue, all crashed nodes'
    users, and gave the longest wait as a minute less than the two had waited."""
    for k in range(12):
        await pool.boot(f"n{k}")
        await pool.scripts.allocate(pool.now, f"s{k}")
    pool.clock.advance(1_000)
    for user in ("w1", "w2"):
        await pool.scripts.allocate(pool.now, user)
    for k in range(12):
        pool.clock.advance(5_000)
        await pool.scripts.apply_node_status(pool.now, f"n{k}", "terminated")
    assert await pool.waiting_list() == [f"s{k}" for k in reversed(range(12))] + ["w1", "w2"]
    places = dict(await pool.redis.zrange(pool.keys.key("waiting"), 0, -1, withscores=True))
    assert places["s0"] == -1 and places["s11"] == -12 and places["w1"] == 1
    assert (await pool.snap()).counts["oldest_wait_ms"] == T0 + 1_000
    # the two served (a freed node goes to the front: the crashed nodes' users first) or gone
    for user in ("w1", "w2"):
        await pool.scripts.release(pool.now, user)
    assert (await pool.snap()).counts["oldest_wait_ms"] == T0 + 6_000  # s0's crash
    await pool.scripts.release(pool.now, "s0")
    assert (await pool.snap()).counts["oldest_wait_ms"] == T0 + 11_000
    assert await check_invariants(pool.redis, pool.keys.pool) == []


async def test_the_longest_wait_in_a_queue_an_older_release_numbered_is_read_as_it_read_it(
    pool: PoolUnderTest,
) -> None:
    """A replica of the release before (run beside this one through an upgrade) places a miss
    one past the last even below 0: five crashed nodes' users at -20..-16, then twelve misses
    at -15..-4. Reading only the ten nearest 0 on each side missed the crashed nodes' users,
    who waited longest; the queue's first ten, as that release read them, are read too."""
    waiting, since = pool.keys.key("waiting"), pool.keys.key("waiting_since")
    for k in range(15, 20):  # crashed at T0 + k + 1 s, the latest crash first in line
        await pool.redis.zadd(waiting, {f"c{k}": -(k + 1)})
        await pool.redis.hset(since, f"c{k}", T0 + (k + 1) * 1_000)
    for k in range(12):
        await pool.redis.zadd(waiting, {f"w{k}": -15 + k})
        await pool.redis.hset(since, f"w{k}", T0 + 80_000)
    assert (await pool.waiting_list())[:6] == ["c19", "c18", "c17", "c16", "c15", "w0"]
    assert (await pool.snap()).counts["oldest_wait_ms"] == T0 + 16_000  # c15's crash


async def _a_waiting_list_as_the_release_before_left_it(pool: PoolUnderTest) -> None:
    """Three users in the queue as releases up to 1f26912 kept it: a list, head first."""
    for k, user in enumerate(("a", "b", "c")):
        await pool.redis.rpush(pool.keys.key("waiting"), user)
        await pool.redis.hset(pool.keys.key("waiting_since"), user, pool.now + k)


async def test_a_waiting_list_left_by_the_release_before_is_taken_as_the_queue(
    pool: PoolUnderTest,
) -> None:
    """Read as it is (snapshot, users, check) until a script writes; the first that writes,
    whichever, converts it in order, once; then the users are served as they stood."""
    from provisioner.view import user_rows

    await _a_waiting_list_as_the_release_before_left_it(pool)
    assert (await pool.snap()).counts["waiting"] == 3
    waiting, _ = await user_rows(pool.redis, pool.keys.pool)
    assert [user for user, _ in waiting] == ["a", "b", "c"]
    assert await check_invariants(pool.redis, pool.keys.pool) == []
    await pool.scripts.heartbeat("r1", {}, 60_000)
    assert await pool.redis.type(pool.keys.key("waiting")) == "zset"
    assert await pool.waiting_list() == ["a", "b", "c"]
    assert (await pool.snap()).stat("waiting_list_converted") == 3
    await pool.scripts.allocate(pool.now, "d")
    await pool.scripts.release(pool.now, "b")
    for node in ("n1", "n2", "n3"):
        await pool.boot(node)
    assert await pool.alloc() == {"a": "n1", "c": "n2", "d": "n3"}
    assert (await pool.snap()).stat("waiting_list_converted") == 3
    assert await check_invariants(pool.redis, pool.keys.pool) == []


async def test_a_legacy_list_with_a_user_twice_converts_to_each_user_once(
    pool: PoolUnderTest,
) -> None:
    for user in ("a", "b", "a", "a"):
        await pool.redis.rpush(pool.keys.key("waiting"), user)
        await pool.redis.hset(pool.keys.key("waiting_since"), user, pool.now)
    await pool.scripts.heartbeat("r1", {}, 60_000)
    assert await pool.waiting_list() == ["a", "b"]
    assert (await pool.snap()).stat("waiting_list_converted") == 2  # users, not entries


@pytest.mark.parametrize("edge, score", [("tail", "inf"), ("tail", 2.0**53), ("tail", 1e300),
                                         ("head", "-inf"), ("head", -(2.0**53))])
async def test_a_place_written_by_hand_that_cannot_move_is_numbered_again(
    pool: PoolUnderTest, edge: str, score: float | str,
) -> None:
    """A place of inf, or beyond 2^53, gives back itself plus or minus one: every later user
    tied with it and was served by id. The queue is numbered again in its order instead."""
    await pool.boot("n1")
    await pool.scripts.allocate(pool.now, "held")
    for user in ("w1", "w2"):
        await pool.scripts.allocate(pool.now, user)
    edited = "w2" if edge == "tail" else "w1"
    await pool.redis.zadd(pool.keys.key("waiting"), {edited: score})
    for user in ("u9", "u10", "u2"):
        await pool.scripts.allocate(pool.now, user)
    await pool.scripts.apply_node_status(pool.now, "n1", "terminated")  # "held" goes first
    assert await pool.waiting_list() == ["held", "w1", "w2", "u9", "u10", "u2"]
    assert (await pool.snap()).stat("values_repaired") >= 1
    # numbered again on each side of 0: the crashed node's user (and a place written below 0)
    # before it, the rest after
    places = await pool.redis.zrange(pool.keys.key("waiting"), 0, -1, withscores=True)
    assert all(math.isfinite(p) and p != 0 and abs(p) < 10 for _, p in places), places
    assert dict(places)["held"] < 0 and dict(places)["u2"] > 0
    assert await check_invariants(pool.redis, pool.keys.pool) == []


async def test_a_queue_converted_between_its_type_and_its_read_is_read_all_the_same(
    pool: PoolUnderTest,
) -> None:
    """`check` and `users` read the queue's type, then the queue: a script that converts the
    old list in between (once, at the upgrade) must not fail them with WRONGTYPE."""
    from provisioner.view import waiting_users

    await _a_waiting_list_as_the_release_before_left_it(pool)
    real_type = pool.redis.type

    async def type_then_convert(key: str) -> str:
        found = await real_type(key)
        await pool.scripts.heartbeat("r1", {}, 60_000)  # converts it now
        return found

    pool.redis.type = type_then_convert  # type: ignore[method-assign]
    try:
        assert await waiting_users(pool.redis, pool.keys) == ["a", "b", "c"]
    finally:
        pool.redis.type = real_type  # type: ignore[method-assign]
    assert await pool.redis.type(pool.keys.key("waiting")) == "zset"


async def test_a_refused_script_leaves_the_old_waiting_list_as_it_was(
    pool: PoolUnderTest,
) -> None:
    """Conversion comes after every key's type has passed: a script refused for another key
    writes nothing, the old list included."""
    await _a_waiting_list_as_the_release_before_left_it(pool)
    await pool.redis.set(pool.keys.key("model"), "not a hash")
    with pytest.raises(ResponseError, match="WRONGTYPE pool key"):
        await pool.scripts.allocate(pool.now, "d")
    assert await pool.redis.type(pool.keys.key("waiting")) == "list"
    assert await pool.redis.lrange(pool.keys.key("waiting"), 0, -1) == ["a", "b", "c"]


async def test_the_queue_cost_benchmark_times_disconnects_and_misses(
        redis_url: str, aredis: aioredis.Redis) -> None:
    """`bench queue-cost` loads the queue as the scripts keep it (each timed disconnect is of a
    user it finds waiting, or it stops) and leaves nothing behind."""
    from provisioner.bench.queuecost import measure

    await aredis.script_flush()  # as on a new server: the scripts not loaded yet
    cost = await measure(redis_url, 500, calls=20, pool_name="queuecost-test")
    assert cost.waiting == 500 and cost.disconnect_us > 0 and cost.miss_us > 0
    # each figure is over the calls timed, not a failed NOSCRIPT first call besides
    assert (cost.disconnect_calls, cost.miss_calls) == (20, 20)
    assert cost.server.split()[0] in ("redis", "valkey")
    assert await aredis.keys("prov:{queuecost-test}:*") == []


async def _alice_moved_by_a_marked_batch(pool: PoolUnderTest,
                                         seq: int) -> tuple[list[Call[Any]], list[Any]]:
    """n1 and n2 ready, alice on n1, then her disconnect and connect marked `r1:a1:seq` and the
    next seq, run once (she moves to n2): the calls, to make again, and their results."""
    for node in ("n1", "n2"):
        await pool.boot(node)
    await pool.scripts.allocate(pool.now, "alice")  # n1
    batch: list[Call[Any]] = [
        pool.scripts.release_call(pool.now, "alice", mark=f"r1:a1:{seq}"),
        pool.scripts.allocate_call(pool.now, "alice", "r1", mark=f"r1:a1:{seq + 1}")]
    first = [await pool.scripts.run(call) for call in batch]
    assert [r.code for r in first] == [Release.RELEASED, Allocation.ALLOCATED]
    return batch, first


async def test_a_connect_or_disconnect_made_again_under_its_mark_changes_nothing(
    pool: PoolUnderTest,
) -> None:
    """A replica's call made again after a lost reply carries the first try's mark: applied
    once. Without the marks, alice's disconnect and connect made again end the session the
    first try began and begin one on the other node."""
    batch, first = await _alice_moved_by_a_marked_batch(pool, 7)
    after_first = await pool.dump()
    again = [await pool.scripts.run(call) for call in batch]
    assert [r.code for r in again] == [Release.MADE_AGAIN, Allocation.MADE_AGAIN]
    assert again[1].node_id == first[1].node_id == "n2"
    now = await pool.dump()
    assert int(now["stats"].pop("calls_made_again")) == 2
    assert now == after_first
    # seqs 1-6 of a1 were passed over on the way to 7 (none was sent here)
    assert await pool.redis.hgetall(pool.keys.key("applied")) == {"r1": "a1:8:1-6"}


async def test_a_mark_is_compared_only_within_its_batch(pool: PoolUnderTest) -> None:
    """Another batch of the same replica (or a restart under its id) counts afresh; an earlier
    mark of the same batch has run; an operator's release carries none; a bad mark is
    refused."""
    await pool.boot("n1")
    allocate = pool.scripts.allocate_call
    assert (await pool.scripts.run(allocate(pool.now, "u1", "r1", mark="r1:a1:5"))).code \
        is Allocation.ALLOCATED
    assert (await pool.scripts.run(pool.scripts.release_call(pool.now, "u1", mark="r1:b2:1"))
            ).code is Release.RELEASED  # another batch: b2 begins at 1
    assert (await pool.scripts.run(allocate(pool.now, "u1", "r1", mark="r1:a1:9"))).code \
        is Allocation.ALLOCATED  # a1 again, after b2: not compared, so applied
    assert (await pool.scripts.run(allocate(pool.now, "u2", "r2", mark="r2:c3:1"))).code \
        is Allocation.WAITING  # another replica's marks are its own
    assert (await pool.scripts.run(pool.scripts.release_call(pool.now, "u2", mark="r2:c3:1"))
            ).code is Release.MADE_AGAIN
    assert (await pool.scripts.release(pool.now, "u1", by="ops")).code is Release.RELEASED
    assert await pool.redis.hgetall(pool.keys.key("applied")) == {"r1": "a1:9:1-8",
                                                                  "r2": "c3:1"}
    before = await pool.dump()
    # a1's seq 3 was passed over on the way to 9 (refused while 9 ran): it never ran
    with pytest.raises(ResponseError, match="PASSED OVER call r1:a1:3"):
        await pool.scripts.run(allocate(pool.now, "u3", "r1", mark="r1:a1:3"))
    assert await pool.dump() == before
    with pytest.raises(ResponseError, match="bad call mark"):
        await pool.scripts.run(allocate(pool.now, "u3", "r1", mark="r1:9"))
    assert await pool.dump() == before


async def test_disconnect_of_an_unknown_user_changes_nothing(pool: PoolUnderTest) -> None:
    await pool.boot("n1")
    before = await pool.dump()
    result = await pool.scripts.release(pool.now, "nobody")
    assert result.code is Release.UNKNOWN
    assert await pool.dump() == before


async def test_an_operator_s_release_does_what_a_disconnect_does_and_is_logged(
    pool: PoolUnderTest,
) -> None:
    async def releases() -> list[dict[str, str]]:
        return [fields for _, fields in await pool.redis.xrange(pool.keys.key("decisions"))
                if fields.get("kind") == "release"]

    await pool.boot("n1")
    await pool.boot("n2")
    for user in ("u1", "u2", "u3", "u4"):  # u3 and u4 wait
        await pool.scripts.allocate(pool.now, user)
    await pool.scripts.allocate(pool.now, "u5")  # waits behind them
    pool.clock.advance(90_000)
    # A disconnect, as ever, logs nothing: u2's node goes to u3.
    assert (await pool.scripts.release(pool.now, "u2")).served[0].user_id == "u3"
    assert await releases() == []

    freed = await pool.scripts.release(pool.now, "u1", by="alice")
    left = await pool.scripts.release(pool.now, "u5", by="alice")
    again = await pool.scripts.release(pool.now, "u1", by="alice")
    assert freed.code is Release.RELEASED and freed.served[0].user_id == "u4"
    assert left.code is Release.ABANDONED and again.code is Release.UNKNOWN
    logged = await releases()
    assert [(e["replica"], e["reason"]) for e in logged] == [
        ("alice", "user u1 released by alice: node n1 freed after a session of 90s, to waiting "
                  "user u4"),
        ("alice", "user u5 released by alice: left the waiting queue after 90s")]
    snap = await pool.snap()
    assert snap.stat("operator_releases") == 2 and snap.stat("releases") == 2
    assert await pool.alloc() == {"u3": "n2", "u4": "n1"} and await pool.waiting_list() == []

    # What the operator confirmed must still hold: u3 holds n2, not n1, and does not wait.
    for expected in ("node:n1", "waiting", "nothing"):
        changed = await pool.scripts.release(pool.now, "u3", by="alice", expected=expected)
        assert (changed.code, changed.node_id) == (Release.CHANGED, "n2")
    assert await pool.alloc() == {"u3": "n2", "u4": "n1"}
    assert len(await releases()) == 2
    held = await pool.scripts.release(pool.now, "u3", by="alice", expected="node:n2")
    assert held.code is Release.RELEASED
    assert (await pool.scripts.release(pool.now, "u3", by="alice",
                                       expected="nothing")).code is Release.UNKNOWN
    await pool.scripts.allocate(pool.now, "u3")  # takes n2 back

    # Freed to nobody waiting: back to the ready list.
    pool.clock.advance(1_000)
    await pool.scripts.release(pool.now, "u4", by="bob")
    assert (await releases())[-1]["reason"] == ("user u4 released by bob: node n1 freed after a "
                                                "session of 1s, back to the ready list")
    assert await pool.ready_list() == ["n1"]


async def test_the_snapshot_gives_the_longest_wait_a_crash_requeue_put_behind(
    pool: PoolUnderTest,
) -> None:
    """The front of the queue waited the longest, but for a crashed node's user put there with
    the time of the crash: the snapshot takes the earliest start among the first ten."""
    assert (await pool.snap()).counts["oldest_wait_ms"] == 0
    await pool.boot("n1")
    await pool.scripts.allocate(pool.now, "held")
    pool.clock.advance(1_000)
    await pool.scripts.allocate(pool.now, "u1")
    pool.clock.advance(1_000)
    await pool.scripts.allocate(pool.now, "u2")
    pool.clock.advance(5_000)
    await pool.scripts.apply_node_status(pool.now, "n1", "terminated")  # "held" to the front
    assert await pool.waiting_list() == ["held", "u1", "u2"]
    snap = await pool.snap()
    assert snap.counts["oldest_wait_ms"] == T0 + 1_000
    assert snap.longest_wait_s(T0 + 61_000) == 60.0
    await pool.boot("m1")  # to "held"
    await pool.boot("m2")  # to "u1"
    assert (await pool.snap()).counts["oldest_wait_ms"] == T0 + 2_000
    await pool.scripts.release(pool.now, "u2")
    assert (await pool.snap()).counts["oldest_wait_ms"] == 0


async def test_the_sessions_follow_every_allocation_and_give_the_longest(
    pool: PoolUnderTest,
) -> None:
    async def sessions() -> dict[str, float]:
        return dict(await pool.redis.zrange(pool.keys.key("sessions"), 0, -1, withscores=True))

    assert (await pool.snap()).counts["oldest_session_ms"] == 0
    await pool.boot("n1")
    await pool.boot("n2")
    await pool.scripts.allocate(pool.now, "u1")
    pool.clock.advance(1_000)
    await pool.scripts.allocate(pool.now, "u2")
    await pool.scripts.allocate(pool.now, "u3")  # waits: no session yet
    assert await sessions() == {"u1": T0, "u2": T0 + 1_000}
    assert (await pool.snap()).counts["oldest_session_ms"] == T0
    pool.clock.advance(1_000)
    await pool.scripts.release(pool.now, "u1")  # n1 goes to u3
    assert await sessions() == {"u2": T0 + 1_000, "u3": T0 + 2_000}
    await pool.scripts.apply_node_status(pool.now, "n2", "terminated")  # under u2: requeued
    assert await sessions() == {"u3": T0 + 2_000}
    assert (await pool.snap()).counts["oldest_session_ms"] == T0 + 2_000
    await pool.scripts.release(pool.now, "u3", by="ops")
    await pool.scripts.release(pool.now, "u2")  # leaves the queue
    assert await sessions() == {} and (await pool.snap()).counts["oldest_session_ms"] == 0
    assert await check_invariants(pool.redis, pool.keys.pool) == []


async def test_a_counter_broken_by_hand_starts_again_and_the_transition_applies(
    pool: PoolUnderTest,
) -> None:
    await pool.boot("n1")
    await pool.redis.hset(pool.keys.key("stats"), mapping={"connects": "abc", "hits": "1e999"})
    result = await pool.scripts.allocate(pool.now, "u1")
    assert result.code is Allocation.ALLOCATED
    snap = await pool.snap()
    assert (snap.stat("connects"), snap.stat("hits"), snap.stat("values_repaired")) == (1, 1, 2)
    await pool.scripts.allocate(pool.now, "u2")
    assert (await pool.snap()).stat("connects") == 2


# --- drain ----------------------------------------------------------------------------------


async def drains(pool: PoolUnderTest) -> list[tuple[str, str]]:
    return [(fields["replica"], fields["reason"])
            for _, fields in await pool.redis.xrange(pool.keys.key("decisions"))
            if fields.get("kind") == "drain"]


async def test_a_drained_ready_or_booting_node_terminates_and_the_next_reap_sends_its_delete(
        pool: PoolUnderTest) -> None:
    """Out of the pool at once (never handed out after), its DELETE due now: the next
    reap_idle of any replica sends it as `drained`, counted once, and a retry after that is
    a retry. The floor then wants a replacement."""
    config = PoolConfig(scaling_policy="heuristic", min_ready=2, idle_timeout_s=600)
    await pool.boot("n1")
    await pool.boot("n2")
    await pool.scripts.apply_node_status(pool.now, "n3", "booting")
    ready = await pool.scripts.drain_node(pool.now, "n1", "alice", expected="ready")
    booting = await pool.scripts.drain_node(pool.now, "n3", "alice")
    assert (ready.code, ready.state, ready.user) == (Drain.DRAINING, "ready", "")
    assert (booting.code, booting.state) == (Drain.DRAINING, "booting")
    for node in ("n1", "n3"):
        record = await pool.node(node)
        assert (record["state"], record["term_reason"]) == ("terminating", "drained")
        assert "delete_attempts" not in record
    assert await pool.ready_list() == ["n2"]
    assert await pool.redis.zrange(pool.keys.key("booting"), 0, -1) == []
    served = await pool.scripts.allocate(pool.now, "u1")
    assert served.node_id == "n2"

    reaped = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert sorted((t.node_id, t.reason) for t in reaped) == [("n1", "drained"),
                                                              ("n3", "drained")]
    assert (await pool.node("n1"))["delete_attempts"] == "1"
    entries = await pool.redis.xrange(pool.keys.key("decisions"))
    assert "retry 0, drained 2, idle 0" in entries[-1][1]["reason"]
    pool.clock.advance(int(config.delete_timeout_s * 1000) + 1)
    again = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert sorted((t.node_id, t.reason) for t in again) == [("n1", "retry"), ("n3", "retry")]
    assert (await pool.node("n1"))["delete_attempts"] == "2"
    decision = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
    assert len(decision.reservations) == 2  # the floor of 2 ready: n2 is in a session
    assert await drains(pool) == [
        ("alice", "node n1 drained by alice: was ready; its DELETE is sent by the next replica "
                  "to tick"),
        ("alice", "node n3 drained by alice: was booting; its DELETE is sent by the next "
                  "replica to tick")]
    assert (await pool.snap()).stat("operator_drains") == 2
    assert await check_invariants(pool.redis, pool.keys.pool) == []


async def test_a_replace_s_hold_raises_the_target_and_keep_level_while_its_lease_lasts(
        pool: PoolUnderTest) -> None:
    """hold_spare: `provisioner replace` holds spare above the keep level, so that a batch it
    drains was booted first. A pool at its floor of one ready node: held 1 more, the tick
    boots one and the reaper keeps both; renewed only by the run that holds it; let go (or
    its lease over, by the server's clock), the target is the floor again and the extra node
    the reaper's, with no peak of the hold kept. The target's moves count the forecast's."""
    config = PoolConfig(scaling_policy="heuristic", min_ready=1, idle_timeout_s=60)
    await pool.boot("n1")
    decision = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
    assert decision.reservations == []
    assert await pool.scripts.hold_spare(pool.now, "take", "run1", 1, 30_000) == (Hold.HELD, "")
    pool.clock.advance(1_000)
    decision = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
    assert len(decision.reservations) == 1
    assert "1 held above the keep level 1 while nodes are replaced" in decision.reason
    assert (decision.numbers["keep"], decision.numbers["held"]) == (2, 1)
    await pool.scripts.register_node(pool.now, decision.reservations[0], "n2")
    await pool.scripts.apply_node_status(pool.now, "n2", "ready")
    pool.clock.advance(120_000)  # both idle past the timeout; the lease (30 s) is over
    assert await pool.scripts.hold_spare(pool.now, "renew", "run2", 1, 30_000) == (
        Hold.TAKEN_BACK, "run1")
    assert await pool.scripts.hold_spare(pool.now, "renew", "run1", 1, 30_000) == (
        Hold.HELD, "run1")
    reaped = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert reaped == []  # held: the keep level is 2
    assert await pool.scripts.hold_spare(pool.now, "release", "run2") == (Hold.NOT_HELD, "run1")
    assert await pool.scripts.hold_spare(pool.now, "release", "") == (Hold.RELEASED, "run1")
    assert await pool.scripts.hold_spare(pool.now, "renew", "run1", 1, 30_000) == (
        Hold.TAKEN_BACK, "")
    pool.clock.advance(1_000)  # the keep window holds no peak of the hold
    decision = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
    assert "held" not in decision.reason and "held" not in decision.numbers
    reaped = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert [t.reason for t in reaped] == ["idle"]
    stats = (await pool.snap())
    assert (stats.stat("target_raised"), stats.stat("target_lowered")) == (1, 0)
    # a lease that is over holds nothing: the key ends with it, by the server's clock
    assert await pool.scripts.hold_spare(pool.now, "take", "run3", 2, 200) == (Hold.HELD, "")
    await asyncio.sleep(0.3)
    assert await pool.redis.get(pool.keys.key("replacing")) is None
    decision = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
    assert "held" not in decision.reason and decision.reservations == []
    # nor does a value no run wrote (an edit by hand)
    for edit in ("2", "2:x:run", f"x:{pool.now + 60_000}:run", f"-2:{pool.now + 60_000}:r",
                 "9" * 400 + f":{pool.now + 60_000}:r",  # inf: every tick stopped (a review)
                 "9" * 300 + f":{pool.now + 60_000}:r"):  # 1e300: a target of -2^63 (a review)
        await pool.redis.set(pool.keys.key("replacing"), edit)
        decision = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
        assert "held" not in decision.reason and decision.reservations == [], edit
        pool.clock.advance(1_000)
    assert await check_invariants(pool.redis, pool.keys.pool) == []


async def test_the_spare_is_held_above_a_recent_peak_and_a_run_holding_none_drains_nothing(
        pool: PoolUnderTest) -> None:
    """A review: held above the target alone, a recent peak at or over target + extra took
    the hold in, and the first batch went with nothing booted in its place. It is held above
    the keep level. And a run's drain is refused once it holds no spare (--cancel)."""
    await pool.boot("n1")
    for floor in (3, 1):  # a peak of 3 within the keep window, the target 1 now
        decision = await pool.scripts.scale_decide(
            PoolConfig(scaling_policy="heuristic", min_ready=floor).policy_args(pool.now, "r1"))
        pool.clock.advance(1_000)
    await pool.scripts.hold_spare(pool.now, "take", "run1", 1, 30_000)
    decision = await pool.scripts.scale_decide(
        PoolConfig(scaling_policy="heuristic", min_ready=1).policy_args(pool.now, "r1"))
    assert (decision.numbers["target"], decision.numbers["keep"]) == (4, 4), decision.reason
    assert "1 held above the keep level 3 while nodes are replaced" in decision.reason
    # the target's moves count the forecast's alone (a review: less the spare held alone,
    # the peak's lift counted as a fall at every decision of the hold)
    moves = (await pool.snap()).stat("target_raised"), (await pool.snap()).stat("target_lowered")
    for _ in range(3):
        pool.clock.advance(1_000)
        await pool.scripts.scale_decide(
            PoolConfig(scaling_policy="heuristic", min_ready=1).policy_args(pool.now, "r1"))
    snap = await pool.snap()
    assert (snap.stat("target_raised"), snap.stat("target_lowered")) == moves == (3, 2)
    drained = await pool.scripts.drain_node(pool.now, "n1", "op (replace)", run="run2")
    # the refusal names the run that holds it, which `replace` says it was taken over by
    assert (drained.code, drained.state, drained.user) == (Drain.NOT_HELD, "ready", "run1")
    assert await pool.scripts.hold_spare(pool.now, "release", "") == (Hold.RELEASED, "run1")
    drained = await pool.scripts.drain_node(pool.now, "n1", "op (replace)", run="run1")
    assert (drained.code, drained.user) == (Drain.NOT_HELD, "")
    assert await pool.ready_list() == ["n1"]


async def test_the_last_batch_s_drains_take_the_hold_down_and_keep_does_not_raise_it(
        pool: PoolUnderTest) -> None:
    """drain_node's `last`: the hold booted the last batch's replacements before it went;
    held on after it, it asked for as many again. Each node of the last batch that drains
    lowers the hold by one, not below 0, its lease as it was; a drain that is refused, or
    a mark of a node in a session, lowers nothing. `keep` renews what is held; `renew` and
    `take` ask again."""
    config = PoolConfig(scaling_policy="heuristic", min_ready=1)
    for node in ("n1", "n2", "n3", "n4"):
        await pool.boot(node)
    await pool.scripts.allocate(pool.now, "u1")  # n1
    key = pool.keys.key("replacing")
    assert await pool.scripts.hold_spare(pool.now, "take", "run1", 2, 30_000) == (Hold.HELD, "")
    lease = await pool.redis.pttl(key)

    async def extra() -> int:
        return int((await pool.redis.get(key)).split(":")[0])

    refused = await pool.scripts.drain_node(pool.now, "n2", "op (replace)",
                                            expected="allocated:u9", run="run1", last=True)
    other = await pool.scripts.drain_node(pool.now, "n2", "op (replace)", run="run2", last=True)
    mark = await pool.scripts.drain_node(pool.now, "n1", "op (replace)", run="run1", last=True)
    assert (refused.code, other.code, mark.code) == (Drain.CHANGED, Drain.NOT_HELD, Drain.MARKED)
    plain = await pool.scripts.drain_node(pool.now, "n2", "op (replace)", run="run1")
    assert plain.code is Drain.DRAINING and await extra() == 2  # not of the last batch
    for node, left in (("n3", 1), ("n4", 0)):
        drained = await pool.scripts.drain_node(pool.now, node, "op (replace)", run="run1",
                                                last=True)
        assert drained.code is Drain.DRAINING and await extra() == left, node
    await pool.boot("n5")
    drained = await pool.scripts.drain_node(pool.now, "n5", "op (replace)", run="run1",
                                            last=True)
    assert drained.code is Drain.DRAINING and await extra() == 0  # not below 0
    assert lease - 100 <= await pool.redis.pttl(key) <= lease  # the lease as it was
    decision = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
    assert "held" not in decision.reason and "held" not in decision.numbers
    assert await pool.scripts.hold_spare(pool.now, "keep", "run1", 2, 30_000) == (
        Hold.HELD, "run1")
    assert await extra() == 0  # still the run's: its marks are taken, its cancel finds it
    assert await pool.scripts.hold_spare(pool.now, "keep", "run2", 2, 30_000) == (
        Hold.TAKEN_BACK, "run1")
    # an old node back to go (a session's node freed before its mark): renewed at 2 again
    assert await pool.scripts.hold_spare(pool.now, "renew", "run1", 2, 30_000) == (
        Hold.HELD, "run1")
    assert await extra() == 2
    assert await pool.scripts.hold_spare(pool.now, "take", "run2", 1, 30_000) == (
        Hold.HELD, "run1")
    assert await extra() == 1
    assert await pool.scripts.hold_spare(pool.now, "keep", "run2", 2, 30_000) == (
        Hold.HELD, "run2")
    assert await extra() == 1  # keep: no higher


@pytest.mark.parametrize("args", [("take", "run", 0, 1000), ("take", "", 1, 1000),
                                  ("take", "a:b", 1, 1000), ("take", "run", 1, 0),
                                  ("hold", "run", 1, 1000), ("take", "run", 10**6 + 1, 1000)],
                         ids=["no extra", "no run", "a colon in the run", "no lease", "a mode",
                              "an extra past any count"])
async def test_a_hold_the_script_cannot_read_is_refused_and_writes_nothing(
        pool: PoolUnderTest, args: tuple[str, str, int, int]) -> None:
    mode, run, extra, lease = args
    with pytest.raises(ResponseError, match="hold_spare"):
        await pool.scripts.hold_spare(pool.now, mode, run, extra, lease)
    assert await pool.redis.get(pool.keys.key("replacing")) is None


async def test_a_second_release_of_any_run_s_hold_finds_nothing(pool: PoolUnderTest) -> None:
    """`replace --cancel` lets go of any run's hold (run ''): a second finds nothing, as the
    script's idempotency says, and does not claim it let go of a hold."""
    assert await pool.scripts.hold_spare(pool.now, "release", "") == (Hold.NOT_HELD, "")
    await pool.scripts.hold_spare(pool.now, "take", "run1", 1, 30_000)
    assert await pool.scripts.hold_spare(pool.now, "release", "") == (Hold.RELEASED, "run1")
    assert await pool.scripts.hold_spare(pool.now, "release", "") == (Hold.NOT_HELD, "")


async def test_the_largest_hold_the_script_takes_is_one_it_reads(pool: PoolUnderTest) -> None:
    """An extra of 1000000 (HOLD_MAX) is taken: it must be read back as the run's, or the run
    is told its hold was taken back at its first renewal."""
    assert await pool.scripts.hold_spare(pool.now, "take", "run1", 10**6, 30_000) == (
        Hold.HELD, "")
    assert await pool.scripts.hold_spare(pool.now, "renew", "run1", 10**6, 30_000) == (
        Hold.HELD, "run1")


async def test_a_drained_node_in_a_session_ends_with_the_session_not_back_to_the_pool(
        pool: PoolUnderTest) -> None:
    """The session goes on; its disconnect terminates the node (its DELETE due at once)
    instead of handing it to the user waiting or putting it on the ready list."""
    await pool.boot("n1")
    await pool.scripts.allocate(pool.now, "u1")
    await pool.scripts.allocate(pool.now, "u2")  # waits
    marked = await pool.scripts.drain_node(pool.now, "n1", "alice", expected="allocated:u1")
    twice = await pool.scripts.drain_node(pool.now, "n1", "bob")
    assert (marked.code, marked.state, marked.user) == (Drain.MARKED, "allocated", "u1")
    assert (twice.code, twice.state, twice.user) == (Drain.NOTHING, "allocated", "u1")
    assert (await pool.node("n1"))["drain_by"] == "alice"  # the first's
    assert await pool.alloc() == {"u1": "n1"}
    pool.clock.advance(60_000)
    freed = await pool.scripts.release(pool.now, "u1")
    assert (freed.code, freed.node_id, freed.served) == (Release.DRAINED, "n1", [])
    record = await pool.node("n1")
    assert (record["state"], record["term_reason"], record["user"]) == (
        "terminating", "drained", "")
    assert await pool.ready_list() == [] and await pool.waiting_list() == ["u2"]
    assert await pool.alloc() == {}
    snap = await pool.snap()
    assert snap.stat("releases") == 1 and snap.stat("operator_drains") == 1
    assert await drains(pool) == [
        ("alice", "node n1 drained by alice: terminated when the session of user u1 ends"),
        ("alice", "node n1 terminated after the session of user u1, drained by alice")]
    reaped = await pool.scripts.reap_idle(PoolConfig().policy_args(pool.now, "r1"))
    assert ("n1", "drained") in [(t.node_id, t.reason) for t in reaped]
    assert await check_invariants(pool.redis, pool.keys.pool) == []


async def test_a_node_drained_at_once_sends_its_user_back_to_the_head_of_the_queue(
        pool: PoolUnderTest) -> None:
    """As when a node dies: the user goes back first in line, served at once by a ready
    node, with user:allocated published."""
    await pool.boot("n1")
    await pool.scripts.allocate(pool.now, "u1")
    await pool.scripts.allocate(pool.now, "u2")  # waits
    await pool.boot("n2")  # goes to u2
    await pool.scripts.allocate(pool.now, "u3")  # waits
    async with Subscriber(pool.redis, "user:allocated") as sub:
        await pool.boot("n3")  # goes to u3
        await pool.scripts.allocate(pool.now, "u4")  # waits
        now = await pool.scripts.drain_node(pool.now, "n1", "alice", at_once=True)
        messages = await sub.drain()
    assert (now.code, now.state, now.user) == (Drain.DRAINING, "allocated", "u1")
    assert [(s.user_id, s.node_id) for s in now.served] == []  # no node ready: u1 waits first
    assert await pool.waiting_list() == ["u1", "u4"]
    assert [m[1]["user_id"] for m in messages] == ["u3"]
    record = await pool.node("n1")
    assert (record["state"], record["user"]) == ("terminating", "")
    await pool.boot("n4")
    assert (await pool.alloc())["u1"] == "n4"  # first in line
    assert await drains(pool) == [
        ("alice", "node n1 drained by alice: the session of user u1 ended, the user back at the "
                  "head of the queue")]
    assert (await pool.snap()).stat("requeued") == 1
    assert await check_invariants(pool.redis, pool.keys.pool) == []


async def test_a_drain_of_a_node_in_a_session_can_be_taken_back(pool: PoolUnderTest) -> None:
    """Taken back, the node goes back to the pool when its session ends, as any; a node
    terminating already, or one never marked, is not brought back."""
    await pool.boot("n1")
    await pool.boot("n2")
    await pool.scripts.allocate(pool.now, "u1")  # n1
    await pool.scripts.drain_node(pool.now, "n1", "alice")
    await pool.scripts.drain_node(pool.now, "n2", "alice")  # ready: terminating at once
    back = await pool.scripts.drain_node(pool.now, "n1", "bob", cancel=True)
    assert (back.code, back.state, back.user) == (Drain.CANCELLED, "allocated", "u1")
    assert "drain_by" not in await pool.node("n1")
    for node in ("n1", "n2", "ghost"):  # n1 no longer marked
        nothing = await pool.scripts.drain_node(pool.now, node, "bob", cancel=True)
        assert nothing.code is Drain.NOTHING, node
    assert (await pool.node("n2"))["state"] == "terminating"
    freed = await pool.scripts.release(pool.now, "u1")
    assert freed.code is Release.RELEASED and await pool.ready_list() == ["n1"]
    assert (await drains(pool))[-1] == (
        "bob", "the drain of node n1 taken back by bob: it goes back to the pool when the "
               "session of user u1 ends")
    assert (await pool.snap()).stat("operator_drains") == 2
    assert await check_invariants(pool.redis, pool.keys.pool) == []


async def test_a_mark_an_earlier_release_left_on_a_node_it_freed_can_be_taken_back(
        pool: PoolUnderTest) -> None:
    """A replica of the release before frees a marked node at its session's end and leaves
    the mark (a review): taken back, the node stays in the pool; left, its next session's
    end terminates it."""
    await pool.boot("n1")
    await pool.scripts.allocate(pool.now, "u1")
    await pool.scripts.drain_node(pool.now, "n1", "alice")
    # The release before's release.lua: freed, back to the ready list, the mark left.
    await pool.redis.hdel(pool.keys.key("alloc"), "u1")
    await pool.redis.zrem(pool.keys.key("sessions"), "u1")
    await pool.redis.hset(pool.keys.node("n1"), mapping={"state": "ready", "user": "",
                                                         "idle_since_ms": pool.now})
    await pool.redis.rpush(pool.keys.key("ready"), "n1")
    back = await pool.scripts.drain_node(pool.now, "n1", "bob", cancel=True)
    assert (back.code, back.state, back.user) == (Drain.CANCELLED, "ready", "")
    assert "drain_by" not in await pool.node("n1")
    assert (await drains(pool))[-1] == ("bob", "the drain of node n1 taken back by bob: it "
                                               "stays in the pool")
    await pool.scripts.allocate(pool.now, "u2")
    assert (await pool.scripts.release(pool.now, "u2")).code is Release.RELEASED
    assert await pool.ready_list() == ["n1"]


async def test_a_drained_node_s_delete_is_due_by_any_replica_s_clock(
        pool: PoolUnderTest) -> None:
    """The drain is stamped by the operator's clock, the reap by a replica's: a CLI host five
    minutes ahead held the DELETE back five minutes (a review). Its first DELETE is due at
    once by any clock, after the drain as after the session it waited for; a retry waits
    for the replica's own deadline."""
    config = PoolConfig()
    await pool.boot("n1")
    await pool.boot("n2")
    await pool.scripts.allocate(pool.now, "u1")  # n1
    ahead = pool.now + 300_000
    await pool.scripts.drain_node(ahead, "n2", "alice")
    await pool.scripts.drain_node(ahead, "n1", "alice")
    await pool.scripts.release(ahead, "u1", by="alice")
    reaped = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert sorted((t.node_id, t.reason) for t in reaped) == [("n1", "drained"),
                                                              ("n2", "drained")]
    assert await pool.scripts.reap_idle(config.policy_args(pool.now, "r1")) == []


async def test_a_drain_refuses_a_session_begun_on_the_node_since_it_was_shown(
        pool: PoolUnderTest) -> None:
    """The operator saw u1's session on n1; u1 left and came back to n1 while the prompt
    waited: `--now` must not end the new session. A boot shown booting and ready since,
    handed to no one, is drained all the same."""
    await pool.boot("n1")
    await pool.scripts.allocate(pool.now, "u1")
    began = int(await pool.redis.zscore(pool.keys.key("sessions"), "u1"))
    pool.clock.advance(1000)
    await pool.scripts.release(pool.now, "u1")
    await pool.scripts.allocate(pool.now, "u1")  # n1 again, a new session
    changed = await pool.scripts.drain_node(pool.now, "n1", "alice", expected="allocated:u1",
                                           at_once=True, session_ms=began)
    assert (changed.code, changed.state) == (Drain.CHANGED, "allocated")
    assert await pool.alloc() == {"u1": "n1"}
    now_began = int(await pool.redis.zscore(pool.keys.key("sessions"), "u1"))
    ended = await pool.scripts.drain_node(pool.now, "n1", "alice", expected="allocated:u1",
                                          at_once=True, session_ms=now_began)
    assert ended.code is Drain.DRAINING
    await pool.scripts.apply_node_status(pool.now, "n2", "booting")
    await pool.scripts.apply_node_status(pool.now, "n2", "ready")  # goes to u1, waiting
    await pool.scripts.apply_node_status(pool.now, "n3", "booting")
    await pool.scripts.apply_node_status(pool.now, "n3", "ready")
    ready = await pool.scripts.drain_node(pool.now, "n3", "alice", expected="booting")
    assert (ready.code, ready.state) == (Drain.DRAINING, "ready")


async def test_a_drain_of_a_node_not_in_the_state_confirmed_or_not_drainable_does_nothing(
        pool: PoolUnderTest) -> None:
    await pool.boot("n1")
    await pool.scripts.allocate(pool.now, "u1")
    await pool.boot("n2")
    before = await pool.dump()
    for node, expected, code, state in (
            ("n1", "ready", Drain.CHANGED, "allocated"),
            ("n1", "allocated:u9", Drain.CHANGED, "allocated"),
            ("n1", "booting", Drain.CHANGED, "allocated"),
            ("n2", "allocated:u1", Drain.CHANGED, "ready"),
            ("ghost", "ready", Drain.CHANGED, ""),
            ("ghost", "", Drain.NOTHING, "")):
        result = await pool.scripts.drain_node(pool.now, node, "alice", expected=expected)
        assert (result.code, result.state) == (code, state), (node, expected)
    assert await pool.dump() == before
    await pool.scripts.drain_node(pool.now, "n2", "alice")
    again = await pool.scripts.drain_node(pool.now, "n2", "alice")
    assert (again.code, again.state) == (Drain.NOTHING, "terminating")
    await pool.scripts.apply_node_status(pool.now, "n2", "terminated")
    gone = await pool.scripts.drain_node(pool.now, "n2", "alice")
    assert (gone.code, gone.state) == (Drain.NOTHING, "terminated")
    assert (await pool.snap()).stat("operator_drains") == 1


async def test_every_end_of_a_mark_takes_its_node_out_of_drains(pool: PoolUnderTest) -> None:
    """The forecast counts `drains` whole (ZCARD) and checks only DRAIN_CHECKS members a
    tick (policy.lua drained_in_session), so every script that ends a mark must take its node
    out: a cancel, the session's end, the node's death. A member left behind past the first
    checks is counted as a node that will free nothing, long after it went."""
    for node, user in (("n1", "u1"), ("n2", "u2"), ("n3", "u3")):
        await pool.boot(node)
        await pool.scripts.allocate(pool.now, user)
        marked = await pool.scripts.drain_node(pool.now, node, "alice")
        assert marked.code is Drain.MARKED, node
    key = pool.keys.key("drains")
    assert sorted(await pool.redis.zrange(key, 0, -1)) == ["n1", "n2", "n3"]
    back = await pool.scripts.drain_node(pool.now, "n1", "bob", cancel=True)
    assert back.code is Drain.CANCELLED
    assert sorted(await pool.redis.zrange(key, 0, -1)) == ["n2", "n3"]  # taken back
    assert (await pool.scripts.release(pool.now, "u2")).code is Release.DRAINED
    assert await pool.redis.zrange(key, 0, -1) == ["n3"]  # its session ended
    await pool.scripts.apply_node_status(pool.now, "n3", "terminated")
    assert await pool.redis.zrange(key, 0, -1) == []  # the node died in its session
    assert await check_invariants(pool.redis, pool.keys.pool) == []


async def test_a_drain_of_an_allocated_node_with_no_session_of_its_user_terminates_it(
        pool: PoolUnderTest) -> None:
    """A record left allocated with no session that holds it (a hand edit, a state put back
    from an older copy) has no session to wait for: drained, it goes at once, not marked to
    end with a session that never ends."""
    await pool.boot("n1")
    await pool.scripts.allocate(pool.now, "u1")
    await pool.redis.hdel(pool.keys.key("alloc"), "u1")
    await pool.redis.zrem(pool.keys.key("sessions"), "u1")
    drained = await pool.scripts.drain_node(pool.now, "n1", "alice")
    assert (drained.code, drained.state, drained.user) == (Drain.DRAINING, "allocated", "")
    record = await pool.node("n1")
    assert (record["state"], record["term_reason"]) == ("terminating", "drained")
    assert "drain_by" not in record
    assert await pool.redis.zrange(pool.keys.key("drains"), 0, -1) == []
    assert (await drains(pool))[-1] == (
        "alice", "node n1 drained by alice: an allocated record with no session of its user")


async def test_a_session_ended_at_once_by_a_run_s_last_batch_lowers_no_hold(
        pool: PoolUnderTest) -> None:
    """drain_node's `last` lowers the hold for a ready or booting node only: the hold booted
    replacements for those; a session ended at once frees no node the spare stood for."""
    await pool.boot("n1")
    await pool.scripts.allocate(pool.now, "u1")
    assert await pool.scripts.hold_spare(pool.now, "take", "run1", 2, 30_000) == (Hold.HELD, "")
    ended = await pool.scripts.drain_node(pool.now, "n1", "op (replace)", at_once=True,
                                          run="run1", last=True)
    assert (ended.code, ended.state) == (Drain.DRAINING, "allocated")
    assert (await pool.redis.get(pool.keys.key("replacing"))).split(":")[0] == "2"


async def test_a_session_ended_with_its_node_counts_its_busy_time(pool: PoolUnderTest) -> None:
    """A session drained at once, or on a node that died, was busy until then, as one its
    user ended: `busy_ms_total` counts it (the utilisation `status` and the replay show)."""
    await pool.boot("n1")
    await pool.scripts.allocate(pool.now, "u1")
    pool.clock.advance(60_000)
    assert (await pool.scripts.drain_node(pool.now, "n1", "alice", at_once=True)).code \
        is Drain.DRAINING
    assert (await pool.snap()).stat("busy_ms_total") == 60_000
    await pool.boot("n2")  # u1, back at the head of the queue, is served
    assert (await pool.alloc()) == {"u1": "n2"}
    pool.clock.advance(30_000)
    await pool.scripts.apply_node_status(pool.now, "n2", "terminated")
    assert (await pool.snap()).stat("busy_ms_total") == 90_000


# --- node status ----------------------------------------------------------------------------


async def test_status_before_create_returns_counts_one_node(pool: PoolUnderTest) -> None:
    decision = await pool.scripts.scale_decide(
        PoolConfig(min_ready=1).policy_args(pool.now, "r1"))
    [rid] = decision.reservations
    assert (await pool.snap()).counts["pending"] == 1
    seen = await pool.scripts.apply_node_status(pool.now, "n1", "booting")
    assert seen.code is NodeStatusOutcome.NEW
    snap = await pool.snap()
    assert snap.counts["unclaimed"] == 1 and snap.counts["booting"] == 1
    registered = await pool.scripts.register_node(pool.now, rid, "n1")
    assert registered.code is Registration.ALREADY_KNOWN and registered.state == "booting"
    again = await pool.scripts.register_node(pool.now, rid, "n1")
    assert again.code is Registration.ALREADY_KNOWN
    snap = await pool.snap()
    assert (snap.counts["pending"], snap.counts["unclaimed"], snap.counts["nodes"]) == (0, 0, 1)
    assert (await pool.node("n1"))["reservation"] == rid


async def _a_create_expired_after_its_node_came(
        pool: PoolUnderTest, max_nodes: int) -> Callable[[int], list[str]]:
    """A create whose POST never returns though its node `n1` reports booting, then a second
    create in flight, then the first's reservation expired and the second's not; returns the
    heuristic pool's settings by min_ready."""
    def config(min_ready: int) -> list[str]:
        return PoolConfig(min_ready=min_ready, max_nodes=max_nodes, scaling_policy="heuristic",
                          conversion=0).policy_args(pool.now, "r1")

    assert len((await pool.scripts.scale_decide(config(1))).reservations) == 1
    pool.clock.advance(1000)
    await pool.scripts.apply_node_status(pool.now, "n1", "booting")  # its POST never returns
    pool.clock.advance(1000)
    assert len((await pool.scripts.scale_decide(config(2))).reservations) == 1  # in flight
    [(_, deadline)] = await pool.redis.zrange(pool.keys.key("pending"), 0, 0, withscores=True)
    pool.clock.set(int(deadline) + 1)  # the first reservation expires, the second does not
    return config


async def test_a_node_whose_create_timed_out_does_not_let_the_pool_past_max_nodes(
        pool: PoolUnderTest) -> None:
    """A create whose POST timed out after its node's status came leaves the node unclaimed;
    when the reservation expired, the entry stayed and cancelled a newer reservation out of the
    creates in flight, and the pool created past max_nodes (62 nodes of 50 in a review's drill,
    with a Node API slower than the client's timeout)."""
    config = await _a_create_expired_after_its_node_came(pool, max_nodes=3)
    decision = await pool.scripts.scale_decide(config(3))
    # n1 and the create in flight are two of the three: one more, not two.
    assert len(decision.reservations) == 1, decision
    snap = await pool.snap()
    assert snap.counts["booting"] + snap.counts["pending"] <= 3


async def test_a_node_adopted_while_creates_run_does_not_let_the_pool_past_max_nodes(
        pool: PoolUnderTest) -> None:
    """Found by a review: a node adopted while creates are in flight is marked unclaimed, as
    perhaps one of theirs; when another of them answered with a node of its own, the entry
    stayed, a create still in flight no longer counted, and the pool created past max_nodes.
    Whose node it is cannot be known, so the quota counts every create in flight."""
    def config(min_ready: int) -> list[str]:
        return PoolConfig(min_ready=min_ready, max_nodes=3, scaling_policy="heuristic",
                          conversion=0, create_timeout_s=60).policy_args(pool.now, "r1")

    [_r1] = (await pool.scripts.scale_decide(config(1))).reservations
    pool.clock.advance(61_000)  # r1's POST timed out; its reservation lapses
    r2, _r3 = (await pool.scripts.scale_decide(config(2))).reservations
    await pool.scripts.apply_node_status(pool.now, "n1", "booting")  # r1's node, adopted
    await pool.scripts.register_node(pool.now, r2, "n2")
    pool.clock.advance(1000)
    decision = await pool.scripts.scale_decide(config(3))
    assert decision.reservations == [], decision.reason
    snap = await pool.snap()
    assert snap.counts["booting"] + snap.counts["pending"] <= 3


async def test_ready_before_create_returns_is_served(pool: PoolUnderTest) -> None:
    await pool.scripts.allocate(pool.now, "u1")
    # The heuristic with no floor books exactly one node for the one waiting user.
    decision = await pool.scripts.scale_decide(
        PoolConfig(min_ready=0, scaling_policy="heuristic").policy_args(pool.now, "r1"))
    [rid] = decision.reservations
    ready = await pool.scripts.apply_node_status(pool.now, "n1", "ready")
    assert ready.code is NodeStatusOutcome.NEW
    assert [s.user_id for s in ready.served] == ["u1"]
    registered = await pool.scripts.register_node(pool.now, rid, "n1")
    assert registered.code is Registration.ALREADY_KNOWN and registered.state == "allocated"


async def test_register_then_status_is_the_normal_path(pool: PoolUnderTest) -> None:
    decision = await pool.scripts.scale_decide(PoolConfig().policy_args(pool.now, "r1"))
    [rid] = decision.reservations
    registered = await pool.scripts.register_node(pool.now, rid, "n1")
    assert registered.code is Registration.REGISTERED
    booting = await pool.scripts.apply_node_status(pool.now, "n1", "booting")
    assert booting.code is NodeStatusOutcome.DUPLICATE
    ready = await pool.scripts.apply_node_status(pool.now, "n1", "ready")
    assert ready.code is NodeStatusOutcome.READY
    assert await pool.ready_list() == ["n1"]


async def test_ready_twice_and_booting_after_ready_change_nothing(pool: PoolUnderTest) -> None:
    await pool.boot("n1")
    before = await pool.dump()
    again = await pool.scripts.apply_node_status(pool.now, "n1", "ready")
    late = await pool.scripts.apply_node_status(pool.now, "n1", "booting")
    assert again.code is NodeStatusOutcome.DUPLICATE and late.code is NodeStatusOutcome.DUPLICATE
    assert await pool.dump() == before


async def test_terminated_for_an_allocated_node_requeues_its_user_at_the_head(
    pool: PoolUnderTest,
) -> None:
    await pool.boot("n1")
    await pool.scripts.allocate(pool.now, "u1")
    await pool.scripts.allocate(pool.now, "u2")  # waits
    async with Subscriber(pool.redis, "user:waiting") as sub:
        gone = await pool.scripts.apply_node_status(pool.now, "n1", "terminated")
        messages = await sub.drain()
    assert gone.code is NodeStatusOutcome.TERMINATED and gone.requeued_user == "u1"
    assert messages == [("user:waiting", {"user_id": "u1"})]
    assert await pool.waiting_list() == ["u1", "u2"]
    assert await pool.alloc() == {}
    await pool.boot("n2")
    assert await pool.alloc() == {"u1": "n2"}
    assert (await pool.snap()).stat("requeued") == 1


async def test_a_crashed_node_s_user_is_served_at_once_by_a_node_ready(
    pool: PoolUnderTest,
) -> None:
    await pool.boot("n1")
    await pool.scripts.allocate(pool.now, "u1")
    await pool.boot("n2")  # idle
    pool.clock.advance(1_000)
    gone = await pool.scripts.apply_node_status(pool.now, "n1", "terminated")
    assert gone.requeued_user == "u1"
    assert [(s.user_id, s.node_id, s.waited_ms) for s in gone.served] == [("u1", "n2", 0)]
    assert await pool.alloc() == {"u1": "n2"}
    assert await pool.waiting_list() == [] and await pool.ready_list() == []
    assert await check_invariants(pool.redis, "test") == []


async def test_terminated_twice_and_late_ready_after_terminated_are_ignored(
    pool: PoolUnderTest,
) -> None:
    await pool.boot("n1")
    await pool.scripts.apply_node_status(pool.now, "n1", "terminated")
    before = await pool.dump()
    again = await pool.scripts.apply_node_status(pool.now, "n1", "terminated")
    late = await pool.scripts.apply_node_status(pool.now, "n1", "ready")
    assert again.code is NodeStatusOutcome.IGNORED and late.code is NodeStatusOutcome.IGNORED
    assert await pool.dump() == before
    # tombstones are kept 24 h, then expire
    assert 86_400_000 - 60_000 < await pool.redis.pttl(pool.keys.node("n1")) <= 86_400_000


async def test_terminated_for_an_unknown_node_blocks_a_late_booting(pool: PoolUnderTest) -> None:
    first = await pool.scripts.apply_node_status(pool.now, "ghost", "terminated")
    late = await pool.scripts.apply_node_status(pool.now, "ghost", "booting")
    assert first.code is NodeStatusOutcome.NEW and late.code is NodeStatusOutcome.IGNORED
    assert (await pool.snap()).counts["nodes"] == 0


async def test_status_for_a_node_nobody_created_is_adopted(pool: PoolUnderTest) -> None:
    # No reservation pending: the node is ours all the same (a create whose answer was lost).
    result = await pool.scripts.apply_node_status(pool.now, "stray", "ready")
    assert result.code is NodeStatusOutcome.NEW
    snap = await pool.snap()
    assert snap.counts["ready"] == 1 and snap.counts["unclaimed"] == 0
    assert snap.stat("nodes_adopted") == 1 and snap.stat("nodes_seen") == 1
    node = await pool.node("stray")
    assert node["origin"] == "status" and node["ready_ms"] == str(pool.now)


async def test_register_after_its_reservation_expired_still_records_the_node(
    pool: PoolUnderTest,
) -> None:
    config = PoolConfig(min_ready=1, create_timeout_s=10)
    [rid] = (await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))).reservations
    pool.clock.advance(11_000)
    await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))  # expires it
    late = await pool.scripts.register_node(pool.now, rid, "n1")
    assert late.code is Registration.LATE
    node = await pool.node("n1")
    assert (node["state"], node["origin"], node["reservation"]) == ("booting", "late", rid)
    assert (await pool.snap()).stat("reservations_expired") == 1


async def test_register_of_a_terminated_node_does_not_resurrect_it(pool: PoolUnderTest) -> None:
    await pool.scripts.apply_node_status(pool.now, "n1", "terminated")
    result = await pool.scripts.register_node(pool.now, "r1:1", "n1")
    assert result.code is Registration.TOMBSTONE
    assert (await pool.snap()).counts["nodes"] == 0


async def floor_reservation(pool: PoolUnderTest) -> str:
    """The create the default floor reserves in an empty pool."""
    [rid] = (await pool.scripts.scale_decide(
        PoolConfig().policy_args(pool.now, "r1"))).reservations
    return rid


async def test_cancel_create_drops_the_reservation_once(pool: PoolUnderTest) -> None:
    rid = await floor_reservation(pool)
    assert await pool.scripts.cancel_create(rid) is True
    assert (await pool.snap()).stat("creates_failed") == 1
    assert await pool.scripts.cancel_create(rid) is False
    snap = await pool.snap()
    assert snap.counts["pending"] == 0 and snap.stat("creates_failed") == 1


@pytest.mark.parametrize(("why", "counted"), [("unusable", "creates_unusable"),
                                              ("withdrawn", "creates_withdrawn")])
async def test_a_create_given_back_for_a_node_made_or_a_post_never_sent_is_not_failed(
        pool: PoolUnderTest, why: str, counted: str) -> None:
    """`creates_failed` is the creates the Node API certainly did not make (`status`: "N
    failed at the Node API"); a review found a node made with an id the pool cannot take,
    and deleted, counted there."""
    rid = await floor_reservation(pool)
    assert await pool.scripts.cancel_create(rid, why) is True
    snap = await pool.snap()
    assert (snap.counts["pending"], snap.stat(counted), snap.stat("creates_failed")) == (0, 1, 0)
    # shown where the failures are (`status`, `provisioner_scaling`, the replay's report)
    scaling = snap.scaling()
    assert (scaling.failed, scaling.as_dict()[why]) == (0, 1)
    assert {"unusable": "; 1 made with an id the pool cannot take, and deleted",
            "withdrawn": "; 1 never sent, their reservation lapsed or too short for the "
                         "call"}[why] in \
        scaling.describe()


async def test_cancel_create_refuses_a_reason_it_does_not_know(pool: PoolUnderTest) -> None:
    rid = await floor_reservation(pool)
    with pytest.raises(aioredis.ResponseError, match="cancel_create: unknown reason lost"):
        await pool.scripts._call("cancel_create", rid, "lost")
    assert (await pool.snap()).counts["pending"] == 1


async def test_cancel_create_with_no_reason_counts_a_failed_create(pool: PoolUnderTest) -> None:
    """A replica of an earlier release sends no reason: its cancel is a POST that failed, as
    every cancel was then."""
    rid = await floor_reservation(pool)
    assert await pool.scripts._call("cancel_create", rid) == 1
    snap = await pool.snap()
    assert (snap.stat("creates_failed"), snap.stat("creates_withdrawn"),
            snap.stat("creates_unusable")) == (1, 0, 0)


async def test_the_tombstone_of_a_node_first_seen_terminated_expires(pool: PoolUnderTest) -> None:
    await pool.scripts.apply_node_status(pool.now, "ghost", "terminated")
    assert 0 < await pool.redis.pttl(pool.keys.node("ghost")) <= 86_400_000


async def test_a_ready_found_in_the_node_list_teaches_no_boot_time(pool: PoolUnderTest) -> None:
    """Reconciliation finds a node ready some time after it became ready: how long it booted
    is not known, and learned from the listing it would teach a boot too long."""
    node = next(f"n{i}" for i in range(100) if is_boot_sample(f"n{i}"))
    model = pool.keys.key("model")
    await pool.redis.hset(model, mapping={"boot_ms": 60_000, "boot_n": 3})
    await pool.scripts.apply_node_status(pool.now, node, "booting")  # received
    pool.clock.advance(300_000)
    ready = await pool.scripts.apply_node_status(pool.now, node, "ready", listed=True)
    assert ready.code is NodeStatusOutcome.READY
    assert await pool.redis.hmget(model, "boot_ms", "boot_n") == ["60000", "3"]


async def test_a_create_reservation_expires_when_its_deadline_comes(pool: PoolUnderTest) -> None:
    """At its deadline a reservation is over, as a termination's is (reap_idle sends a DELETE
    again at its deadline): its node registers late."""
    config = PoolConfig(min_ready=1, create_timeout_s=10)
    [rid] = (await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))).reservations
    pool.clock.advance(10_000)
    await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
    assert (await pool.snap()).stat("reservations_expired") == 1
    assert (await pool.scripts.register_node(pool.now, rid, "n1")).code is Registration.LATE


# --- activity -------------------------------------------------------------------------------


async def test_activity_is_recorded_once_per_second_and_engages_at_the_threshold(
    pool: PoolUnderTest,
) -> None:
    config = pool.config
    args = (config.window_ms, config.engaged_threshold, config.max_events_per_user)
    results = []
    for offset in (0, 0, 5_000, 9_000):
        results.append(await pool.scripts.record_activity(
            pool.now, "u1", T0 + offset, *args))
    assert [r.code for r in results] == [Activity.RECORDED, Activity.DUPLICATE,
                                         Activity.RECORDED, Activity.RECORDED]
    assert results[-1].events_in_window == 3
    snap = await pool.snap()
    assert snap.counts["engaged"] == 1 and snap.stat("activities") == 3
    assert snap.stat("activity_duplicates") == 1
    assert await pool.redis.pttl(pool.keys.acts("u1")) > 0
    # Two minutes after the first of the three, the user is no longer engaged.
    pool.clock.advance(config.window_ms + 1)
    assert (await pool.snap()).counts["engaged"] == 0


async def test_a_later_copy_of_an_activity_changes_nothing_but_its_counter(
    pool: PoolUnderTest,
) -> None:
    config = pool.config
    args = (config.window_ms, config.engaged_threshold, config.max_events_per_user)
    for offset in (0, 5_000, 9_000):
        await pool.scripts.record_activity(pool.now, "u1", T0 + offset, *args)
    first = await pool.dump()
    # Another replica's copy of the last event, applied a moment later.
    pool.clock.advance(300)
    again = await pool.scripts.record_activity(pool.now, "u1", T0 + 9_000, *args)
    assert again.code is Activity.DUPLICATE and again.events_in_window == 3
    later = await pool.dump()
    assert later.pop("stats") == {**first.pop("stats"), "activity_duplicates": "1"}
    assert later == first


async def test_a_burst_of_activity_in_one_call_leaves_what_one_call_each_leaves(
    aredis: aioredis.Redis,
) -> None:
    clock = ManualClock(T0)
    one, many = (PoolUnderTest(aredis, keys, Scripts(aredis, keys), clock)
                 for keys in (PoolKeys("one"), PoolKeys("many")))
    config = one.config
    args = (config.window_ms, config.engaged_threshold, config.max_events_per_user)
    # A user holding a node, one seen a while ago, then a burst: users crossing every level
    # (1, 2, 4, 8, 16 events), a second repeated, an event older than the window.
    burst: list[tuple[str, int]] = [("held", T0 - 1_000), ("u0", T0 - 90_000)]
    for second in range(18):
        burst += [(f"u{k}", T0 - (18 - second) * 1_000) for k in range(1 + second % 4)]
    burst += [("u1", T0 - 1_000), ("stale", T0 - config.window_ms - 1), ("held", T0)]
    for pool in (one, many):
        await pool.boot("n1")
        await pool.scripts.allocate(pool.now, "held")
        await pool.scripts.record_activity(pool.now, "u0", T0 - 100_000, *args)
    singly = [await one.scripts.record_activity(one.now, user, ts, *args) for user, ts in burst]
    together = await many.scripts.run(many.scripts.record_activities_call(
        many.now, burst, *args))
    assert together == singly
    assert {r.code for r in together} == {Activity.RECORDED, Activity.DUPLICATE,
                                          Activity.STALE}
    assert max(r.events_in_window for r in together) >= 16
    assert await many.dump() == await one.dump()
    stats = (await many.snap()).stat
    # The burst less its repeat and its stale event, and u0's first.
    assert (stats("activities"), stats("activity_duplicates"), stats("activity_stale")) == (
        len(burst) - 2 + 1, 1, 1)


async def test_an_activity_the_server_refuses_fails_alone_in_its_call(
    pool: PoolUnderTest,
) -> None:
    config = pool.config
    args = (config.window_ms, config.engaged_threshold, config.max_events_per_user)
    await pool.redis.set(pool.keys.acts("bad"), "not a sorted set")
    results = await pool.scripts.run(pool.scripts.record_activities_call(
        pool.now, [("u1", T0), ("bad", T0), ("u2", T0)], *args))
    assert [type(r).__name__ for r in results] == ["ActivityResult", "ResponseError",
                                                   "ActivityResult"]
    assert "WRONGTYPE" in str(results[1])
    assert (await pool.snap()).stat("activities") == 2
    assert await pool.redis.zscore(pool.keys.key("active"), "u2") is not None
    # Alone in its call, the refusal is raised, as any script error is.
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await pool.scripts.record_activity(pool.now, "bad", T0, *args)


async def test_a_script_s_error_reply_in_run_many_is_that_call_s_result_alone(
    pool: PoolUnderTest,
) -> None:
    """A replica applies a batch of events with `run_many`: an activity the server refuses (a
    key of the wrong type, written by hand) is that event's error, read from its script's own
    error reply; raised, it failed the whole batch, and the connects and activities beside
    it were tried again or dropped with it."""
    config = pool.config
    args = (config.window_ms, config.engaged_threshold, config.max_events_per_user)
    await pool.redis.set(pool.keys.acts("bad"), "not a sorted set")
    results = await pool.scripts.run_many([
        pool.scripts.record_activity_call(pool.now, user, T0, *args)
        for user in ("u1", "bad", "u2")])
    assert [type(r).__name__ for r in results] == ["ActivityResult", "ResponseError",
                                                   "ActivityResult"], results
    assert "WRONGTYPE" in str(results[1])
    assert (await pool.snap()).stat("activities") == 2


async def test_record_activity_refuses_an_argument_list_it_cannot_pair(
    pool: PoolUnderTest,
) -> None:
    config = pool.config
    for pairs in ((), ("u1",), ("u1", T0, "u2")):
        call = Call("record_activity", (pool.now, config.window_ms, 3, 100, *pairs), list)
        with pytest.raises(ResponseError, match="user and timestamp pairs"):
            await pool.scripts.run(call)
    assert await pool.dump() == {}


async def test_an_activity_that_comes_late_leaves_the_user_s_last_activity(
    pool: PoolUnderTest,
) -> None:
    """Events of one user may come out of order (replicas, retries): `active` keeps the
    latest."""
    window = pool.config.window_ms
    await pool.scripts.record_activity(pool.now, "u1", pool.now, window, 3, 100)
    late = await pool.scripts.record_activity(pool.now, "u1", pool.now - 5_000, window, 3, 100)
    assert late.code is Activity.RECORDED and late.events_in_window == 2
    assert await pool.redis.zscore(pool.keys.key("active"), "u1") == pool.now


async def test_stale_activity_is_not_recorded(pool: PoolUnderTest) -> None:
    config = pool.config
    result = await pool.scripts.record_activity(
        pool.now, "u1", pool.now - config.window_ms - 1, config.window_ms,
        config.engaged_threshold, config.max_events_per_user)
    assert result.code is Activity.STALE
    assert not await pool.redis.exists(pool.keys.acts("u1"))


async def test_activity_window_is_capped_per_user(pool: PoolUnderTest) -> None:
    for second in range(20):
        await pool.scripts.record_activity(pool.now, "u1", T0 - second * 1000, 120_000, 3, 5)
    assert await pool.redis.zcard(pool.keys.acts("u1")) == 5


async def test_an_activity_older_than_every_one_the_cap_keeps_is_stale_for_every_copy(
        pool: PoolUnderTest) -> None:
    """Added and dropped at once by the cap, it was added again by the next replica's copy,
    and `activities` counted it once per copy (a review): now every copy finds it stale."""
    window, cap, now = pool.config.window_ms, 3, pool.now
    for back in (1, 2, 3):
        await pool.scripts.record_activity(now, "u", now - back * 1000, window, 3, cap)
    late = now - 10_000  # in the window, older than the three kept
    codes = [(await pool.scripts.record_activity(now, "u", late, window, 3, cap)).code
             for _copy in range(2)]
    assert codes == [Activity.STALE, Activity.STALE]
    stats = await pool.redis.hgetall(pool.keys.key("stats"))
    assert (stats["activities"], stats["activity_stale"]) == ("3", "2")
    assert "activity_duplicates" not in stats
    assert await pool.redis.zrange(pool.keys.acts("u"), 0, -1, withscores=True) == [
        (str(now - back * 1000), now - back * 1000) for back in (3, 2, 1)]
    # one newer than the oldest kept is recorded, and its copy is a duplicate
    codes = [(await pool.scripts.record_activity(now, "u", now - 2500, window, 3, cap)).code
             for _copy in range(2)]
    assert codes == [Activity.RECORDED, Activity.DUPLICATE]


async def test_a_user_holding_a_node_is_not_engaged(pool: PoolUnderTest) -> None:
    await pool.boot("n1")
    await pool.scripts.allocate(pool.now, "u1")
    await engage(pool, ("u1",), 120_000)
    assert (await pool.snap()).counts["engaged"] == 0


async def test_an_activity_exactly_one_window_old_is_in_the_window(pool: PoolUnderTest) -> None:
    """The window holds every event at or after now - window, as every count of it reads."""
    config = pool.config
    result = await pool.scripts.record_activity(
        pool.now, "u1", pool.now - config.window_ms, config.window_ms,
        config.engaged_threshold, config.max_events_per_user)
    assert result.code is Activity.RECORDED and result.events_in_window == 1
    assert (await pool.snap()).counts["active"] == 1


async def test_every_activity_renews_the_first_seen_time_s_expiry(pool: PoolUnderTest) -> None:
    """A user browsing on and on keeps their first-seen time (their age, and one arrival
    counted): it expires only two windows and a minute after their last event."""
    config = pool.config
    args = (config.window_ms, config.engaged_threshold, config.max_events_per_user)
    await pool.scripts.record_activity(pool.now, "u1", pool.now, *args)
    seen = pool.keys.seen("u1")
    await pool.redis.pexpire(seen, 1_000)  # as if that event were long ago by the server's clock
    pool.clock.advance(5_000)
    await pool.scripts.record_activity(pool.now, "u1", pool.now, *args)
    assert await pool.redis.pttl(seen) > 2 * config.window_ms
    keep_ms = 2 * config.window_ms + 60_000
    assert await pool.redis.get(seen) == f"{T0}:{T0 + 5_000 + keep_ms}"


async def test_a_user_silent_past_the_first_seen_key_s_life_arrives_again_by_the_pool_s_clock(
        pool: PoolUnderTest) -> None:
    """The first-seen key's TTL runs on the server's clock, which a replay's virtual hours
    never reach: a user silent for longer than its life kept their old first-seen time there,
    where live they arrive again (a review). The value carries its end on the pool's clock.
    A bare number (the release before) is still read, and ends with its TTL."""
    config = pool.config
    args = (config.window_ms, config.engaged_threshold, config.max_events_per_user)
    keep_ms = 2 * config.window_ms + 60_000
    seen = pool.keys.seen("u1")

    async def first_seen_after(silence_ms: int) -> str:
        pool.clock.advance(silence_ms)
        await pool.scripts.record_activity(pool.now, "u1", pool.now, *args)
        return str(await pool.redis.get(seen))

    await pool.scripts.record_activity(pool.now, "u1", pool.now, *args)
    # still the same arrival, its end renewed
    assert await first_seen_after(keep_ms - 1) == f"{T0}:{pool.now + keep_ms}"
    # silent for the key's whole life: a new arrival
    assert await first_seen_after(keep_ms) == f"{pool.now}:{pool.now + keep_ms}"
    await pool.redis.set(seen, str(T0))  # a bare number: the first-seen time it holds
    assert await first_seen_after(keep_ms) == f"{T0}:{pool.now + keep_ms}"


@pytest.mark.parametrize("edit", ["5:x", "5:", ":"])
async def test_a_first_seen_value_with_no_end_it_can_read_is_a_new_arrival(
        pool: PoolUnderTest, edit: str) -> None:
    """A first-seen value edited by hand whose end is not a time (or is missing) ends: the
    user arrives anew, and the script is not stopped by it."""
    config = pool.config
    args = (config.window_ms, config.engaged_threshold, config.max_events_per_user)
    keep_ms = 2 * config.window_ms + 60_000
    seen = pool.keys.seen("u1")
    await pool.redis.set(seen, edit)
    await pool.scripts.record_activity(pool.now, "u1", pool.now, *args)
    assert await pool.redis.get(seen) == f"{pool.now}:{pool.now + keep_ms}"


async def test_the_sweep_of_an_activity_drops_only_entries_that_left_the_window(
    pool: PoolUnderTest,
) -> None:
    config = pool.config
    args = (config.window_ms, config.engaged_threshold, config.max_events_per_user)
    await pool.scripts.record_activity(pool.now, "gone", pool.now, *args)
    pool.clock.advance(config.window_ms + 1)
    await pool.scripts.record_activity(pool.now, "here", pool.now, *args)  # sweeps "gone"
    assert await pool.redis.zrange(pool.keys.key("active"), 0, -1) == ["here"]


# --- scaling --------------------------------------------------------------------------------


async def test_scale_decide_lets_one_decision_through_per_interval(pool: PoolUnderTest) -> None:
    config = PoolConfig(min_ready=2, tick_interval_s=1.0)
    first = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
    second = await pool.scripts.scale_decide(config.policy_args(pool.now, "r2"))
    assert first.won and len(first.reservations) == 2
    assert "create 2" in first.reason and first.numbers["target"] == 2
    assert not second.won
    pool.clock.advance(1000)  # the next interval
    third = await pool.scripts.scale_decide(config.policy_args(pool.now, "r2"))
    assert third.won and third.reservations == []  # the two reservations count as supply


async def test_an_interval_slot_far_ahead_is_taken_over_once_its_lease_lapses(
        pool: PoolUnderTest) -> None:
    # A replica whose clock ran an hour ahead took its slot, then died: the others would have
    # decided nothing for that hour. The slot is held on a lease of the server's clock, which
    # its death stops renewing.
    import asyncio

    config = PoolConfig(min_ready=1, tick_interval_s=1.0)
    ahead = await pool.scripts.scale_decide(config.policy_args(pool.now + 3_600_000, "r9"))
    assert ahead.won
    lease = await pool.redis.pttl(pool.keys.key("tick_lock"))
    assert 10_000 < lease <= 12_000  # two intervals and 10 s, on the server's clock
    # While the lease runs its holder may be alive: no take-over, and it says why.
    held = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
    assert not held.won and held.held_ahead
    # A minute behind the slot taken is only a clock a little behind: not "ahead".
    behind = pool.now + 3_600_000 - 59_000
    close = await pool.scripts.scale_decide(config.policy_args(behind, "r1"))
    assert not close.won and not close.held_ahead
    await pool.redis.pexpire(pool.keys.key("tick_lock"), 1)  # r9 died: its lease lapses
    await asyncio.sleep(0.05)
    assert (await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))).won
    assert not (await pool.scripts.scale_decide(config.policy_args(pool.now, "r2"))).won
    assert (await pool.snap()).stat("tick_lock_ahead") == 1


async def test_an_interval_slot_far_ahead_with_no_lease_is_taken_over(
        pool: PoolUnderTest) -> None:
    # Written by hand, or by a release before the lease: nothing would ever lapse.
    config = PoolConfig(min_ready=1, tick_interval_s=1.0)
    await pool.redis.set(pool.keys.key("tick_lock"), str(pool.now + 3_600_000))
    assert (await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))).won
    assert (await pool.snap()).stat("tick_lock_taken_over") == 1
    assert await pool.redis.pttl(pool.keys.key("tick_lock")) > 0


async def test_replicas_on_one_clock_with_other_intervals_are_not_told_a_clock_is_ahead(
        pool: PoolUnderTest) -> None:
    # Found by a review of the lease: slot numbers of a 1 s and a 2 s interval are a factor of
    # two apart, read as a clock hours ahead ("one of the two clocks is wrong").
    fast = PoolConfig(min_ready=1, tick_interval_s=1.0)
    slow = PoolConfig(min_ready=1, tick_interval_s=2.0)
    assert (await pool.scripts.scale_decide(fast.policy_args(pool.now, "r1"))).won
    other = await pool.scripts.scale_decide(slow.policy_args(pool.now, "r2"))
    assert not other.won and not other.held_ahead
    pool.clock.advance(2000)
    assert (await pool.scripts.scale_decide(slow.policy_args(pool.now, "r2"))).won
    assert (await pool.snap()).stat("tick_lock_ahead") == 0


async def test_replicas_a_millisecond_apart_on_a_long_interval_are_not_told_a_clock_is_ahead(
        pool: PoolUnderTest) -> None:
    # tick_interval_s may be up to 600 s: a replica whose clock is 1 ms behind reads the slot
    # before the one just taken, a whole interval (over a minute) "ahead" of its own slot.
    config = PoolConfig(min_ready=1, tick_interval_s=120.0)
    start = (pool.now // 120_000 + 1) * 120_000  # a slot's first millisecond
    assert (await pool.scripts.scale_decide(config.policy_args(start, "r1"))).won
    other = await pool.scripts.scale_decide(config.policy_args(start - 1, "r2"))
    assert not other.won and not other.held_ahead
    # So too for a rolling change of the interval, on one clock: 1 s beside 120 s.
    fast = PoolConfig(min_ready=1, tick_interval_s=1.0)
    at = start + 240_000 + 61_000
    assert (await pool.scripts.scale_decide(fast.policy_args(at, "r1"))).won
    slow = await pool.scripts.scale_decide(config.policy_args(at, "r2"))
    assert not slow.won and not slow.held_ahead
    assert (await pool.snap()).stat("tick_lock_ahead") == 0


async def test_two_live_replicas_a_minute_and_a_half_apart_decide_once_an_interval(
        pool: PoolUnderTest) -> None:
    """Found by a review: the replica 90 s behind took the slot over on every tick (to it, the
    other's was always far ahead), and the other took it back on the next: two decisions an
    interval, each counting the 90 s between their clocks as time observed (the learned
    exposure grew by a minute a second), and reservations stamped on one clock expired by the
    other while their POSTs ran."""
    config = PoolConfig(min_ready=1, tick_interval_s=1.0)
    won = {"r1": 0, "r2": 0}
    for _ in range(20):
        for replica, skew in (("r1", 0), ("r2", -90_000)):
            decision = await pool.scripts.scale_decide(config.policy_args(pool.now + skew,
                                                                          replica))
            won[replica] += decision.won
        pool.clock.advance(1000)
    assert won == {"r1": 20, "r2": 0}
    x0 = float(await pool.redis.hget(pool.keys.key("model"), "x0") or 0)
    assert x0 <= 20, x0  # the seconds observed, not a minute for each


async def test_scale_decide_covers_waiting_users_and_engaged_users(pool: PoolUnderTest) -> None:
    config = PoolConfig(min_ready=1, conversion=0.5, engaged_threshold=3,
                        scaling_policy="heuristic")
    await engage(pool, "abcd", config.window_ms)
    await pool.scripts.allocate(pool.now, "w1")
    await pool.scripts.allocate(pool.now, "w2")
    decision = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
    # target spare = ceil(4 engaged x 0.5) = 2; spare = 0 - 2 waiting = -2: create 4.
    assert len(decision.reservations) == 4
    assert decision.numbers["engaged"] == 4 and decision.numbers["waiting"] == 2


async def test_scale_decide_respects_max_nodes(pool: PoolUnderTest) -> None:
    config = PoolConfig(min_ready=5, max_nodes=3)
    await pool.boot("n1")
    await pool.scripts.allocate(pool.now, "u1")
    decision = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
    assert len(decision.reservations) == 2
    assert "max_nodes 3" in decision.reason


async def test_a_probe_of_one_at_a_batch_of_one_holds_nothing(pool: PoolUnderTest) -> None:
    # After creates were held, the service probes one at a time, "which is not held"
    # (service.tick). Where the batch is one anyway, the probe limits nothing: the decision names
    # the batch, not a hold.
    config = PoolConfig(min_ready=3, max_batch=1, max_nodes=10)
    decision = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1", 1))
    assert len(decision.reservations) == 1
    assert decision.reason.endswith(": create 1 of 3 (max_nodes 10, batch 1)")
    pool.clock.advance(1000)
    decision = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1", 0))
    assert decision.reason.endswith("create 0 of 2 (creates held while the Node API fails, is "
                                    "full or refuses)")


async def test_creates_on_a_rise_are_counted_up_to_the_creates_made(pool: PoolUnderTest) -> None:
    # The target rises by 3 and the batch allows 2: both are creates on the rise, and none is
    # counted that was not made (creates_on_rise + creates_to_refill = creates_reserved).
    config = PoolConfig(scaling_policy="heuristic", min_ready=0, max_batch=2)
    await engage(pool, "abcdef", config.window_ms)  # ceil(6 x 0.5) = 3
    decision = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
    assert len(decision.reservations) == 2
    scaling = (await pool.snap()).scaling()
    assert (scaling.creates, scaling.on_rise, scaling.to_refill) == (2, 2, 0)


async def test_a_create_capped_to_nothing_is_logged_once_per_30s_while_it_lasts(
        pool: PoolUnderTest, aredis: aioredis.Redis) -> None:
    """Found by an operator's drill: a pool held below its target (max_nodes, or creates held
    while the Node API fails) logged `create 0 of N` at every tick, one a second, so the
    decisions stream's 1,000 entries held 17 minutes of an outage, and each miss left
    `status`'s eight within seconds. The latest is still the pool's last decision."""
    config = PoolConfig(min_ready=5, max_nodes=0)

    async def scale_ups() -> list[dict[str, str]]:
        entries = await aredis.xrange(pool.keys.key("decisions"))
        return [fields for _, fields in entries if fields["kind"] == "scale_up"]

    for second in range(91):
        decision = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
        assert decision.won and "create 0 of 5 (max_nodes 0" in decision.reason
        assert (await pool.snap()).stats["last_decision"] == decision.reason, second
        pool.clock.advance(1000)
    logged = await scale_ups()
    assert [(int(e["now"]) - int(logged[0]["now"])) // 1000 for e in logged] == [0, 30, 60, 90]
    assert {e["acted"] for e in logged} == {"0"}
    # a create made is logged at once, however soon after
    decision = await pool.scripts.scale_decide(
        PoolConfig(min_ready=5, max_nodes=2).policy_args(pool.now, "r1"))
    assert len(decision.reservations) == 2
    assert [e["acted"] for e in await scale_ups()][-1] == "2"


async def _shortages_logged(pool: PoolUnderTest, aredis: aioredis.Redis,
                            short: Callable[[int], bool], seconds: int) -> list[int]:
    """The seconds at which a shortage was logged, over one decision a second of a pool of one
    ready node at max_nodes 1: short of its target at the seconds `short` picks (`create 0 of
    1`), at it otherwise."""
    await pool.scripts.apply_node_status(pool.now, "n1", "ready")
    wanting, met = PoolConfig(min_ready=2, max_nodes=1), PoolConfig(min_ready=1, max_nodes=1)
    begun = pool.now
    for second in range(seconds):
        config = wanting if short(second) else met
        decision = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
        assert ("create 0 of 1 (max_nodes 1" if short(second) else ": hold") in decision.reason
        pool.clock.advance(1_000)
    entries = await aredis.xrange(pool.keys.key("decisions"))
    return [(int(f["now"]) - begun) // 1000 for _, f in entries if f["kind"] == "scale_up"]


async def test_a_shortage_after_one_that_ended_is_logged_however_soon(
        pool: PoolUnderTest, aredis: aioredis.Redis) -> None:
    """The once-per-30-s throttle is of one shortage: a pool back at its target ends it, and
    a new shortage 10 s later is in the stream at once, not 20 s after it began; the second
    after, it is throttled as before."""
    assert await _shortages_logged(pool, aredis, lambda s: s == 0 or s >= 10, 12) == [0, 10]


async def test_a_shortage_that_comes_and_goes_at_every_tick_is_logged_twice_per_30s_at_most(
        pool: PoolUnderTest, aredis: aioredis.Redis) -> None:
    """A pool at max_nodes whose target flickers a node above and back at every tick (a
    connect takes a ready node, a release frees one): each decision that wanted none ended
    the shortage, the next was logged at once, and the stream took one entry every 2 s, the
    flood the throttle is for. A new shortage is logged at once, and one more such within
    30 s of it waits as the same shortage does."""
    assert await _shortages_logged(pool, aredis, lambda s: s % 2 == 0, 60) == [0, 2, 32, 34]


async def test_a_shortage_logged_at_once_is_then_throttled_as_any(
        pool: PoolUnderTest, aredis: aioredis.Redis) -> None:
    """A shortage logged at once after one that ended is one shortage from then: it lasts a
    minute more and is logged 30 s after, and 30 s after that, not at once again."""
    assert await _shortages_logged(pool, aredis, lambda s: s != 5, 75) == [0, 6, 36, 66]


async def test_a_shortage_logged_by_a_clock_ahead_does_not_silence_one_on_time(
        pool: PoolUnderTest, aredis: aioredis.Redis) -> None:
    """The last shortage was logged by a replica whose clock ran ten minutes ahead, since
    gone: a shortage on time is logged at once, not ten minutes on."""
    await aredis.hset(pool.keys.key("stats"), "unmet_logged_ms", pool.now + 600_000)
    decision = await pool.scripts.scale_decide(
        PoolConfig(min_ready=1, max_nodes=0).policy_args(pool.now, "r1"))
    assert "create 0 of 1 (max_nodes 0" in decision.reason
    entries = await aredis.xrange(pool.keys.key("decisions"))
    assert [int(f["now"]) for _, f in entries if f["kind"] == "scale_up"] == [pool.now]


async def test_reap_idle_terminates_only_idle_nodes_beyond_the_floor(pool: PoolUnderTest) -> None:
    config = PoolConfig(min_ready=1, idle_timeout_s=300)
    for node in ("n1", "n2", "n3"):
        await pool.boot(node)
        pool.clock.advance(1000)
    await pool.scripts.allocate(pool.now, "u1")  # takes n1, idle the longest
    assert await pool.scripts.reap_idle(config.policy_args(pool.now, "r1")) == []
    pool.clock.advance(300_000)
    reaped = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert [(t.node_id, t.reason) for t in reaped] == [("n2", "idle")]
    assert (await pool.node("n2"))["state"] == "terminating"
    assert (await pool.node("n1"))["state"] == "allocated"
    assert await pool.scripts.reap_idle(config.policy_args(pool.now, "r1")) == []


async def test_reap_idle_gives_up_the_youngest_boot_in_an_idle_nodes_place(
        pool: PoolUnderTest) -> None:
    """The spare left is the same either way; the ready node serves the next connect at once and
    the rest of the boot is not paid for. Boot-time samples (n2, n4, n6: by a hash of the id)
    are never given up, so the boot time is learned from boots nobody chose."""
    config = PoolConfig(scaling_policy="heuristic", min_ready=0, idle_timeout_s=60)
    await pool.boot("n2")
    for node in ("n1", "n3", "n4", "n5", "n6"):
        await pool.scripts.apply_node_status(pool.now, node, "booting")
        pool.clock.advance(1000)
    assert await pool.scripts.reap_idle(config.policy_args(pool.now, "r1")) == []  # not idle yet
    pool.clock.advance(60_000)
    reaped = []
    for _ in range(5):
        reaped += [(t.node_id, t.reason)
                   for t in await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))]
    assert reaped == [("n5", "surplus_boot"), ("n3", "surplus_boot"), ("n1", "surplus_boot"),
                      ("n2", "idle")]
    assert [(await pool.node(n))["state"] for n in ("n4", "n6")] == ["booting", "booting"]
    reasons = [fields["reason"] for _, fields in await pool.redis.xrange(
        pool.keys.key("decisions")) if fields.get("kind") == "scale_down"]
    assert reasons[0].startswith(
        "terminate 1 (stuck 0, retry 0, idle 0, booting in an idle node's place 1); spare 6")
    assert reasons[-1].startswith(
        "terminate 1 (stuck 0, retry 0, idle 1, booting in an idle node's place 0); spare 3")


def is_boot_sample(node_id: str) -> bool:
    """pool.lua new_node's mark: the last hex digit of the id's SHA-1 is odd."""
    return int(hashlib.sha1(node_id.encode()).hexdigest()[-1], 16) % 2 == 1


async def test_a_boot_first_seen_in_the_node_list_teaches_no_boot_time(
        pool: PoolUnderTest) -> None:
    """Found by a review: a booting node reconciliation adopted (its status lost) was stamped
    created when it was listed, maybe a reconcile interval after its create, and its ready,
    received later, taught a boot that much too short."""
    node = next(f"n{i}" for i in range(100) if is_boot_sample(f"n{i}"))
    model = pool.keys.key("model")
    await pool.redis.hset(model, mapping={"boot_ms": 60_000, "boot_n": 3})
    await pool.scripts.apply_node_status(pool.now, node, "booting", listed=True)
    assert (await pool.node(node))["origin"] == "listed"
    pool.clock.advance(5_000)
    await pool.scripts.apply_node_status(pool.now, node, "ready")  # received, not listed
    assert await pool.redis.hmget(model, "boot_ms", "boot_n") == ["60000", "3"]
    assert (await pool.node(node))["state"] == "ready"
    # One whose booting was received is learned from as ever.
    other = next(f"m{i}" for i in range(100) if is_boot_sample(f"m{i}"))
    await pool.scripts.apply_node_status(pool.now, other, "booting")
    pool.clock.advance(5_000)
    await pool.scripts.apply_node_status(pool.now, other, "ready")
    assert float(await pool.redis.hget(model, "boot_ms")) < 60_000


async def _boot_learned(pool: PoolUnderTest, *, status_first: bool,
                        asked: int | str | None) -> tuple[dict[str, str], float]:
    """A sample boot asked for at pool.now: the POST answered 5 s later (its `booting` status
    0.2 s after the ask when `status_first`), the node ready 60 s after the ask. Returns the
    node's record and the boot time learned, from no earlier sample. `asked` as text is a
    call made by hand."""
    node = next(f"n{i}" for i in range(100) if is_boot_sample(f"n{i}"))
    [rid] = (await pool.scripts.scale_decide(
        PoolConfig(min_ready=1).policy_args(pool.now, "r1"))).reservations
    if status_first:
        pool.clock.advance(200)
        await pool.scripts.apply_node_status(pool.now, node, "booting")
        pool.clock.advance(4_800)
    else:
        pool.clock.advance(5_000)
    if isinstance(asked, str):
        await pool.scripts._call("register_node", pool.now, rid, node, asked)
    else:
        await pool.scripts.register_node(pool.now, rid, node, asked)
    record = await pool.node(node)
    pool.clock.advance(55_000)
    await pool.scripts.apply_node_status(pool.now, node, "ready")
    return record, float(await pool.redis.hget(pool.keys.key("model"), "boot_ms"))


@pytest.mark.parametrize("status_first", [False, True])
async def test_a_boot_is_timed_from_the_decision_that_asked_for_it(
        pool: PoolUnderTest, status_first: bool) -> None:
    """The lead time the forecast looks ahead is from the decision to the node's `ready`: a
    create call that takes 5 s to answer is part of it. It was timed from the pool's first
    record of the node (the POST's answer, or its `booting` if that came first), and a slow
    Node API taught a lead time that much short."""
    asked = pool.now
    record, boot_ms = await _boot_learned(pool, status_first=status_first, asked=asked)
    assert record["asked_ms"] == str(asked)
    assert int(record["created_ms"]) == asked + (200 if status_first else 5_000)
    assert boot_ms == 60_000


@pytest.mark.parametrize("status_first", [False, True])
async def test_a_create_with_no_time_asked_is_timed_from_its_first_record(
        pool: PoolUnderTest, status_first: bool) -> None:
    """A replica of the release before sends no time: the boot is timed as it was."""
    record, boot_ms = await _boot_learned(pool, status_first=status_first, asked=None)
    assert "asked_ms" not in record
    assert boot_ms == (59_800 if status_first else 55_000)


async def test_a_time_asked_after_the_answer_is_not_taken(pool: PoolUnderTest) -> None:
    """A time after the POST's answer is not when the create was asked for (a clock read
    wrong, a hand-made call): the boot is timed from the first record, not taught short."""
    record, boot_ms = await _boot_learned(pool, status_first=False, asked=T0 + 3_600_000)
    assert "asked_ms" not in record
    assert boot_ms == 55_000


@pytest.mark.parametrize("asked", ["nan", "-inf", "-5"])
async def test_a_time_asked_that_is_no_time_is_not_taken(pool: PoolUnderTest, asked: str) -> None:
    """A call by hand with `-inf` for the time asked was kept: the boot it taught was
    infinite, which the model reads as nothing learned, and the lead time learned from every
    earlier boot was lost. Neither that, NaN nor a time before 0 is when a create was asked."""
    record, boot_ms = await _boot_learned(pool, status_first=False, asked=asked)
    assert boot_ms == 55_000
    assert "asked_ms" not in record


async def test_a_create_asked_at_time_zero_is_timed_from_then(aredis: aioredis.Redis) -> None:
    """A replay's clock starts at 0 (provisioner/bench/service_policy.py): a create its first
    tick asks for is asked at 0, a time like any, and its boot is timed from it."""
    keys = PoolKeys("zero")
    pool = PoolUnderTest(aredis, keys, Scripts(aredis, keys), ManualClock(0))
    record, boot_ms = await _boot_learned(pool, status_first=False, asked=0)
    assert record["asked_ms"] == "0"
    assert boot_ms == 60_000


async def test_a_time_asked_after_the_node_s_first_record_is_not_taken(
        pool: PoolUnderTest) -> None:
    """The node's `booting` came before the POST was sent by the asking replica's clock (the
    status applied by a replica whose clock is behind): the boot is timed from the earlier
    of the two, its first record, not taught short."""
    asked = pool.now + 1_000  # after the status, at +200, and before the answer, at +5 s
    record, boot_ms = await _boot_learned(pool, status_first=True, asked=asked)
    assert "asked_ms" not in record
    assert boot_ms == 59_800


async def test_a_create_answered_within_the_millisecond_it_was_asked_is_timed_from_the_ask(
        pool: PoolUnderTest) -> None:
    """A time asked equal to the answer's is a time like any (only one after it is not): the
    answering replica's clock 0.5 s behind the one that recorded the node's `booting`, the
    boot is timed from the ask, not from that later first record."""
    node = next(f"n{i}" for i in range(100) if is_boot_sample(f"n{i}"))
    [rid] = (await pool.scripts.scale_decide(
        PoolConfig(min_ready=1).policy_args(pool.now, "r1"))).reservations
    pool.clock.advance(1_000)
    await pool.scripts.apply_node_status(pool.now, node, "booting")  # the first record
    behind = pool.now - 500
    answered = await pool.scripts.register_node(behind, rid, node, behind)
    assert answered.code is Registration.ALREADY_KNOWN
    assert (await pool.node(node))["asked_ms"] == str(behind)
    pool.clock.advance(59_000)
    await pool.scripts.apply_node_status(pool.now, node, "ready")
    assert float(await pool.redis.hget(pool.keys.key("model"), "boot_ms")) == 59_500


async def _ready_before_the_answer(
        pool: PoolUnderTest, *, asked: int | None, answered: bool = True, ended: bool = False,
) -> tuple[str, RegisterResult | None, dict[str, str]]:
    """A sample boot asked for at pool.now whose create call is slow: its `booting` status
    comes 0.2 s after the ask, its `ready` 60 s after, (when `ended`, its `terminated` at 61 s)
    and the POST answers at 65 s (when `answered`). Returns the node, the answer's result and
    the model's hash after it all."""
    node = next(f"n{i}" for i in range(100) if is_boot_sample(f"n{i}"))
    [rid] = (await pool.scripts.scale_decide(
        PoolConfig(min_ready=1).policy_args(pool.now, "r1"))).reservations
    pool.clock.advance(200)
    await pool.scripts.apply_node_status(pool.now, node, "booting")
    pool.clock.advance(59_800)
    await pool.scripts.apply_node_status(pool.now, node, "ready")
    assert (await pool.node(node))["state"] == "ready"
    pool.clock.advance(1_000)
    if ended:
        await pool.scripts.apply_node_status(pool.now, node, "terminated")
    pool.clock.advance(4_000)
    result = await pool.scripts.register_node(pool.now, rid, node, asked) if answered else None
    return node, result, await pool.redis.hgetall(pool.keys.key("model"))


async def test_a_boot_ready_before_its_create_answers_is_timed_from_the_ask(
        pool: PoolUnderTest) -> None:
    """Found by the last session's note: a node whose `ready` came before its POST's answer
    was timed from its `booting`, the pool's first record of it, when the ready came; the
    time the create was asked, which the answer brings, came too late to count. A Node API
    slower to answer than a node to boot taught a lead time short by the call's latency. Now
    such a boot is learned when the answer comes."""
    asked = pool.now
    node, _, model = await _ready_before_the_answer(pool, asked=asked)
    assert float(model["boot_ms"]) == 60_000
    assert model["boot_n"] == "1"
    assert (await pool.node(node))["asked_ms"] == str(asked)


async def test_a_boot_ready_before_an_answer_with_no_time_is_timed_from_its_first_record(
        pool: PoolUnderTest) -> None:
    """A replica of the release before sends no time asked: timed from the `booting`, as
    ever, once."""
    _, _, model = await _ready_before_the_answer(pool, asked=None)
    assert float(model["boot_ms"]) == 59_800
    assert model["boot_n"] == "1"


async def test_a_boot_whose_create_never_answers_teaches_nothing(pool: PoolUnderTest) -> None:
    """The replica that asked stopped before the answer: when it was asked is never known, and
    the boot is not learned short from its `booting` instead. The node serves all the same."""
    node, _, model = await _ready_before_the_answer(pool, asked=None, answered=False)
    assert "boot_ms" not in model and "boot_n" not in model
    assert (await pool.redis.lrange(pool.keys.key("ready"), 0, -1)) == [node]


async def test_a_late_answer_teaches_its_boot_once(pool: PoolUnderTest) -> None:
    """register_node made again (a reply lost) finds the boot learned already."""
    node, _, model = await _ready_before_the_answer(pool, asked=pool.now)
    rid = (await pool.node(node))["reservation"]
    await pool.scripts.register_node(pool.now, rid, node, T0)
    assert await pool.redis.hgetall(pool.keys.key("model")) == model


async def test_a_boot_ended_before_its_answer_is_still_learned(pool: PoolUnderTest) -> None:
    """The node booted, then ended (a crash) before the POST answered: its boot was a boot,
    and the answer, which finds a tombstone, teaches it."""
    _, result, model = await _ready_before_the_answer(pool, asked=pool.now, ended=True)
    assert result is not None and result.code is Registration.TOMBSTONE
    assert float(model["boot_ms"]) == 60_000 and model["boot_n"] == "1"


async def test_a_boot_adopted_with_no_create_in_flight_is_learned_when_ready(
        pool: PoolUnderTest) -> None:
    """A node whose status came with no create in flight (its reservation expired, say) has
    no answer to wait for: it is timed from its `booting` when its ready comes, as before."""
    node = next(f"n{i}" for i in range(100) if is_boot_sample(f"n{i}"))
    await pool.scripts.apply_node_status(pool.now, node, "booting")
    pool.clock.advance(50_000)
    await pool.scripts.apply_node_status(pool.now, node, "ready")
    model = await pool.redis.hgetall(pool.keys.key("model"))
    assert float(model["boot_ms"]) == 50_000 and model["boot_n"] == "1"


async def test_a_boot_whose_create_is_still_in_flight_is_not_given_up_in_an_idle_node_s_place(
        pool: PoolUnderTest) -> None:
    """A boot seen on node:status before its POST answered (unclaimed) stands for its create
    in flight: given up, the create counts as spare again (observe), so the swap lowers no
    spare, the next tick reaps the idle node as surplus too, and once the POST answers with
    the node given up the pool is below its target."""
    cfg = PoolConfig(min_ready=0, scaling_policy="heuristic", conversion=1.0, keep_window_s=0,
                     idle_timeout_s=0, create_timeout_s=600)
    await pool.boot("n2")
    await engage(pool, ("u1", "u2"), cfg.window_ms)
    [rid] = (await pool.scripts.scale_decide(cfg.policy_args(pool.now, "r1"))).reservations
    pool.clock.advance(cfg.window_ms + 3000)  # u2 leaves: target 1
    await engage(pool, ("u1",), cfg.window_ms)
    await pool.scripts.apply_node_status(pool.now, "b1", "booting")  # not a sample; unclaimed
    assert await pool.redis.zscore(pool.keys.key("unclaimed"), "b1") is not None
    ended = []
    for _ in range(2):
        pool.clock.advance(1000)
        await pool.scripts.scale_decide(cfg.policy_args(pool.now, "r1"))
        ended += await pool.scripts.reap_idle(cfg.policy_args(pool.now, "r1"))
    assert len(ended) == 1, ended  # two nodes for a target of 1: one goes
    await pool.scripts.register_node(pool.now, rid, "b1")  # the POST answers
    pool.clock.advance(1000)
    decision = await pool.scripts.scale_decide(cfg.policy_args(pool.now, "r1"))
    assert decision.numbers["spare"] == 1 and decision.reservations == [], decision.reason


async def test_reap_idle_looks_at_the_20_youngest_boots_left_for_each_node_it_reaps(
        pool: PoolUnderTest) -> None:
    """One call reaps three idle nodes. The youngest boot is the only one of the 20 youngest
    that is not a sample; once it is given up, the 20 youngest left reach one boot further, to
    the next one that is not, and so on. (reap_idle reads the boots once per call and walks
    them; this pins that its choice is the one reading the 20 youngest again for each node
    would make.)"""
    config = PoolConfig(scaling_policy="heuristic", min_ready=0, idle_timeout_s=60)
    samples = (f"s{i}" for i in range(200) if is_boot_sample(f"s{i}"))
    others = (f"o{i}" for i in range(200) if not is_boot_sample(f"o{i}"))
    for node in ("r1", "r2", "r3"):
        await pool.boot(node)
    # Oldest first: two that may go, 19 samples, then the youngest, which may go.
    order = [next(others), next(others)] + [next(samples) for _ in range(19)] + [next(others)]
    for node in order:
        await pool.scripts.apply_node_status(pool.now, node, "booting")
        pool.clock.advance(1000)
    pool.clock.advance(60_000)
    reaped = [(t.node_id, t.reason)
              for t in await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))]
    # The youngest (rank 0); then the oldest two, ranks 20 and 21 of the boots at first.
    assert reaped == [(order[-1], "surplus_boot"), (order[1], "surplus_boot"),
                      (order[0], "surplus_boot")]
    assert all([(await pool.node(n))["state"] == "booting" for n in order[2:-1]])
    assert [(await pool.node(n))["state"] for n in ("r1", "r2", "r3")] == ["ready"] * 3


async def test_reap_idle_keeps_the_peak_target_of_the_keep_window(pool: PoolUnderTest) -> None:
    # The heuristic's target is easy to steer: ceil(engaged users x 0.5).
    config = PoolConfig(scaling_policy="heuristic", min_ready=0, idle_timeout_s=0,
                        activity_window_s=60, keep_window_s=300)
    for node in ("n1", "n2", "n3", "n4"):
        await pool.boot(node)
    await engage(pool, "abcdef", config.window_ms)
    decision = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
    assert decision.numbers["target"] == 3
    # The browsing is over and the target is back to 0, but a peak of 3 was set 61 s ago:
    # only the node beyond it goes.
    pool.clock.advance(61_000)
    decision = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
    assert decision.numbers["target"] == 0
    reaped = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert [t.node_id for t in reaped] == ["n1"]
    await pool.scripts.apply_node_status(pool.now, "n1", "terminated")
    assert "keep 3 (peak target of 300s), target 0" in (await pool.redis.xrevrange(
        pool.keys.key("decisions"), count=1))[0][1]["reason"]
    pool.clock.advance(238_000)  # 299 s after the peak: still kept
    await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
    assert await pool.scripts.reap_idle(config.policy_args(pool.now, "r1")) == []
    pool.clock.advance(2_000)  # 301 s: the peak left the window
    await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
    reaped = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert [t.node_id for t in reaped] == ["n2", "n3", "n4"]
    # The sliding maximum holds one entry per distinct target, peak first.
    assert await pool.redis.lrange(pool.keys.key("targets"), 0, -1) == [f"{pool.now}:0"]


async def test_a_tick_reads_the_keep_level_from_the_head_of_the_targets_list_alone(
        pool: PoolUnderTest) -> None:
    """The targets list holds an entry for every fall of the target within the keep window (a
    pool whose target fell by one at each tick of the last 50 minutes: 3,000). The keep level
    is its head, but scale_decide and reap_idle each read the whole list for it (LRANGE 0 -1),
    at every tick: work that grew with the pool's target, not a handful of entries."""
    config = PoolConfig(scaling_policy="heuristic", min_ready=0, keep_window_s=3600)
    targets = pool.keys.key("targets")
    n = 3000  # ms rising and targets falling from head to tail, the head 3,000 s old
    await pool.redis.rpush(targets, *[f"{pool.now - (n - i) * 1000}:{n - i}" for i in range(n)])
    commands = []
    async with pool.redis.monitor() as monitor:  # every command, those of the scripts too
        decision = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
        await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
        await pool.redis.echo("tick over")
        async for command in monitor.listen():
            if command["command"] == "ECHO tick over":
                break
            commands.append(command["command"].split())
    assert decision.numbers["keep"] == n  # the peak of the keep window: the head
    length = await pool.redis.llen(targets)
    assert length == n + 1  # this tick's target, 0, joined the tail
    spans = [range(length)[int(c[2]):int(c[3]) + 1 if int(c[3]) != -1 else None]
             for c in commands if c[0].upper() == "LRANGE" and c[1] == targets]
    assert spans, "the keep level is read"
    assert sum(len(span) for span in spans) <= 64, [(s.start, s.stop) for s in spans]


async def test_reap_idle_keeps_the_spare_a_replace_holds_above_the_keep_level_and_no_more(
        pool: PoolUnderTest) -> None:
    """Held 1 above a keep level of 1, three idle ready nodes: one is reaped, two kept. Its
    decision says the keep level with the hold in it, and holds it (`held` in its numbers,
    which `provisioner replace` waits to see before a batch)."""
    config = PoolConfig(scaling_policy="heuristic", min_ready=1, idle_timeout_s=60)
    for node in ("n1", "n2", "n3"):
        await pool.boot(node)
    await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))  # the peak: 1
    assert await pool.scripts.hold_spare(pool.now, "take", "run1", 1, 30_000) == (Hold.HELD, "")
    pool.clock.advance(120_000)  # all idle past the timeout
    reaped = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert [t.reason for t in reaped] == ["idle"]
    assert len(await pool.ready_list()) == 2
    [(_, entry)] = (await pool.redis.xrevrange(pool.keys.key("decisions"), count=1))
    assert "spare 3, keep 2 (" in entry["reason"], entry["reason"]
    assert ", and 1 held for a replace)" in entry["reason"], entry["reason"]
    assert json.loads(entry["numbers"])["held"] == 1


async def test_the_target_moves_are_counted(pool: PoolUnderTest) -> None:
    config = PoolConfig(scaling_policy="heuristic", min_ready=0, activity_window_s=60)

    async def browse_and_decide(users: str) -> int:
        await engage(pool, users, config.window_ms)
        decision = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
        pool.clock.advance(61_000)  # the browsing leaves the window before the next decision
        return int(decision.numbers["target"])

    assert [await browse_and_decide(users) for users in ("abcd", "", "ab", "abcdef")] == [
        2, 0, 1, 3]
    snap = await pool.snap()
    # the first decision rises from 0, as its creates are counted (+2); then -2, +1, +2
    assert (snap.stat("target_raised"), snap.stat("target_lowered")) == (5, 2)


async def test_each_create_is_counted_as_on_a_rise_or_to_refill(pool: PoolUnderTest) -> None:
    config = PoolConfig(scaling_policy="heuristic", min_ready=0, activity_window_s=60)

    async def browse(users: str) -> None:
        await engage(pool, users, config.window_ms)

    async def decide() -> list[str]:
        pool.clock.advance(1000)  # one decision per interval
        return (await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))).reservations

    await browse("abcd")  # 4 engaged x 0.5: target 2, from nothing
    first = await decide()
    assert len(first) == 2
    for node, rid in zip(("n1", "n2"), first, strict=True):
        await pool.scripts.register_node(pool.now, rid, node)
        await pool.scripts.apply_node_status(pool.now, node, "ready")
    # A user nobody saw browsing takes a ready node: the target stays 2, spare is 1.
    assert (await pool.scripts.allocate(pool.now, "x")).node_id == "n1"
    assert len(await decide()) == 1
    await browse("efgh")  # target 4; spare 1 ready + 1 creating: 2 on the rise
    assert len(await decide()) == 2
    # Both at once: the target rises by 1 and a connect uses a ready node.
    await browse("ij")
    assert (await pool.scripts.allocate(pool.now, "y")).node_id == "n2"
    assert len(await decide()) == 2
    scaling = (await pool.snap()).scaling()
    assert (scaling.creates, scaling.on_rise, scaling.to_refill) == (7, 5, 2)
    # the first target rises from nothing (+2), as its creates are counted; then +2, +1
    assert (scaling.raised, scaling.lowered) == (5, 0)
    assert scaling.describe().startswith(
        "scaling: 7 creates (5 on a rise of the target, 2 to refill spare used), 0 "
        "terminations; the target raised by 5 and lowered by 0")


async def test_a_peak_set_exactly_keep_window_ago_still_holds_for_both_scripts(
        pool: PoolUnderTest) -> None:
    # The keep level is the highest target of the last keep_window, its edge included, and the
    # reaper and the tick's trim of the list agree on it: a tick at that instant must not drop
    # the peak the reaper still counts.
    config = PoolConfig(scaling_policy="heuristic", min_ready=0, idle_timeout_s=0,
                        activity_window_s=60, keep_window_s=300)
    for node in ("n1", "n2", "n3"):
        await pool.boot(node)
    await engage(pool, "abcd", config.window_ms)
    assert (await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))).numbers[
        "target"] == 2
    pool.clock.advance(300_000)  # exactly keep_window after the peak; the browsing is over
    reaped = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert [t.node_id for t in reaped] == ["n1"]  # keep 2
    decision = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
    assert decision.numbers["target"] == 0
    assert await pool.scripts.reap_idle(config.policy_args(pool.now, "r1")) == []
    pool.clock.advance(1000)
    await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
    reaped = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert [t.node_id for t in reaped] == ["n2", "n3"]


async def test_every_decision_says_whether_it_was_a_surge(pool: PoolUnderTest) -> None:
    # `"surge": false` in the numbers of a policy that has no surge too (the heuristic's), so
    # that a reader of `status --json` or the decisions stream finds the field in every one.
    config = PoolConfig(scaling_policy="heuristic", min_ready=0)
    decision = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
    assert decision.numbers["surge"] is False


async def test_keep_level_survives_garbage_in_the_targets_list(pool: PoolUnderTest) -> None:
    config = PoolConfig(min_ready=0, idle_timeout_s=0, keep_window_s=300)
    await pool.redis.rpush(pool.keys.key("targets"), "junk", f"{pool.now}:7", "x:y")
    await pool.boot("n1")
    assert await pool.scripts.reap_idle(config.policy_args(pool.now, "r1")) == []  # keep 7
    await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
    targets = await pool.redis.lrange(pool.keys.key("targets"), 0, -1)
    assert targets[0] == f"{pool.now}:7" and "junk" not in targets and "x:y" not in targets


async def test_reap_idle_returns_a_node_once_whatever_the_delete_timeout(
    pool: PoolUnderTest,
) -> None:
    # Found by a fuzz of the settings: a delete timeout under a millisecond put a stuck boot in
    # `terminating` with a deadline of now, and the same call sent it again as a retry.
    config = PoolConfig(boot_timeout_s=60, delete_timeout_s=0.0005)
    # Refused at start now (the scripts count in milliseconds); the script is safe without it.
    assert config.problems() == ["delete_timeout_s must be in [0.001, 86400]"]
    await pool.scripts.apply_node_status(pool.now, "n0", "booting")
    pool.clock.advance(60_000)
    reaped = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert [(t.node_id, t.reason) for t in reaped] == [("n0", "boot_timeout")]
    pool.clock.advance(1)  # its deadline passed: sent again, once
    reaped = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert [(t.node_id, t.reason) for t in reaped] == [("n0", "retry")]


async def test_reap_idle_never_touches_allocated_nodes(pool: PoolUnderTest) -> None:
    config = PoolConfig(min_ready=0, idle_timeout_s=0)
    await pool.boot("n1")
    await pool.scripts.allocate(pool.now, "u1")
    pool.clock.advance(10**7)
    assert await pool.scripts.reap_idle(config.policy_args(pool.now, "r1")) == []


async def test_stuck_boots_are_terminated_and_deletes_retried(pool: PoolUnderTest) -> None:
    config = PoolConfig(min_ready=0, boot_timeout_s=600, delete_timeout_s=60)
    await pool.scripts.apply_node_status(pool.now, "slow", "booting")
    pool.clock.advance(600_001)
    [term] = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert (term.node_id, term.reason) == ("slow", "boot_timeout")
    # The replica that sent the DELETE died: after the deadline another one sends it again.
    pool.clock.advance(60_001)
    [retry] = await pool.scripts.reap_idle(config.policy_args(pool.now, "r2"))
    assert (retry.node_id, retry.reason) == ("slow", "retry")
    assert (await pool.node("slow"))["delete_attempts"] == "2"
    assert await pool.scripts.confirm_terminate(pool.now, "slow", "gone", 0) is True
    assert (await pool.node("slow"))["state"] == "terminated"
    assert await pool.scripts.confirm_terminate(pool.now, "slow", "gone", 0) is False


async def test_a_boot_is_stuck_only_past_three_learned_mean_boots(pool: PoolUnderTest) -> None:
    """Where boots are learned to take 5 minutes, one of 11 is slow, not lost: the timeout is
    the larger of --boot-timeout and 3 learned mean boots."""
    config = PoolConfig(min_ready=0, max_nodes=0, boot_timeout_s=600)
    await pool.scripts.apply_node_status(pool.now, "n2", "booting")  # a boot-time sample
    pool.clock.advance(300_000)
    await pool.scripts.apply_node_status(pool.now, "n2", "ready")  # learned: 300 s
    await pool.scripts.allocate(pool.now, "u")  # not idle: no boot is given up in its place
    await pool.scripts.apply_node_status(pool.now, "slow", "booting")
    pool.clock.advance(899_999)  # the old rule ended it at 600 s
    assert await pool.scripts.reap_idle(config.policy_args(pool.now, "r1")) == []
    pool.clock.advance(1)
    [term] = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert (term.node_id, term.reason) == ("slow", "boot_timeout")
    [decision] = await pool.redis.xrevrange(pool.keys.key("decisions"), count=1)
    assert "stuck 1 past 900s" in decision[1]["reason"]
    # Short learned boots leave the configured timeout as it is.
    await pool.redis.hset(pool.keys.key("model"), "boot_ms", 60_000)
    await pool.scripts.apply_node_status(pool.now, "fast", "booting")
    pool.clock.advance(600_001)
    reaped = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert ("fast", "boot_timeout") in [(t.node_id, t.reason) for t in reaped]
    # Never past a day, however long the mean boot a model says (an import takes up to a day).
    await pool.redis.hset(pool.keys.key("model"), "boot_ms", 86_400_000)
    await pool.scripts.apply_node_status(pool.now, "lost", "booting")
    pool.clock.advance(86_400_001)
    reaped = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert ("lost", "boot_timeout") in [(t.node_id, t.reason) for t in reaped]


def _samples(prefix: str = "n", count: int = 4) -> list[str]:
    """The first `count` boot-time samples among prefix0, prefix1, ..."""
    return [n for n in (f"{prefix}{i}" for i in range(400)) if is_boot_sample(n)][:count]


async def _ended_as_stuck(pool: PoolUnderTest, config: PoolConfig, *nodes: str) -> None:
    """reap_idle, now, ends `nodes` and no other as stuck (idle nodes it may end besides), and
    their DELETEs are confirmed."""
    reaped = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert [(t.node_id, t.reason) for t in reaped
            if t.reason == "boot_timeout"] == [(n, "boot_timeout") for n in nodes]
    for node in nodes:
        await pool.scripts.confirm_terminate(pool.now, node, "gone", 0)


async def _stuck_line(pool: PoolUnderTest) -> tuple[str | None, str | None]:
    """The raised stuck line and the line it was raised from, as the model holds them."""
    return tuple(await pool.redis.hmget(pool.keys.key("model"),  # type: ignore[return-value]
                                        "stuck_line_ms", "stuck_base_ms"))


async def test_boots_that_all_outlast_the_timeout_back_the_stuck_line_off_until_one_ends(
        pool: PoolUnderTest) -> None:
    """Found by a review's replay: where every boot takes 12 minutes, past the default 10, none
    ever ended, so none was learned, and each was ended as stuck and asked for again, for good:
    no user was ever served. A boot stuck with none ended since it began raises the stuck line
    by the timeout: the next boot runs on and ends ready, and is learned as any boot; once 3
    learned means pass the raised line, it is dropped. A stuck boot teaches no boot time."""
    config = PoolConfig(min_ready=0, max_nodes=0, boot_timeout_s=600)
    model, stats = pool.keys.key("model"), pool.keys.key("stats")
    first, second = _samples(count=2)
    await pool.scripts.apply_node_status(pool.now, first, "booting")
    pool.clock.advance(3_600_000)  # found an hour on (the ticks paused)
    await _ended_as_stuck(pool, config, first)
    [decision] = await pool.redis.xrevrange(pool.keys.key("decisions"), count=1)
    assert "stuck 1 past 600s" in decision[1]["reason"]
    assert await _stuck_line(pool) == ("1200000", "600000")
    assert await pool.redis.hmget(model, "boot_ms", "boot_n") == [None, None]
    assert await pool.redis.hget(stats, "stuck_line_raised") == "1"
    await pool.scripts.apply_node_status(pool.now, second, "booting")
    pool.clock.advance(720_000)  # past the timeout, short of the raised line
    assert await pool.scripts.reap_idle(config.policy_args(pool.now, "r1")) == []
    await pool.scripts.apply_node_status(pool.now, second, "ready")
    assert await pool.redis.hmget(model, "boot_ms", "boot_n") == ["720000", "1"]
    assert await pool.redis.hget(model, "boot_seen_ms") == str(pool.now)
    assert await _stuck_line(pool) == ("1200000", "600000")  # it took longer than the old line
    assert await pool.scripts.reap_idle(config.policy_args(pool.now, "r1")) == []
    assert await _stuck_line(pool) == (None, None)  # 3 x 720 s is past it: moot


async def test_boots_found_stuck_together_end_only_as_far_as_the_raised_line(
        pool: PoolUnderTest) -> None:
    """A new pool's first four boots, begun together, all take 700 s: one reap finds the four
    past the timeout. The first raises the line, and the three after it, short of the new
    line, run on (a review: a line read once before the loop ended all four, and the pool
    asked again for boots 100 s from ready)."""
    config = PoolConfig(min_ready=0, max_nodes=0, boot_timeout_s=600)
    nodes = sorted(_samples(count=4))
    for node in nodes:
        await pool.scripts.apply_node_status(pool.now, node, "booting")
    pool.clock.advance(600_001)
    await _ended_as_stuck(pool, config, nodes[0])
    [decision] = await pool.redis.xrevrange(pool.keys.key("decisions"), count=1)
    assert "stuck 1 past 600s" in decision[1]["reason"]
    pool.clock.advance(100_000)
    for node in nodes[1:]:
        assert (await pool.scripts.apply_node_status(pool.now, node, "ready")).code \
            is NodeStatusOutcome.READY


async def test_lost_boots_in_a_quiet_pool_hold_the_line_back_only_until_a_boot_ends(
        pool: PoolUnderTest) -> None:
    """A quiet pool (one boot at a time) whose Node API loses two boots of three and boots the
    third in a minute: each lost boot has none ended since it began, and raises the line; the
    boot that ends in a minute brings it back. Taught as boots of the stuck line's length (an
    earlier version), the lost boots ran the mean, and the line, towards a day (two reviews);
    the mean stays the minute boots' own."""
    config = PoolConfig(min_ready=0, max_nodes=0, boot_timeout_s=600)
    model = pool.keys.key("model")
    nodes = iter(_samples(count=80))
    highest = 0
    for _ in range(20):
        for lost in (next(nodes), next(nodes)):
            await pool.scripts.apply_node_status(pool.now, lost, "booting")
            line, _ = await _stuck_line(pool)
            pool.clock.advance(int(line or 600_000) + 1)
            await _ended_as_stuck(pool, config, lost)
            highest = max(highest, int((await _stuck_line(pool))[0] or 0))
        good = next(nodes)
        await pool.scripts.apply_node_status(pool.now, good, "booting")
        pool.clock.advance(60_000)
        await pool.scripts.apply_node_status(pool.now, good, "ready")
        assert await _stuck_line(pool) == (None, None)
        pool.clock.advance(1)
    assert highest == 1_800_000
    assert float(await pool.redis.hget(model, "boot_ms")) == 60_000


@pytest.mark.parametrize("beside", ["not a sample", "listed booting", "first heard ready",
                                    "found ready by listing"])
async def test_a_boot_stuck_while_another_ends_raises_nothing(
        pool: PoolUnderTest, beside: str) -> None:
    """A new pool's lost boot, and another node's boot that ends after it began: boots end, and
    the lost one is a lost node. Any ready counts, heard or found by a reconcile's list (at its
    create's time, the earliest it could have ended), a sample's or not, an adopted node's too
    (reviews: each of these counted as no boot ended, and the lost boot raised the line)."""
    config = PoolConfig(min_ready=0, max_nodes=0, boot_timeout_s=600)
    [lost] = _samples(count=1)
    other = (next(n for n in (f"m{i}" for i in range(100)) if not is_boot_sample(n))
             if beside == "not a sample" else _samples("m", 1)[0])
    await pool.scripts.apply_node_status(pool.now, lost, "booting")
    pool.clock.advance(10_000)
    if beside in ("not a sample", "found ready by listing"):
        await pool.scripts.apply_node_status(pool.now, other, "booting")
    elif beside == "listed booting":
        await pool.scripts.apply_node_status(pool.now, other, "booting", listed=True)
    pool.clock.advance(60_000)
    await pool.scripts.apply_node_status(pool.now, other, "ready",
                                         listed=beside == "found ready by listing")
    pool.clock.advance(600_001 - 70_000)
    await _ended_as_stuck(pool, config, lost)
    assert await _stuck_line(pool) == (None, None)
    assert await pool.redis.hget(pool.keys.key("stats"), "stuck_line_raised") is None


async def test_a_stuck_boot_still_unclaimed_raises_nothing(pool: PoolUnderTest) -> None:
    """A boot whose create's POST has not answered may be the call's stall, not a boot's: read
    after start_terminating had taken the node off `unclaimed`, it counted (a review)."""
    config = PoolConfig(min_ready=0, max_nodes=0, boot_timeout_s=600, create_timeout_s=900)
    [node] = _samples(count=1)
    await pool.redis.zadd(pool.keys.key("pending"), {"r1:1": pool.now + 900_000})
    await pool.scripts.apply_node_status(pool.now, node, "booting")  # before its POST answered
    assert await pool.redis.zscore(pool.keys.key("unclaimed"), node) is not None
    pool.clock.advance(600_001)
    await _ended_as_stuck(pool, config, node)
    assert await _stuck_line(pool) == (None, None)


@pytest.mark.parametrize("boot_seen", ["ahead", "unknown"])
async def test_a_pool_whose_last_boot_ended_is_not_known_backs_off_for_the_boots_after(
        pool: PoolUnderTest, boot_seen: str) -> None:
    """'boot_seen_ms' past now (edited by hand, in microseconds, or by a replica whose clock
    ran ahead) was kept by every boot after it, and no boot began after it: the line never
    backed off again. None at all, in a pool that learned its boots under a release before
    it, stayed unknown where no boot ends any more (reviews). Either is taken as now at the
    first look: a boot begun before it raises nothing, the boots begun after it do, and a
    boot of 700 s comes to end ready."""
    config = PoolConfig(min_ready=0, max_nodes=0, boot_timeout_s=600)
    model = pool.keys.key("model")
    await pool.redis.hset(model, mapping={"boot_ms": 60_000, "boot_n": 30})
    if boot_seen == "ahead":
        await pool.redis.hset(model, "boot_seen_ms", pool.now * 1000)
    first, second, third = _samples(count=3)
    await pool.scripts.apply_node_status(pool.now, first, "booting")
    pool.clock.advance(600_001)
    await _ended_as_stuck(pool, config, first)
    assert await _stuck_line(pool) == (None, None)
    assert await pool.redis.hget(model, "boot_seen_ms") == str(pool.now)
    pool.clock.advance(1)
    await pool.scripts.apply_node_status(pool.now, second, "booting")
    pool.clock.advance(600_001)
    await _ended_as_stuck(pool, config, second)
    assert await _stuck_line(pool) == ("1200000", "600000")
    await pool.scripts.apply_node_status(pool.now, third, "booting")
    pool.clock.advance(700_000)
    assert await pool.scripts.reap_idle(config.policy_args(pool.now, "r1")) == []
    assert (await pool.scripts.apply_node_status(pool.now, third, "ready")).code \
        is NodeStatusOutcome.READY


async def test_an_import_stands_for_boots_seen_to_end_and_drops_a_raised_line(
        pool: PoolUnderTest) -> None:
    """An imported boot time stands for boots seen to end at the import, and the line raised
    before it goes with the model it replaces."""
    config = PoolConfig(min_ready=0, max_nodes=0, boot_timeout_s=600)
    model = pool.keys.key("model")
    [node] = _samples(count=1)
    await pool.scripts.apply_node_status(pool.now, node, "booting")
    pool.clock.advance(600_001)
    await _ended_as_stuck(pool, config, node)
    assert await _stuck_line(pool) == ("1200000", "600000")
    loaded = await pool.scripts.load_model(pool.now, {"boot_ms": 60_000.0, "boot_n": 30.0},
                                           replace=True)
    assert loaded.loaded and await pool.redis.hget(model, "boot_seen_ms") == str(pool.now)
    assert await _stuck_line(pool) == (None, None)


@pytest.mark.parametrize("line", ["90000000", "1e15", "1e300"])
async def test_a_raised_line_past_a_day_is_not_kept(pool: PoolUnderTest, line: str) -> None:
    """A raised line is never past a day (reap_idle raises it at most to a day); one edited by
    hand past it (here without its base, so no boot that ends brings it back) kept every boot,
    a lost one too, for good."""
    config = PoolConfig(min_ready=0, max_nodes=0, boot_timeout_s=600)
    await pool.redis.hset(pool.keys.key("model"), "stuck_line_ms", line)
    [node] = _samples(count=1)
    await pool.scripts.apply_node_status(pool.now, node, "booting")
    pool.clock.advance(86_400_001)
    await _ended_as_stuck(pool, config, node)


async def test_ready_for_a_terminating_node_is_ignored(pool: PoolUnderTest) -> None:
    config = PoolConfig(min_ready=0, boot_timeout_s=1)
    await pool.scripts.apply_node_status(pool.now, "n1", "booting")
    pool.clock.advance(2000)
    await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    late = await pool.scripts.apply_node_status(pool.now, "n1", "ready")
    assert late.code is NodeStatusOutcome.IGNORED
    assert await pool.ready_list() == []
    done = await pool.scripts.apply_node_status(pool.now, "n1", "terminated")
    assert done.code is NodeStatusOutcome.TERMINATED
    assert (await pool.snap()).counts["terminating"] == 0


async def test_a_late_ready_or_booting_for_a_node_in_a_session_changes_nothing(
        pool: PoolUnderTest) -> None:
    """A copy of a node's `ready` (another replica's, or the Node API's own repeat) arriving
    while the node serves a user is a duplicate: the user keeps the node, and it is not put
    back in the ready list for a second user. Only the state-machine test saw this before (a
    review's mutant that applied `ready` to any state passed every other test)."""
    await pool.boot("n1")
    await pool.scripts.allocate(pool.now, "u1")
    before = await pool.dump()
    for status in ("ready", "booting"):
        late = await pool.scripts.apply_node_status(pool.now, "n1", status)
        assert late.code is NodeStatusOutcome.DUPLICATE, status
    assert await pool.dump() == before
    assert await pool.alloc() == {"u1": "n1"} and await pool.ready_list() == []


async def test_a_node_the_reaper_ends_no_longer_stands_for_a_create_in_flight(
    pool: PoolUnderTest,
) -> None:
    """A node adopted while a create runs is presumably that create's (unclaimed), so the
    create is not counted beside it. A node being ended is counted in no supply: the create
    in flight counts again, or the pool would book a second node for the same want."""
    config = PoolConfig(min_ready=1, scaling_policy="heuristic", conversion=0, boot_timeout_s=1,
                        create_timeout_s=600)
    assert len((await pool.scripts.scale_decide(config.policy_args(pool.now, "r1")))
               .reservations) == 1
    await pool.scripts.apply_node_status(pool.now, "n1", "booting")  # unclaimed
    pool.clock.advance(2_000)
    [term] = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert (term.node_id, term.reason) == ("n1", "boot_timeout")
    assert (await pool.snap()).counts["unclaimed"] == 0
    decision = await pool.scripts.scale_decide(config.policy_args(pool.now, "r1"))
    assert (decision.numbers["spare"], decision.reservations) == (1, [])


async def test_an_expired_create_s_adopted_node_counts_once_as_supply(
    pool: PoolUnderTest,
) -> None:
    """Below max_nodes (the quota counts every create in flight): a create whose POST timed
    out after its node's status came leaves that node unclaimed; when its reservation expires,
    the entry goes with it, or it cancels a newer create out of the supply and the pool books
    a node it does not want."""
    config = await _a_create_expired_after_its_node_came(pool, max_nodes=10)
    decision = await pool.scripts.scale_decide(config(2))
    # n1 and the create in flight are the two wanted.
    assert (decision.numbers["spare"], decision.reservations) == (2, [])


@pytest.mark.parametrize("outcome", ["sent", "failed"])
async def test_a_delete_answered_is_sent_again_at_the_deadline_its_answer_set(
    pool: PoolUnderTest, outcome: str,
) -> None:
    config = PoolConfig(min_ready=0, boot_timeout_s=60, delete_timeout_s=60)
    await pool.scripts.apply_node_status(pool.now, "n1", "booting")
    pool.clock.advance(60_000)
    [term] = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert term.reason == "boot_timeout"  # its deadline: 60 s from now
    pool.clock.advance(30_000)  # the DELETE's answer took 30 s
    assert await pool.scripts.confirm_terminate(pool.now, "n1", outcome, pool.now + 60_000)
    pool.clock.advance(59_999)  # past the first deadline, not the answer's
    assert await pool.scripts.reap_idle(config.policy_args(pool.now, "r1")) == []
    pool.clock.advance(1)
    [retry] = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert (retry.node_id, retry.reason) == ("n1", "retry")


async def test_a_ready_node_goes_once_idle_for_exactly_the_idle_timeout(
    pool: PoolUnderTest,
) -> None:
    config = PoolConfig(min_ready=0, scaling_policy="heuristic", conversion=0, idle_timeout_s=60)
    await pool.boot("n1")
    pool.clock.advance(59_999)
    assert await pool.scripts.reap_idle(config.policy_args(pool.now, "r1")) == []
    pool.clock.advance(1)
    reaped = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert [(t.node_id, t.reason) for t in reaped] == [("n1", "idle")]


async def test_reap_idle_keeps_min_ready_nodes_ready_however_many_boot(
    pool: PoolUnderTest,
) -> None:
    """Boots count in spare, not in the floor: of three idle nodes over a floor of two, one
    goes, though spare is three over the target."""
    config = PoolConfig(min_ready=2, scaling_policy="heuristic", conversion=0, idle_timeout_s=60)
    for node in ("n1", "n2", "n3"):
        await pool.boot(node)
    # Boot-time samples: never given up in an idle node's place, so the ready nodes are chosen.
    for node in [f"b{i}" for i in range(100) if is_boot_sample(f"b{i}")][:2]:
        await pool.scripts.apply_node_status(pool.now, node, "booting")
    pool.clock.advance(120_000)
    reaped = await pool.scripts.reap_idle(config.policy_args(pool.now, "r1"))
    assert [(t.node_id, t.reason) for t in reaped] == [("n1", "idle")]
    assert await pool.ready_list() == ["n2", "n3"]


# --- heartbeat ------------------------------------------------------------------------------


def _listed(beat: Heartbeat) -> tuple[int, int]:
    """The replicas a heartbeat found heard from, and those it forgot."""
    return beat.replicas, beat.forgotten


async def test_heartbeats_list_the_replicas_and_forget_the_silent_ones(
    pool: PoolUnderTest,
) -> None:
    scripts, now = pool.scripts, pool.now
    said = {"lag_s": 0.25, "subscribed": True, "started_ms": now, "interval_s": 2.0}
    assert _listed(await scripts.heartbeat("r1", said, 60_000)) == (1, 0)
    lagging = {**said, "lag_s": 7.5}
    assert _listed(await scripts.heartbeat("r2", lagging, 60_000)) == (2, 0)
    await heard_ago(pool.redis, pool.keys, "r2", 1_000)
    # r1 again, with what it says now: its entry is the latest heartbeat's
    assert _listed(await scripts.heartbeat("r1", {**said, "lag_s": 9.0}, 60_000)) == (2, 0)
    seen = await scripts.replicas()
    assert [(r.replica_id, r.lag_s, r.subscribed) for r in seen] == [
        ("r1", 9.0, True), ("r2", 7.5, True)]
    assert seen[0].age_s < 1 and 1 <= seen[1].age_s < 2
    # r1 goes quiet: listed as silent after three heartbeats (10 s at least), forgotten after
    # forget_ms by anyone's heartbeat.
    await heard_ago(pool.redis, pool.keys, "r1", 10_500)
    assert [(r.replica_id, r.silent) for r in await scripts.replicas()] == [
        ("r2", False), ("r1", True)]
    # Each replica's mark of its last connect or disconnect goes with it.
    for replica in ("r1", "r2", "r3"):
        await scripts.run(scripts.release_call(now, "nobody", mark=f"{replica}:i:1"))
    await heard_ago(pool.redis, pool.keys, "r1", 61_000)
    assert _listed(await scripts.heartbeat("r2", said, 60_000)) == (1, 1)
    assert [r.replica_id for r in await scripts.replicas()] == ["r2"]
    assert await pool.redis.hkeys(pool.keys.key("replica_info")) == ["r2"]
    await scripts.heartbeat("r3", said, 60_000)
    await scripts.leave("r3")
    assert await pool.redis.hkeys(pool.keys.key("applied")) == ["r2"]


async def test_heartbeats_are_stamped_by_the_server_s_clock(pool: PoolUnderTest) -> None:
    """A replica's clock ten minutes ahead took every other replica for silent and dropped it
    from `provisioner status`; one ten minutes behind was itself listed as silent for those ten
    minutes, and forgotten by the others. A heartbeat takes no time from the replica: the
    script stamps it with the server's (TIME), the one clock every replica shares."""
    said = {"interval_s": 2.0}
    before = time.time() * 1000
    for replica in ("r1", "r2", "r1"):
        await pool.scripts.heartbeat(replica, said, 60_000)
    after = time.time() * 1000
    stamps = await pool.redis.zrange(pool.keys.key("replicas"), 0, -1, withscores=True)
    assert len(stamps) == 2 and all(before - 1 <= ms <= after + 1 for _, ms in stamps)
    seen = await pool.scripts.replicas()
    assert not any(r.silent for r in seen) and all(r.age_s < 1 for r in seen)


async def _server_ms(redis: aioredis.Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_each_heartbeat_is_kept_in_the_pool_s_record_of_beats_for_forget_ms(
    pool: PoolUnderTest,
) -> None:
    """judge_gap reads when the server served the replicas from `beats`: every heartbeat is
    there, stamped by the server's clock, for forget_ms; a replica leaving adds none."""
    beats = pool.keys.key("beats")
    old = await _server_ms(pool.redis) - 61_000
    await pool.redis.zadd(beats, {f"r9@{old}": old})
    before = await _server_ms(pool.redis)
    for replica in ("r1", "r2", "r1"):
        await pool.scripts.heartbeat(replica, {"interval_s": 2.0}, 60_000)
        await asyncio.sleep(0.005)  # a replica's two beats of one ms are one entry
    after = await _server_ms(pool.redis)
    kept = await pool.redis.zrange(beats, 0, -1, withscores=True)
    assert len(kept) == 3, kept  # r9's, past forget_ms, trimmed
    assert sorted(member.split("@")[0] for member, _ in kept) == ["r1", "r1", "r2"]
    assert all(before <= ms <= after and member.endswith(f"@{int(ms)}")
               for member, ms in kept), kept
    await pool.scripts.leave("r2")
    assert await pool.redis.zcard(beats) == 3


async def _judged(pool: PoolUnderTest, gap_ms: int, *beats_ago: int,
                  intervals: tuple[object, ...] = (2.0,)) -> Any:
    """judge_gap of a gap begun `gap_ms` before the server's now (edges 500 and 3,000 ms),
    with a heartbeat of another replica each of `beats_ago` ms before now, and replicas of
    this release saying each of `intervals` (the heartbeats that say them are at now: in the
    end edge)."""
    for i, interval in enumerate(intervals):
        await pool.scripts.heartbeat(f"r{i}", {"interval_s": interval, "keeps_beats": True},
                                     600_000)
    now = await _server_ms(pool.redis)
    if beats_ago:
        await pool.redis.zadd(pool.keys.key("beats"),
                              {f"other@{now - ago}": now - ago for ago in beats_ago})
    return await pool.scripts.judge_gap(now - gap_ms, 500, 3_000)


async def test_a_gap_in_which_the_server_served_no_replica_is_judged_a_pause(
    pool: PoolUnderTest,
) -> None:
    """A gap of 10 s, a heartbeat 1 s before it, none in it: the server served no one (twice
    the longest interval, 4 s, fits in the 6.5 s judged)."""
    judged = await _judged(pool, 10_000, 11_000)
    assert (judged.verdict, judged.beats, judged.needed_ms, judged.beats_before) == (
        "pause", 0, 4_000, 1)
    assert 6_400 <= judged.span_ms <= 6_600 and 9_900 <= judged.gap_ms <= 10_200


@pytest.mark.parametrize("ago", [8_000, 3_600], ids=["early in the gap", "late in the gap"])
async def test_a_gap_in_which_the_server_served_another_replica_is_judged_served(
    pool: PoolUnderTest, ago: int,
) -> None:
    judged = await _judged(pool, 10_000, 11_000, ago)
    assert (judged.verdict, judged.beats) == ("served", 1)


@pytest.mark.parametrize("ago", [9_700, 2_000], ids=["the start edge", "the end edge"])
async def test_a_heartbeat_in_a_gap_s_edges_is_not_taken_for_the_server_serving(
    pool: PoolUnderTest, ago: int,
) -> None:
    """The start edge is the replica's error in reading the server's clock; the end edge holds
    what the server ran as it answered again (every replica's heartbeats queued in a pause)."""
    judged = await _judged(pool, 10_000, 11_000, ago)
    assert (judged.verdict, judged.beats) == ("pause", 0)


@pytest.mark.parametrize(("gap_ms", "before", "intervals"), [
    (6_000, (7_000,), (2.0,)),
    (10_000, (), (2.0,)),
    (10_000, (11_000,), (2.0, 5.0)),
    (10_000, (11_000,), ()),
], ids=["too short to tell", "no heartbeat before it", "a replica beats every 5 s",
        "no replica says its interval"])
async def test_a_gap_the_heartbeats_cannot_tell_is_judged_unknown(
    pool: PoolUnderTest, gap_ms: int, before: tuple[int, ...], intervals: tuple[float, ...],
) -> None:
    """A span shorter than twice the longest interval (4 s for 2.5 s judged; 10 s for 6.5 s
    where one replica beats every 5 s), or no heartbeat in that length before the gap (the
    pool's heartbeats not running), cannot tell a pause from a cut."""
    judged = await _judged(pool, gap_ms, *before, intervals=intervals)
    assert (judged.verdict, judged.beats) == ("unknown", 0), judged


async def test_judge_gap_reads_past_an_interval_edited_by_hand(pool: PoolUnderTest) -> None:
    """An interval edited by hand says nothing, and an entry that does not say it keeps beats
    cannot vouch for its replica: no pause is judged while one is listed."""
    keeps = '"keeps_beats": true'
    await pool.redis.hset(pool.keys.key("replica_info"), mapping={
        "h2": "[1, 2]", "h3": f'{{"interval_s": "2", {keeps}}}',
        "h4": f'{{"interval_s": -3, {keeps}}}', "h5": f'{{"interval_s": 1e999, {keeps}}}'})
    judged = await _judged(pool, 10_000, 11_000)
    assert (judged.verdict, judged.needed_ms, judged.unvouched) == (
        "unknown", 4_000, "replica h2 runs a release that keeps no beats")
    await pool.redis.hdel(pool.keys.key("replica_info"), "h2")
    judged = await _judged(pool, 10_000, 11_000)
    assert (judged.verdict, judged.needed_ms, judged.unvouched) == ("pause", 4_000, "")
    await pool.redis.hset(pool.keys.key("replica_info"), "h1", "not json")
    assert (await _judged(pool, 10_000, 11_000)).verdict == "unknown"
    with pytest.raises(ResponseError, match="judge_gap: ARGV must be three numbers"):
        await pool.scripts._call("judge_gap", "soon", 500, 3_000)


@pytest.mark.parametrize("unseen", ["a release before beats", "heartbeats off"])
async def test_a_gap_is_no_pause_while_a_replica_applies_events_and_keeps_no_beats(
    pool: PoolUnderTest, unseen: str,
) -> None:
    """A replica that applies events and writes no beats could have applied them all through
    the gap unseen: one of the release before (a rolling upgrade: its heartbeat says no
    `keeps_beats`) or one with --heartbeat-interval 0 (a mark in `applied`, no heartbeat). A
    review proved a replica cut off alone beside either taken for a pause, its late copy of a
    disconnect ending the session its user had begun since."""
    if unseen == "heartbeats off":
        await pool.redis.hset(pool.keys.key("applied"), "quiet", "b.1:1")
        why = "replica quiet applies events with no heartbeat"
    else:
        await pool.scripts.heartbeat("older", {"interval_s": 2.0}, 600_000)
        why = "replica older runs a release that keeps no beats"
    judged = await _judged(pool, 10_000, 11_000)
    assert (judged.verdict, judged.beats, judged.unvouched) == ("unknown", 0, why)


@pytest.mark.parametrize("call", ["connect", "disconnect"])
async def test_a_try_run_past_its_deadline_is_refused_whole(
    pool: PoolUnderTest, call: str,
) -> None:
    """A try whose mark ends in '@ms' run after that server time (bytes a cut held, delivered
    as it healed; a call a paused server ran as it came back) is one its replica stopped
    waiting for: refused, nothing written but its count, its mark not kept. In time, it
    applies, and the pool keeps its mark without the deadline."""
    scripts = pool.scripts
    for status in ("booting", "ready"):
        await scripts.run(scripts.apply_node_status_call(pool.now, "n1", status))
    await scripts.allocate(pool.now, "alice")
    now = await _server_ms(pool.redis)

    def make(mark: str) -> Any:
        if call == "connect":
            return scripts.allocate_call(pool.now, "bob", "r1", 1000, mark)
        return scripts.release_call(pool.now, "alice", mark=mark)

    stats = pool.keys.key("stats")
    before = {key: await pool.redis.dump(key) for key in await pool.redis.keys("*")
              if key != stats}
    counted = await pool.redis.hgetall(stats)
    with pytest.raises(ResponseError, match=r"LATE call r1:b\.1:1: run \d+ ms after"):
        await scripts.run(make(f"r1:b.1:1@{now - 1_000}"))
    assert {key: await pool.redis.dump(key) for key in await pool.redis.keys("*")
            if key != stats} == before
    # counted, as no replica reads the refusal: the one write
    assert await pool.redis.hgetall(stats) == {**counted, "calls_late": "1"}
    result = await scripts.run(make(f"r1:b.1:1@{now + 60_000}"))
    assert result.code.name in ("WAITING", "RELEASED"), result
    assert await pool.redis.hget(pool.keys.key("applied"), "r1") == "b.1:1"
    # made again in time: not applied again
    again = await scripts.run(make(f"r1:b.1:1@{now + 60_000}"))
    assert again.code.name == "MADE_AGAIN"


def test_a_replica_s_time_up_is_read_by_its_own_clock() -> None:
    """Started at 1,000 ms by its clock, which ran 2 s ahead of the server's at its last
    heartbeat: at the server's 10,000 ms it has been up 11 s by its clock. With no offset known
    yet (its first heartbeat), the server's clock is taken for its own."""
    said = {"started_ms": 1_000, "clock_offset_s": 2.0}
    assert ReplicaSeen.of("r1", 0, said, 10_000).up_s == 11.0
    assert ReplicaSeen.of("r1", 0, {"started_ms": 1_000}, 10_000).up_s == 9.0
    assert ReplicaSeen.of("r1", 0, {"started_ms": 20_000}, 10_000).up_s == 0.0
    assert ReplicaSeen.of("r1", 0, said).up_s is None


async def test_a_heartbeat_returns_the_server_s_clock(pool: PoolUnderTest) -> None:
    before = time.time() * 1000
    server_ms = (await pool.scripts.heartbeat("r1", {}, 60_000)).server_ms
    # The same machine's clock: within the call, give or take the TIME's rounding.
    assert before - 1 <= server_ms <= time.time() * 1000 + 1


async def test_a_heartbeat_that_is_not_a_json_object_is_refused_and_writes_nothing(
    pool: PoolUnderTest,
) -> None:
    before = await pool.dump()
    for bad in ("not json", "[1, 2]"):
        with pytest.raises(aioredis.ResponseError, match="not a JSON object"):
            await pool.scripts._call("heartbeat", "r1", bad, 60_000, "e1")
    assert await pool.dump() == before


async def test_forgetting_is_bounded_per_heartbeat(pool: PoolUnderTest) -> None:
    for k in range(25):
        await pool.scripts.heartbeat(f"dead-{k}", {}, 60_000)
    for k in range(25):
        await heard_ago(pool.redis, pool.keys, f"dead-{k}", 120_000)
    assert _listed(await pool.scripts.heartbeat("r1", {}, 60_000)) == (16, 10)
    assert _listed(await pool.scripts.heartbeat("r1", {}, 60_000)) == (6, 10)
    assert _listed(await pool.scripts.heartbeat("r1", {}, 60_000)) == (1, 5)
    assert [r.lag_s for r in await pool.scripts.replicas()] == [None]


async def test_the_first_heartbeat_sets_the_pools_epoch_and_every_one_returns_it(
    pool: PoolUnderTest,
) -> None:
    """The epoch is the server's time the state began and the first replica's token: dated by
    the one clock every replica shares, so `provisioner status` says how long ago by it."""
    scripts = pool.scripts
    beat = await scripts.heartbeat("r1", {}, 60_000, "e1")
    epoch, server_ms = beat.epoch, beat.server_ms
    assert epoch == f"{server_ms}-e1"
    # another replica's token, a later heartbeat: the epoch that stands is returned, unchanged
    assert (await scripts.heartbeat("r2", {}, 60_000, "e2")).epoch == epoch
    beat = await scripts.heartbeat("r1", {}, 60_000, "e3")
    # every heartbeat counts itself, so a state put back from an older copy counts fewer; the
    # count began with the state, at its first heartbeat
    assert (beat.epoch, beat.count, beat.count_since) == (epoch, 3, str(server_ms))
    # the state is lost: the next heartbeat, whoever's, begins a new epoch
    await pool.redis.flushdb()
    beat = await scripts.heartbeat("r2", {}, 60_000, "e4")
    lost, server_ms = beat.epoch, beat.server_ms
    assert lost == f"{server_ms}-e4" and (beat.count, beat.count_since) == (1, str(server_ms))
    await scripts.leave("r2")  # a replica leaving is not counted
    beat = await scripts.heartbeat("r1", {}, 60_000, "e5")
    assert (beat.epoch, beat.count, beat.count_since) == (lost, 2, str(server_ms))
    # A count deleted or edited by hand begins again, with a new beginning, which no replica
    # compares with the old (a review: a repaired count read as an older copy, and paged).
    stats = pool.keys.key("stats")
    await pool.redis.hset(stats, "heartbeats", "3 (by hand)")
    beat = await scripts.heartbeat("r1", {}, 60_000)
    assert beat.count == 1 and beat.count_since == str(beat.server_ms)
    assert await pool.redis.hget(stats, "values_repaired") == "1"
    assert (await scripts.heartbeat("r1", {}, 60_000)).count == 2
    await pool.redis.hdel(stats, "heartbeats_since")
    beat = await scripts.heartbeat("r1", {}, 60_000)
    assert beat.count == 1 and beat.count_since == str(beat.server_ms)
    # the count deleted, its beginning left: begun again all the same
    await pool.redis.hset(stats, "heartbeats_since", "1000")
    await pool.redis.hdel(stats, "heartbeats")
    beat = await scripts.heartbeat("r1", {}, 60_000)
    assert beat.count == 1 and beat.count_since == str(beat.server_ms)
    # with no token given, the client makes a random one
    await pool.redis.flushdb()
    beat = await scripts.heartbeat("r1", {}, 60_000)
    first, server_ms = beat.epoch, beat.server_ms
    assert re.fullmatch(rf"{server_ms}-[0-9a-f]{{12}}", first)
    await pool.redis.flushdb()
    assert (await scripts.heartbeat("r1", {}, 60_000)).epoch != first


async def test_a_heartbeat_with_no_token_for_the_epoch_is_refused_and_writes_nothing(
    pool: PoolUnderTest,
) -> None:
    before = await pool.dump()
    for args in (("r1", "{}", 60_000), ("r1", "{}", 60_000, "")):
        with pytest.raises(aioredis.ResponseError, match="no token for the epoch"):
            await pool.scripts._call("heartbeat", *args)
    assert await pool.dump() == before


async def test_a_decision_under_an_epoch_the_pool_does_not_hold_is_refused_and_writes_nothing(
    pool: PoolUnderTest,
) -> None:
    """A replica passes the epoch it last saw: if the pool's state was lost since (no epoch, or
    another), the tick sees an empty pool that is not the one that replica ran on, and a
    decision there would boot a pool beside the nodes still running."""
    config = PoolConfig(min_ready=2)
    scripts, now = pool.scripts, pool.now
    epoch = (await scripts.heartbeat("r1", {}, 60_000, "e1")).epoch
    before = await pool.dump()
    for other in ("e0", f"{epoch}0"):
        decision = await scripts.scale_decide(config.policy_args(now, "r1", epoch=other))
        assert (decision.won, decision.epoch_changed, decision.reservations) == (False, True, [])
    assert await pool.dump() == before
    await pool.redis.flushdb()  # the state is lost: no epoch at all
    decision = await scripts.scale_decide(config.policy_args(now, "r1", epoch=epoch))
    assert decision.epoch_changed and await pool.redis.dbsize() == 0
    # the epoch that stands, or none known to the replica: the tick decides as before
    epoch = (await scripts.heartbeat("r1", {}, 60_000, "e3")).epoch
    decision = await scripts.scale_decide(config.policy_args(now, "r1", epoch=epoch))
    assert decision.won and len(decision.reservations) == 2
    decision = await scripts.scale_decide(config.policy_args(now + 1_000, "r1", 1, epoch=""))
    assert decision.won and not decision.epoch_changed


async def test_an_applied_mark_broken_by_hand_never_applies_a_call_again_silently(
    pool: PoolUnderTest,
) -> None:
    """A review of made_again: `applied` edited by hand (here one character appended to a
    replica's entry) was read as no entry at all. alice's disconnect and connect, made again
    after a lost reply under the marks of the batch that entry names, were applied again: the
    session the first try began ended and another began on the other node (what the marks are
    for), with nothing counted or said. A call of that batch is refused instead (named and
    dropped by the listener: no call applied twice, none skipped silently), and the broken
    value is counted in values_repaired: once, not once for each call of the batch that found
    it (the count ran high: two here), nor for each question asked about them."""
    batch, _ = await _alice_moved_by_a_marked_batch(pool, 1)
    assert await pool.alloc() == {"alice": "n2"}
    applied = pool.keys.key("applied")
    assert await pool.redis.hget(applied, "r1") == "a1:2"
    await pool.redis.hset(applied, "r1", "a1:2 ")  # an edit by hand
    before = await pool.dump()
    for call in batch:  # made again after the lost reply
        with pytest.raises(ResponseError, match="UNREADABLE"):
            await pool.scripts.run(call)
    # the listener's question about the first of them, asked twice (its reply lost once)
    for _ in range(2):
        with pytest.raises(ResponseError, match="UNREADABLE"):
            await pool.scripts.run(pool.scripts.release_call(pool.now, "alice", mark="r1:a1:1?"))
    after = await pool.dump()
    assert await pool.alloc() == {"alice": "n2"}  # the session the first try began
    assert int(after["stats"].pop("values_repaired", 0)) == 1
    assert after["stats"] == before["stats"]  # nothing applied again
    # the replica's next batch writes the entry afresh, and counts nothing more
    assert (await pool.scripts.run(pool.scripts.release_call(
        pool.now, "alice", mark="r1:a2:1"))).code is Release.RELEASED
    assert await pool.redis.hget(applied, "r1") == "a2:1"
    assert int((await pool.dump())["stats"]["values_repaired"]) == 1


async def test_an_applied_mark_of_another_batch_broken_by_hand_is_counted_once(
    pool: PoolUnderTest,
) -> None:
    """An entry broken by hand under another batch's name is of no use to a call of this one,
    which writes it afresh; a question about this batch refused as never run before any call
    of it writes the entry leaves it as found, and counted: asked again, it counts nothing
    more."""
    await pool.boot("n1")
    applied = pool.keys.key("applied")
    await pool.redis.hset(applied, "r1", "a0:x")  # an edit by hand
    for _ in range(2):
        with pytest.raises(ResponseError, match="NOT RUN"):
            await pool.scripts.run(pool.scripts.allocate_call(
                pool.now, "alice", "r1", mark="r1:a1:1?"))
    assert int((await pool.dump())["stats"]["values_repaired"]) == 1
    assert (await pool.scripts.run(pool.scripts.allocate_call(
        pool.now, "alice", "r1", mark="r1:a1:1"))).code is Allocation.ALLOCATED
    assert await pool.redis.hget(applied, "r1") == "a1:1"
    assert int((await pool.dump())["stats"]["values_repaired"]) == 1


@pytest.mark.parametrize("edit", ["a1:8:17", "a1:81-7", "a1:8:7-1"],
                         ids=["a dash deleted", "a colon deleted", "a range reversed"])
async def test_an_applied_mark_whose_passed_over_seqs_are_broken_by_hand_is_unreadable(
    pool: PoolUnderTest, edit: str,
) -> None:
    """Final review of made_again: an entry broken by hand is refused for its batch (2232306),
    but only when the whole entry fails the pattern; one whose passed-over seqs were broken
    still read as an entry. alice's disconnect r1:a1:3, refused while bob's connect r1:a1:8
    ran (passed over: it never ran), made again after the lost reply, was then taken for made
    again: MADE_AGAIN, logged as applied, her node held on, nothing named."""
    await pool.boot("n1")
    await pool.scripts.allocate(pool.now, "alice")  # n1
    assert (await pool.scripts.run(pool.scripts.allocate_call(
        pool.now, "bob", "r1", mark="r1:a1:8"))).code is Allocation.WAITING
    applied = pool.keys.key("applied")
    assert await pool.redis.hget(applied, "r1") == "a1:8:1-7"
    await pool.redis.hset(applied, "r1", edit)  # an edit by hand
    with pytest.raises(ResponseError, match=r"UNREADABLE|PASSED OVER"):
        await pool.scripts.run(pool.scripts.release_call(pool.now, "alice", mark="r1:a1:3"))
    assert await pool.alloc() == {"alice": "n1"}


@pytest.mark.parametrize(("rules", "denied"), [
    (["&user:*"], []),
    (["&user:allocated"], ["PUBLISH user:waiting"]),
    (["&user:*", "-xadd"], ["XADD"]),
])
def test_a_user_allowed_only_the_pool_s_keys_is_refused_only_what_it_may_not_run(
        redis_url: str, rules: list[str], denied: list[str]) -> None:
    """A replica's user given the pool's keys alone (`~prov:{pool}:*`) may run every command
    of the scripts on them: the check asked DEL of the pool's key and three keys named "0",
    and refused DEL to such a user, so no correctly configured replica started."""
    import redis

    from provisioner.scripts import commands_refused

    plain = redis.Redis.from_url(redis_url)
    user = "pool-keys-only"
    plain.execute_command("ACL", "SETUSER", user, "reset", "on", ">pw", "~prov:{acl-p}:*",
                          "+@all", "-@dangerous", *rules)

    async def refused() -> list[str]:
        client = aioredis.Redis.from_url(redis_url.replace("redis://", f"redis://{user}:pw@", 1))
        try:
            return await commands_refused(client, PoolKeys("acl-p"))
        finally:
            await client.aclose()

    try:
        assert asyncio.run(refused()) == denied
    finally:
        plain.acl_deluser(user)
        plain.close()


async def test_lost_boots_in_a_quiet_pool_whose_boots_outlast_the_old_line_do_not_ratchet_it(
        pool: PoolUnderTest) -> None:
    """A quiet pool (one boot at a time) of one-minute boots whose Node API turns to 12-minute
    boots and loses every other one. Each lost boot has none ended since it began and raises
    the line; each good boot ends past the line before the first raise ('stuck_base_ms'), so
    it brings nothing back, and once the line is past 3 learned means of 720 s nothing ever
    drops it: every lost boot raised it by the timeout again, towards a day."""
    config = PoolConfig(min_ready=0, max_nodes=0, boot_timeout_s=600)
    model = pool.keys.key("model")
    await pool.redis.hset(model, mapping={"boot_ms": 60_000, "boot_n": 30,
                                          "boot_seen_ms": pool.now})
    pool.clock.advance(1)
    nodes = iter(_samples(count=80))
    highest = 0
    for _ in range(30):
        lost = next(nodes)
        await pool.scripts.apply_node_status(pool.now, lost, "booting")
        line, _ = await _stuck_line(pool)
        mean = float(await pool.redis.hget(model, "boot_ms"))
        pool.clock.advance(int(max(float(line or 0), 3 * mean, 600_000)) + 1)
        await _ended_as_stuck(pool, config, lost)
        highest = max(highest, float((await _stuck_line(pool))[0] or 0))
        good = next(nodes)
        await pool.scripts.apply_node_status(pool.now, good, "booting")
        pool.clock.advance(720_000)
        await _ended_as_stuck(pool, config)  # ends no boot (the last good node, idle, may go)
        await pool.scripts.apply_node_status(pool.now, good, "ready")
        pool.clock.advance(1)
    # The boots need 3 x 720 s at most (the learned mean's line); a lost boot's raise over it
    # is the timeout's.
    assert highest <= 3 * 720_000 + 600_000
