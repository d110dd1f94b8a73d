"""`provisioner replace`: every node replaced in turn, never more ready nodes out than
--at-once, against the pool's own transitions (a replica played in-process here; a real one in
tests/test_e2e.py)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from typer.testing import CliRunner

from provisioner import replace as rolling
from provisioner.cli import app
from provisioner.clock import ManualClock
from provisioner.config import PoolConfig
from provisioner.keys import PoolKeys
from provisioner.scripts import Scripts
from provisioner.view import check_invariants
from tests.helpers import PoolUnderTest

# The floor alone: a target of three spare nodes, nothing forecast; a decision every half
# second, ten polls of `replace` apart, so a next batch that did not wait for the decision
# after the drain would be drained before it.
FLOOR = PoolConfig(min_ready=3, scaling_policy="heuristic", conversion=0, tick_interval_s=0.5)


@pytest.fixture
async def pool(aredis: aioredis.Redis) -> AsyncIterator[PoolUnderTest]:
    keys = PoolKeys("roll")
    yield PoolUnderTest(aredis, keys, Scripts(aredis, keys), ManualClock())


async def old_pool(pool: PoolUnderTest) -> None:
    """n1..n3 ready (n1 idle the longest), n4 in the session of u1."""
    for node in ("n4", "n1", "n2", "n3"):
        await pool.boot(node)
    await pool.scripts.allocate(pool.now, "u1")  # n4, idle the longest


async def replica(pool: PoolUnderTest, boot_s: float, stop: asyncio.Event,
                  low: list[int]) -> None:
    """A replica of the floor, by the wall clock: decides, creates (each node ready `boot_s`
    after its create), reaps, and confirms every DELETE at once. `low` keeps the fewest ready
    nodes seen."""
    scripts, made, k = pool.scripts, {}, 0
    while not stop.is_set():
        now = int(time.time() * 1000)
        decision = await scripts.scale_decide(FLOOR.policy_args(now, "r1"))
        for rid in decision.reservations:
            k += 1
            node = f"new{k}"
            await scripts.register_node(now, rid, node)
            await scripts.apply_node_status(now, node, "booting")
            made[node] = time.monotonic() + boot_s
        for node, due in list(made.items()):
            if time.monotonic() >= due:
                await scripts.apply_node_status(now, node, "ready")
                del made[node]
        for ended in await scripts.reap_idle(FLOOR.policy_args(now, "r1")):
            await scripts.apply_node_status(now, ended.node_id, "terminated")
        low.append(await pool.redis.llen(pool.keys.key("ready")))
        await asyncio.sleep(0.02)


async def replaced_with_a_replica(pool: PoolUnderTest, at_once: int
                                  ) -> tuple[rolling.Outcome, list[str], int]:
    """The old pool replaced at `at_once` while a replica plays the floor (boots of 0.4 s):
    the outcome, what it said, and the fewest ready nodes the replica saw meanwhile."""
    await old_pool(pool)
    stop, low = asyncio.Event(), [99]
    ticking = asyncio.create_task(replica(pool, 0.4, stop, low))
    await asyncio.sleep(0.2)
    before = await rolling.cutoff_now(pool.redis, pool.keys)
    said: list[str] = []
    outcome = await rolling.replace_nodes(pool.redis, pool.keys, before, by="op",
                                          at_once=at_once, wait_limit_s=20, say=said.append,
                                          poll_s=0.05)
    stop.set()
    await ticking
    return outcome, said, min(low[1:])


async def test_ready_nodes_are_replaced_one_at_a_time_each_after_its_replacement_is_ready(
        pool: PoolUnderTest) -> None:
    """At --at-once 1 the pool never holds fewer than its floor less one ready node: each
    drain waits for a replica's decision after the last and for the boot it began. The node
    in a session is drained in it; the old ones end, the new ones stay."""
    outcome, said, fewest = await replaced_with_a_replica(pool, 1)
    assert outcome.done, said
    assert outcome.drained == ["n1", "n2", "n3"] and outcome.marked == ["n4"]
    assert outcome.in_sessions == ["n4"]
    assert fewest == 2  # three at the floor, one out at a time
    for node in ("n1", "n2", "n3"):
        assert (await pool.node(node))["state"] == "terminated"
    assert (await pool.node("n4"))["drain_by"] == "op"
    ready = await pool.ready_list()
    assert len(ready) == 3 and all(node.startswith("new") for node in ready)
    assert "n1: drained (ready); 2 to go" in said
    assert "n4: in the session of user u1, terminated when it ends" in said
    assert any(line.startswith("waiting for 1 boot(s) the pool began") for line in said), said
    assert await check_invariants(pool.redis, pool.keys.pool) == []


async def test_at_once_drains_that_many_together(pool: PoolUnderTest) -> None:
    outcome, said, fewest = await replaced_with_a_replica(pool, 2)
    assert outcome.done and outcome.drained == ["n1", "n2", "n3"]
    assert said[1] == "n1, n2: drained (ready); 1 to go", said
    assert fewest == 1


async def test_with_no_replica_deciding_it_drains_one_batch_and_stops_at_the_limit(
        pool: PoolUnderTest) -> None:
    """Nothing takes the next batch on trust: with no decision after the drain, it waits,
    then stops saying for what."""
    await old_pool(pool)
    before = await rolling.cutoff_now(pool.redis, pool.keys)
    said: list[str] = []
    outcome = await rolling.replace_nodes(pool.redis, pool.keys, before, by="op",
                                          wait_limit_s=0.3, say=said.append, poll_s=0.05)
    assert not outcome.done and outcome.drained == ["n1"] and outcome.marked == ["n4"]
    assert outcome.waited_for == "a replica to decide after the last drain"
    assert said[-1] == "waiting for a replica to decide after the last drain"
    assert await pool.ready_list() == ["n2", "n3"]


async def test_a_pool_short_of_its_target_is_not_drained(pool: PoolUnderTest) -> None:
    await old_pool(pool)
    await pool.redis.hset(pool.keys.key("stats"), "last_numbers",
                          json.dumps({"target": 5, "spare": 3}))
    assert await rolling.shortfall(pool.redis, pool.keys) == 2  # 3 ready of 5
    before = await rolling.cutoff_now(pool.redis, pool.keys)
    outcome = await rolling.replace_nodes(pool.redis, pool.keys, before, by="op",
                                          wait_limit_s=0.3, say=lambda _: None, poll_s=0.05)
    assert not outcome.done and outcome.drained == []
    assert outcome.waited_for == "the pool, 2 node(s) short of its target, to catch up"
    assert await pool.ready_list() == ["n1", "n2", "n3"]


async def test_only_nodes_created_before_the_cutoff_are_replaced(pool: PoolUnderTest) -> None:
    await old_pool(pool)
    cutoff = pool.now + 1
    pool.clock.advance(1_000)
    await pool.boot("later")
    old = await rolling.old_nodes(pool.redis, pool.keys, cutoff)
    assert [(n.node, n.state, n.user) for n in old] == [
        ("n1", "ready", ""), ("n2", "ready", ""), ("n3", "ready", ""),
        ("n4", "allocated", "u1")]
    assert await rolling.cutoff_now(pool.redis, pool.keys) > pool.now  # past the newest


def test_the_cli_shows_its_plan_refuses_without_a_replica_and_takes_back_its_drains(
        redis_url: str) -> None:
    """The plan's counts and the cutoff to go on with; no replica heard from: nothing is
    drained; --cancel takes back the drains placed under --by, and no other's."""
    pool = "roll-cli"
    keys = PoolKeys(pool)

    async def setup() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        under = PoolUnderTest(client, keys, Scripts(client, keys), ManualClock())
        await old_pool(under)
        await under.boot("n5")
        await under.scripts.allocate(under.now, "u2")  # n1
        await under.scripts.drain_node(under.now, "n1", "bob")
        await client.aclose()

    asyncio.run(setup())
    common = ["--redis-url", redis_url, "--pool", pool]
    plan = CliRunner().invoke(app, ["replace", *common, "--by", "op"], input="n\n",
                              env={"COLUMNS": "200"})
    assert plan.exit_code == 1, plan.output
    assert "3 ready, 0 booting, 2 in a session (1 not drained yet)" in plan.output
    assert "--created-before " in plan.output
    assert "no replica of pool roll-cli has sent a heartbeat in the last minute" in plan.output
    assert json.loads(CliRunner().invoke(app, ["nodes", *common, "--json"]).output)[0][
        "state"] != "terminating"

    async def mark_n4_as_op() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        scripts = Scripts(client, keys)
        await scripts.drain_node(int(time.time() * 1000), "n4", "op")
        await client.aclose()

    asyncio.run(mark_n4_as_op())
    back = CliRunner().invoke(app, ["replace", *common, "--by", "op", "--cancel", "--yes"],
                              env={"COLUMNS": "200"})
    assert back.exit_code == 0, back.output
    assert "1 in a session drained by op" in back.output
    assert "taken back 1 of 1" in back.output
    nodes = {n["id"]: n for n in json.loads(
        CliRunner().invoke(app, ["nodes", *common, "--json"]).output)}
    assert "drain_by" not in nodes["n4"] and nodes["n1"]["drain_by"] == "bob"
