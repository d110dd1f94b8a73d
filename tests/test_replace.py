"""`provisioner replace`: every node replaced in turn, --at-once at a time, each batch booted
before it goes (the run holds that many spare nodes above the pool's target), against the pool's
own transitions (a replica played in-process here; a real one in tests/test_e2e.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from typer.testing import CliRunner

from provisioner import replace as rolling
from provisioner.cli import app
from provisioner.clock import ManualClock
from provisioner.config import PoolConfig
from provisioner.keys import PoolKeys
from provisioner.scripts import Hold, Scripts
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


async def replica(pool: PoolUnderTest, stop: asyncio.Event, low: list[int], *,
                  boot_s: float = 0.4, delete_s: float = 0.0, fail_first: bool = False,
                  skew_ms: int = 0, unanswered: bool = False,
                  config: PoolConfig = FLOOR) -> None:
    """A replica of the floor, by the wall clock `skew_ms` off: decides, creates (each node
    ready `boot_s` after its create, the first one failed instead with `fail_first`; with
    `unanswered`, no create's POST answers: each node is known by its status alone), reaps,
    and confirms each DELETE `delete_s` after it. `low` keeps the fewest ready nodes seen."""
    scripts, booting, ending, k = pool.scripts, {}, {}, 0
    while not stop.is_set():
        now = int(time.time() * 1000) + skew_ms
        decision = await scripts.scale_decide(config.policy_args(now, "r1"))
        for rid in decision.reservations:
            k += 1
            node = f"new{k}"
            if not unanswered:
                await scripts.register_node(now, rid, node)
            await scripts.apply_node_status(now, node, "booting")
            booting[node] = time.monotonic() + boot_s
        for node, due in list(booting.items()):
            if time.monotonic() >= due:
                failed = fail_first and node == "new1"
                await scripts.apply_node_status(now, node, "terminated" if failed else "ready")
                del booting[node]
        for ended in await scripts.reap_idle(config.policy_args(now, "r1")):
            ending[ended.node_id] = time.monotonic() + delete_s
        for node, due in list(ending.items()):
            if time.monotonic() >= due:
                await scripts.apply_node_status(now, node, "terminated")
                del ending[node]
        low.append(await pool.redis.llen(pool.keys.key("ready")))
        await asyncio.sleep(0.02)


async def replaced_with_a_replica(pool: PoolUnderTest, at_once: int = 1, *,
                                  max_unavailable: int = 0,
                                  stop_after_first: bool = False, wait_limit_s: float = 20,
                                  **world: object) -> tuple[rolling.Outcome, list[str], int]:
    """The old pool replaced at `at_once` while a replica plays the floor (`replica`'s
    `world`): the outcome, what it said, and the fewest ready nodes the replica saw once
    the pool first held three. `stop_after_first`: the run is stopped after its first drain
    and run again with the same cutoff."""
    await old_pool(pool)
    stop, low = asyncio.Event(), [99]
    ticking = asyncio.create_task(replica(pool, stop, low, **world))  # type: ignore[arg-type]
    await asyncio.sleep(0.6)  # a first decision, at the floor already
    cutoff = await rolling.cutoff_now(pool.redis, pool.keys)
    said: list[str] = []
    seen_from = len(low)
    both = rolling.Outcome(done=False)  # what the two runs did, with stop_after_first
    if stop_after_first:
        drained = asyncio.Event()

        def say_until_drained(line: str) -> None:
            said.append(line)
            if ": drained" in line:
                drained.set()

        first = asyncio.create_task(rolling.replace_nodes(
            pool.redis, pool.keys, cutoff, by="op", at_once=at_once, say=say_until_drained,
            poll_s=0.05, outcome=both))
        await asyncio.wait_for(drained.wait(), 10)
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
    try:  # a run that drains its own replacements never stands still, nor ends
        outcome = await asyncio.wait_for(rolling.replace_nodes(
            pool.redis, pool.keys, cutoff, by="op", at_once=at_once,
            max_unavailable=max_unavailable, wait_limit_s=wait_limit_s, say=said.append,
            poll_s=0.05, outcome=both), 30)
    except TimeoutError:
        outcome = both
    for _ in range(250):  # the last replacements boot
        if await pool.redis.llen(pool.keys.key("ready")) >= 3:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await ticking
    return outcome, said, min(low[seen_from:])


async def test_ready_nodes_are_replaced_one_at_a_time_each_after_its_replacement_is_ready(
        pool: PoolUnderTest) -> None:
    """At --at-once 1 the pool never holds fewer ready nodes than its floor: the run holds one
    spare node above it, and each drain waits for a replica's decision after the last and for
    the pool's ready nodes to meet its keep level, the spare held with it (a review's drill:
    without the hold, a pool at a floor of one was drained to none before its replacement
    booted, and the next connect missed). The node in a session is drained in it; the old ones
    end, the new ones stay."""
    outcome, said, fewest = await replaced_with_a_replica(pool)
    assert outcome.done, said
    assert outcome.drained == ["n1", "n2", "n3"] and outcome.marked == ["n4"]
    assert outcome.in_sessions == ["n4"]
    assert fewest == 3, said  # three at the floor, held while each goes
    for node in ("n1", "n2", "n3"):
        assert (await pool.node(node))["state"] == "terminated"
    assert (await pool.node("n4"))["drain_by"] == "op (replace)"
    ready = await pool.ready_list()
    assert len(ready) == 3 and all(node.startswith("new") for node in ready)
    assert "n1: drained (ready); 2 ready or booting to go" in said
    assert "n4: in the session of user u1, terminated when it ends" in said
    assert ("waiting for the pool's ready nodes, less the users waiting, to meet its keep "
            "level" in said), said
    assert await check_invariants(pool.redis, pool.keys.pool) == []


async def test_at_once_drains_that_many_together(pool: PoolUnderTest) -> None:
    outcome, said, fewest = await replaced_with_a_replica(pool, 2)
    assert outcome.done and outcome.drained == ["n1", "n2", "n3"]
    assert "n1, n2: drained (ready); 1 ready or booting to go" in said, said
    assert "waiting for a decision that holds 2 spare node(s)" in said, said
    assert fewest == 3


@pytest.mark.parametrize("world", [
    # at the quota but for the spare held, until each DELETE is confirmed
    {"config": dataclasses.replace(FLOOR, max_nodes=5), "delete_s": 1.0},
    {"fail_first": True},          # the first replacement's boot fails and is made again
    {"stop_after_first": True},    # stopped after its first drain and run again
    {"skew_ms": -5_000},           # the replica's clock five seconds behind the server's
    {"skew_ms": 5_000},            # and ahead
    # every create's POST unanswered, each reservation lapsing before its node is ready: the
    # nodes known by their status alone, new ones all the same
    {"unanswered": True, "config": dataclasses.replace(FLOOR, create_timeout_s=0.3)},
])
async def test_whatever_holds_a_replacement_back_the_next_batch_waits_for_it(
        pool: PoolUnderTest, world: dict[str, object]) -> None:
    """A review's cases, in each of which the next batch went before the last one's
    replacement was ready, or replacements were taken for old nodes: the gate reads the
    pool's ready nodes, and the old nodes are told by the pool's create count, not by
    clocks."""
    outcome, said, fewest = await replaced_with_a_replica(pool, **world)
    assert outcome.done, said
    assert outcome.drained == ["n1", "n2", "n3"], said
    assert fewest == 3, said


async def test_a_pool_with_no_room_for_the_spare_held_is_not_drained(
        pool: PoolUnderTest) -> None:
    """At its max_nodes the pool cannot boot the spare the run holds: nothing is drained, and
    the run stops at its wait limit saying what it waited for (the ready nodes stay; the old
    node in a session goes with it)."""
    outcome, said, fewest = await replaced_with_a_replica(
        pool, config=dataclasses.replace(FLOOR, max_nodes=4), wait_limit_s=1.0)
    assert not outcome.done and outcome.drained == [] and outcome.marked == ["n4"], said
    assert outcome.waited_for == ("the pool's ready nodes, less the users waiting, to meet its "
                                  "keep level (3 against 4)"), said
    assert fewest == 3


@pytest.mark.parametrize(("at_once", "max_unavailable", "max_nodes", "lowest"), [
    (1, 1, 4, 2), (1, 1, 20, 2),  # at the quota (no room for the spare) and with room
    (2, 1, 4, 2), (1, 2, 4, 1),   # --at-once and N apart: N is the bound, not --at-once
])
async def test_max_unavailable_drains_that_many_below_the_keep_level_and_no_more(
        pool: PoolUnderTest, at_once: int, max_unavailable: int, max_nodes: int,
        lowest: int) -> None:
    """--max-unavailable N lets a batch go before its spare is ready, the pool then at most N
    ready nodes below its own keep level until the replacements are: so a pool at its
    max_nodes, which has no room for the spare, is replaced all the same (4: three ready and
    one in a session), and one with room goes no lower either."""
    outcome, said, fewest = await replaced_with_a_replica(
        pool, at_once, config=dataclasses.replace(FLOOR, max_nodes=max_nodes),
        max_unavailable=max_unavailable)
    assert outcome.done and outcome.drained == ["n1", "n2", "n3"], said
    assert fewest == lowest, said
    assert await check_invariants(pool.redis, pool.keys.pool) == []


def wall_ms() -> int:
    return int(time.time() * 1000)


#: Called before each drain_node of a run: the run's Scripts, the node, the call's keywords.
BeforeDrain = Callable[[Scripts, str, dict[str, Any]], Awaitable[None]]


async def small_pool_replaced(pool: PoolUnderTest, max_nodes: int, settle_s: float, *,
                              min_ready: int = 1, ready: tuple[str, ...] = ("n1",),
                              booting: tuple[str, ...] = (),
                              before_drain: tuple[pytest.MonkeyPatch, BeforeDrain] | None = None,
                              **run: Any) -> tuple[rolling.Outcome, list[str], list[int],
                                                   rolling.Cutoff]:
    """A pool at a floor of `min_ready` (`ready` nodes ready, `booting` booting, n4 in the
    session of u1) replaced with `run`'s options while a replica plays the floor, `settle_s`
    of ticks after the run: the outcome, what it said, the ready nodes the replica saw, and
    the cutoff. `before_drain`: a hook run before each of the run's drains."""
    floor = dataclasses.replace(FLOOR, min_ready=min_ready, max_nodes=max_nodes)
    # by the wall clock the replica ticks by: from T0 a boot is stuck at once, and a ready
    # node idle past the reaper's timeout
    for node in ("n4", *ready, *booting):
        await pool.scripts.apply_node_status(wall_ms(), node, "booting")
        if node not in booting:
            await pool.scripts.apply_node_status(wall_ms(), node, "ready")
    await pool.scripts.allocate(wall_ms(), "u1")  # n4
    if before_drain is not None:
        monkeypatch, hook = before_drain
        drain = Scripts.drain_node

        async def hooked(self: Scripts, now_ms: int, node_id: str, by: str, *args: Any,
                         **kwargs: Any) -> Any:
            await hook(self, node_id, kwargs)
            return await drain(self, now_ms, node_id, by, *args, **kwargs)

        monkeypatch.setattr(Scripts, "drain_node", hooked)
    stop, low = asyncio.Event(), [99]
    ticking = asyncio.create_task(replica(pool, stop, low, config=floor))
    await asyncio.sleep(0.6)
    cutoff = await rolling.cutoff_now(pool.redis, pool.keys)
    said: list[str] = []
    outcome = await asyncio.wait_for(rolling.replace_nodes(
        pool.redis, pool.keys, cutoff, by="op", say=said.append, poll_s=0.05, **run), 30)
    await asyncio.sleep(settle_s)
    stop.set()
    await ticking
    return outcome, said, low[1:], cutoff


@pytest.mark.parametrize("max_nodes", [2, 3])
async def test_max_unavailable_never_drains_the_last_ready_node(
        pool: PoolUnderTest, max_nodes: int) -> None:
    """A review: at --max-unavailable 1, a pool at a floor of one (its node n1, and n4 in a
    session) was drained to none, and the next connect waited. The last ready node stays:
    at max_nodes 2 (no room for the spare) the run stops at its limit having drained
    nothing, saying so; at 3 the spare boots first, and n1 goes."""
    outcome, said, low, _ = await small_pool_replaced(
        pool, max_nodes, 0.6, max_unavailable=1, wait_limit_s=2.0)
    assert min(low) == 1, said
    if max_nodes == 2:
        assert not outcome.done and outcome.drained == [], said
        assert outcome.waited_for == ("the pool's ready nodes, less the users waiting, to meet "
                                      "its keep level (1 against 2; 2 for --max-unavailable 1)")
    else:
        assert outcome.done and outcome.drained == ["n1"], said


@pytest.mark.parametrize(("at_once", "max_unavailable"), [(1, 0), (2, 0), (1, 1)])
async def test_the_last_batch_goes_with_no_boot_past_its_replacements(
        pool: PoolUnderTest, at_once: int, max_unavailable: int) -> None:
    """The hold's spare boots each batch's replacements before the batch goes; the last
    batch's were booted the same way, and once it went the hold still asked for as many
    again: a pool at a floor of one booted a second node as n1 went, and reaped it idle
    later. The last batch's drains take the hold down with them (drain_node's `last`): the
    pool boots the spare held, and nothing after."""
    # 1.5 s of ticks after it: enough to boot (0.4 s) anything the pool wanted more
    outcome, said, low, cutoff = await small_pool_replaced(
        pool, 4, 1.5, at_once=at_once, max_unavailable=max_unavailable)
    assert outcome.done and outcome.drained == ["n1"], said
    created = int(await pool.redis.get(pool.keys.key("seq")) or 0) - cutoff.creates
    assert created == at_once, said  # the spare held, booted before n1 went; nothing after
    assert len(await pool.ready_list()) == at_once and min(low) >= 1, said
    assert await check_invariants(pool.redis, pool.keys.pool) == []


async def test_a_session_s_node_freed_before_its_mark_is_replaced_after_the_last_batch(
        pool: PoolUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: u1 disconnected between the round's listing and n4's mark (refused: CHANGED),
    so n4 was ready but not in the round's batch, and n1 went as the last one, taking the
    hold to 0. The next round found n4 ready and waited to its limit for a decision holding
    the spare, which no renewal raised. A round with old nodes to go renews it at --at-once."""
    async def freed_first(scripts: Scripts, node: str, kwargs: dict[str, Any]) -> None:
        if node == "n4" and kwargs.get("expected") == "allocated:u1":
            while True:  # until a batch may go, then u1 leaves
                supply = await rolling.supply(pool.redis, pool.keys)
                if supply.held >= 1 and supply.keep is not None and supply.free >= supply.keep:
                    break
                await asyncio.sleep(0.05)
            await scripts.release(wall_ms(), "u1")

    outcome, said, low, _ = await small_pool_replaced(
        pool, 4, 0.6, wait_limit_s=3.0, before_drain=(monkeypatch, freed_first))
    assert outcome.done and outcome.drained == ["n1", "n4"] and outcome.marked == [], said
    assert min(low) >= 1, said


async def test_the_only_old_node_freed_before_its_mark_is_replaced_not_left_done(
        pool: PoolUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: the only old node, n4, was in a session when listed, which ended before its
    mark (CHANGED); the round then found nothing ready or booting in its listing and said
    "done", n4 back in the pool and never replaced. A round whose mark is refused lists
    again first."""
    async def freed_first(scripts: Scripts, node: str, kwargs: dict[str, Any]) -> None:
        if node == "n4" and kwargs.get("expected") == "allocated:u1":
            await scripts.release(wall_ms(), "u1")

    outcome, said, _, _ = await small_pool_replaced(
        pool, 4, 0.6, min_ready=0, ready=(), wait_limit_s=3.0,
        before_drain=(monkeypatch, freed_first))
    assert outcome.done and outcome.drained == ["n4"] and outcome.marked == [], said
    assert outcome.in_sessions == [], said
    assert (await pool.node("n4"))["state"] in ("terminating", "terminated")


async def test_a_mark_refused_at_every_round_holds_back_no_batch_and_is_named(
        pool: PoolUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: n4's session score edited by hand to a fraction, which the run reads to the
    ms, so its mark is refused (CHANGED) at every round. A first mend listed again before any
    batch at every such round: n1 was never drained, and the run stopped at its limit saying
    no node. The refusal holds back only "done"; n1 goes, and the run stops naming n4."""
    async def edited(scripts: Scripts, node: str, kwargs: dict[str, Any]) -> None:
        if node == "n4" and kwargs.get("expected") == "allocated:u1":
            began = await pool.redis.zscore(pool.keys.key("sessions"), "u1")
            await pool.redis.zadd(pool.keys.key("sessions"), {"u1": int(began) + 0.5})

    outcome, said, _, _ = await small_pool_replaced(
        pool, 4, 0.6, wait_limit_s=2.0, before_drain=(monkeypatch, edited))
    assert not outcome.done and outcome.drained == ["n1"] and outcome.marked == [], said
    assert outcome.waited_for == "n4 listed again (its session changed as it was marked)"


async def test_a_last_batch_refused_part_way_is_finished_when_its_node_comes_back(
        pool: PoolUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: at --at-once 2, n2 was handed to a user between the listing and its drain
    (CHANGED) while n1 went, taking the hold from 2 to 1; the session ended at once, n2 was
    ready again, and the run waited to its limit for a decision holding 2."""
    handed: list[str] = []

    async def taken_then_freed(scripts: Scripts, node: str, kwargs: dict[str, Any]) -> None:
        if node == "n2" and kwargs.get("expected") == "ready" and not handed:
            handed.append((await scripts.allocate(wall_ms(), "u2")).node_id or "")

            async def freed() -> None:
                await asyncio.sleep(0.05)
                await scripts.release(wall_ms(), "u2")

            asyncio.get_running_loop().create_task(freed())

    outcome, said, low, _ = await small_pool_replaced(
        pool, 6, 0.6, min_ready=2, ready=("n1", "n2"), at_once=2, wait_limit_s=3.0,
        before_drain=(monkeypatch, taken_then_freed))
    assert handed == ["n2"], handed
    assert outcome.done and sorted(outcome.drained) == ["n1", "n2"], said
    assert min(low) >= 2, said


async def test_a_batch_with_an_old_node_still_booting_is_not_the_last(
        pool: PoolUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    """b1, old, boots while the ready ones go: their batch is not the last (a review: without
    `not booting`, it took the hold down, b1 was ready after, and the run waited to its limit
    for a decision holding the spare)."""
    lasts: list[tuple[str, bool]] = []

    async def b1_ready_after_n2(scripts: Scripts, node: str, kwargs: dict[str, Any]) -> None:
        lasts.append((node, bool(kwargs.get("last"))))
        if node == "n2" and [n for n, _ in lasts].count("n2") == 1:
            async def ready() -> None:
                await asyncio.sleep(0.3)
                await scripts.apply_node_status(wall_ms(), "b1", "ready")

            asyncio.get_running_loop().create_task(ready())

    outcome, said, _, _ = await small_pool_replaced(
        pool, 8, 0.6, min_ready=2, ready=("n1", "n2"), booting=("b1",), at_once=2,
        max_unavailable=1, wait_limit_s=3.0, before_drain=(monkeypatch, b1_ready_after_n2))
    assert outcome.done and outcome.drained[-1] == "b1", (said, lasts)
    assert ("b1", True) in lasts and ("n2", True) not in lasts, lasts


async def decided_in(pool: PoolUnderTest, delay_s: float, numbers: dict[str, int]) -> None:
    """A replica's decision, as the run reads one: after `delay_s`, the decided slot moves and
    the last decision's numbers are `numbers`."""
    await asyncio.sleep(delay_s)
    await pool.redis.hset(pool.keys.key("stats"), "last_numbers", json.dumps(numbers))
    await pool.redis.set(pool.keys.key("tick_lock"), f"{time.time_ns()}")


async def test_with_no_replica_deciding_it_drains_nothing_or_one_batch_and_stops_at_the_limit(
        pool: PoolUnderTest) -> None:
    """Nothing takes a batch on trust: with no decision that holds the spare (none since the
    run began, or one of a replica of a release before the hold, which decides without: a
    review's drill drained a floor of one to none), it drains nothing; with one and none after
    its first drain, it drains one batch; it waits, then stops saying for what. Its hold is
    let go as it stops."""
    await old_pool(pool)
    await pool.redis.hset(pool.keys.key("stats"), "last_numbers", json.dumps({"target": 2}))
    cutoff = await rolling.cutoff_now(pool.redis, pool.keys)
    said: list[str] = []
    outcome = await rolling.replace_nodes(pool.redis, pool.keys, cutoff, by="op",
                                          wait_limit_s=0.3, say=said.append, poll_s=0.05)
    assert not outcome.done and outcome.drained == [] and outcome.marked == ["n4"]
    assert outcome.waited_for == "a decision that holds 1 spare node(s)"
    assert await pool.redis.get(pool.keys.key("replacing")) is None
    decided = asyncio.create_task(decided_in(pool, 0.1, {"target": 2, "keep": 3}))
    outcome = await rolling.replace_nodes(pool.redis, pool.keys, cutoff, by="op",
                                          wait_limit_s=0.5, say=said.append, poll_s=0.05)
    await decided
    assert not outcome.done and outcome.drained == []  # a release before the hold decided
    assert outcome.waited_for == "a decision that holds 1 spare node(s)"
    decided = asyncio.create_task(decided_in(pool, 0.1, {"target": 3, "keep": 3, "held": 1}))
    outcome = await rolling.replace_nodes(pool.redis, pool.keys, cutoff, by="op",
                                          wait_limit_s=0.5, say=said.append, poll_s=0.05)
    await decided
    assert not outcome.done and outcome.drained == ["n1"]
    assert outcome.waited_for == "a replica to decide after the last drain"
    assert said[-1] == "waiting for a replica to decide after the last drain"
    assert await pool.ready_list() == ["n2", "n3"]

async def test_a_decision_holding_fewer_than_at_once_drains_no_batch_of_at_once(
        pool: PoolUnderTest) -> None:
    """A decision that held one spare (another run's hold, at --at-once 1, or one made as the
    hold was taken) booted one node, not two: a run at --at-once 2 waits for a decision that
    holds its two before its batch of two goes."""
    await old_pool(pool)
    cutoff = await rolling.cutoff_now(pool.redis, pool.keys)
    decided = asyncio.create_task(decided_in(pool, 0.1, {"target": 2, "keep": 3, "held": 1}))
    outcome = await rolling.replace_nodes(pool.redis, pool.keys, cutoff, by="op", at_once=2,
                                          wait_limit_s=0.5, say=lambda _: None, poll_s=0.05)
    await decided
    assert not outcome.done and outcome.drained == [], outcome
    assert outcome.waited_for == "a decision that holds 2 spare node(s)"
    assert await pool.ready_list() == ["n1", "n2", "n3"]


@pytest.mark.parametrize(("numbers", "waiting", "short"), [
    ({"target": 4, "held": 1}, 0, "(3 against 4)"),             # no keep level said
    ({"target": 3, "keep": 6, "held": 1}, 0, "(3 against 6)"),  # a recent peak kept
    ({"target": 2, "keep": 2, "held": 1}, 2, "(1 against 2)"),  # users waiting take nodes
])
async def test_a_pool_whose_ready_nodes_fall_short_of_its_keep_level_is_not_drained(
        pool: PoolUnderTest, numbers: dict[str, int], waiting: int, short: str) -> None:
    """The gate is the level the reaper holds ready nodes to (a review: against the target
    alone, the nodes a recent peak kept went one a decision with nothing booted in their
    place), less the users waiting."""
    await old_pool(pool)
    await pool.scripts.apply_node_status(pool.now, "b1", "booting")  # spare 4, ready 3
    if waiting:  # by hand: the gate's arithmetic, not a state the scripts make
        await pool.redis.zadd(pool.keys.key("waiting"), {f"w{i}": i for i in range(waiting)})
    cutoff = await rolling.cutoff_now(pool.redis, pool.keys)
    decided = asyncio.create_task(decided_in(pool, 0.1, numbers))
    outcome = await rolling.replace_nodes(pool.redis, pool.keys, cutoff, by="op",
                                          wait_limit_s=0.5, say=lambda _: None, poll_s=0.05)
    await decided
    assert not outcome.done and outcome.drained == []
    assert outcome.waited_for == ("the pool's ready nodes, less the users waiting, to meet its "
                                  f"keep level {short}")
    assert await pool.ready_list() == ["n1", "n2", "n3"]


async def test_with_every_old_node_in_a_session_it_is_done_however_short_the_pool(
        pool: PoolUnderTest) -> None:
    """A review: waiting for the pool's ready nodes to meet its level at the end too never
    ended under steady demand, every old node taken by a user and drained in its session."""
    for node in ("n1", "n2"):
        await pool.boot(node)
    for user in ("u1", "u2"):
        await pool.scripts.allocate(pool.now, user)
    await pool.redis.hset(pool.keys.key("stats"), "last_numbers", json.dumps({"keep": 5}))
    cutoff = await rolling.cutoff_now(pool.redis, pool.keys)
    outcome = await rolling.replace_nodes(pool.redis, pool.keys, cutoff, by="op",
                                          wait_limit_s=5, say=lambda _: None, poll_s=0.05)
    assert outcome.done and outcome.marked == ["n1", "n2"] and outcome.in_sessions == ["n1", "n2"]


async def test_a_session_score_edited_to_inf_is_listed_with_no_start(
        pool: PoolUnderTest) -> None:
    """A review: `int(inf)` stopped the listing with an OverflowError, and the run with it."""
    await old_pool(pool)
    began = await pool.redis.zscore(pool.keys.key("sessions"), "u1")
    cutoff = await rolling.cutoff_now(pool.redis, pool.keys)
    [n4] = [n for n in await rolling.old_nodes(pool.redis, pool.keys, cutoff) if n.node == "n4"]
    assert (n4.user, n4.session_ms) == ("u1", int(began))
    await pool.redis.zadd(pool.keys.key("sessions"), {"u1": float("inf")})
    [n4] = [n for n in await rolling.old_nodes(pool.redis, pool.keys, cutoff) if n.node == "n4"]
    assert (n4.user, n4.session_ms) == ("u1", None)

async def test_a_node_whose_record_names_a_user_of_another_node_is_listed_in_no_session(
        pool: PoolUnderTest) -> None:
    """A record left naming a user who holds another node (a hand edit, a state put back
    from an older copy): no session of theirs is on it, so the run does not mark it as theirs
    (refused as changed at every round, the run would wait on it to its limit)."""
    await old_pool(pool)  # u1 on n4
    await pool.scripts.allocate(pool.now, "u2")  # n1
    await pool.redis.hset(pool.keys.node("n1"), "user", "u1")
    cutoff = await rolling.cutoff_now(pool.redis, pool.keys)
    listed = {n.node: (n.state, n.user, n.session_ms)
              for n in await rolling.old_nodes(pool.redis, pool.keys, cutoff)}
    began = await pool.redis.zscore(pool.keys.key("sessions"), "u1")
    assert listed["n1"] == ("allocated", "", None)
    assert listed["n4"] == ("allocated", "u1", int(began))


async def test_the_old_nodes_are_told_by_the_pools_create_count(pool: PoolUnderTest) -> None:
    """Old: the nodes of its creates up to the cutoff, and those no create made; a node seen
    while its create is unanswered is taken for a new one. A lost state stops the run."""
    await old_pool(pool)
    await pool.redis.set(pool.keys.key("epoch"), "1-a")
    await pool.redis.set(pool.keys.key("seq"), 7)
    await pool.redis.hset(pool.keys.node("n2"), "reservation", "r1:7")
    await pool.redis.hset(pool.keys.node("n3"), "reservation", "r1:8")  # made after
    cutoff = await rolling.cutoff_now(pool.redis, pool.keys)
    assert cutoff == rolling.Cutoff(7, "1-a") and str(cutoff) == "7@1-a"
    assert rolling.Cutoff.parse(" 7@1-a ") == cutoff
    for bad in ("7", "x@1-a", "7@", "-1@e"):
        with pytest.raises(ValueError, match="COUNT@EPOCH"):
            rolling.Cutoff.parse(bad)
    await pool.redis.zadd(pool.keys.key("unclaimed"), {"n1": 1})
    # Seen on node:status with no create's answer: a create whose POST timed out, adopted
    # before the run began (old) and after it (new: a review's run drained each such
    # replacement in turn, and never ended).
    await pool.boot("adopted-before")
    await pool.redis.set(pool.keys.key("seq"), 9)
    await pool.boot("adopted-after")
    assert (await pool.node("adopted-after"))["creates_seen"] == "9"
    old = await rolling.old_nodes(pool.redis, pool.keys, cutoff)
    assert [(n.node, n.state, n.user) for n in old] == [
        ("n2", "ready", ""), ("adopted-before", "ready", ""), ("n4", "allocated", "u1")]
    await pool.redis.set(pool.keys.key("epoch"), "2-b")
    outcome = await rolling.replace_nodes(pool.redis, pool.keys, cutoff, by="op",
                                          say=lambda _: None)
    assert outcome.lost and not outcome.done and outcome.drained == []


def set_up(redis_url: str, keys: PoolKeys,
           then: Callable[[PoolUnderTest], Awaitable[object]]) -> None:
    """`old_pool` on the server of `redis_url`, then `then` on it, for a test of the CLI."""
    async def go() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        under = PoolUnderTest(client, keys, Scripts(client, keys), ManualClock())
        await old_pool(under)
        await then(under)
        await client.aclose()

    asyncio.run(go())


def test_the_cli_shows_its_plan_refuses_without_a_replica_and_takes_back_its_drains(
        redis_url: str) -> None:
    """The plan's counts and the cutoff to go on with; no replica heard from: nothing is
    drained; a cutoff of another state of the pool is refused; --cancel takes back the drains
    a run placed under --by, and not a `provisioner drain` of the same operator."""
    pool = "roll-cli"
    keys = PoolKeys(pool)

    async def more(under: PoolUnderTest) -> None:
        await under.boot("n5")
        await under.scripts.allocate(under.now, "u2")  # n1
        await under.scripts.drain_node(under.now, "n1", "op")  # by hand, not by a run
        await under.redis.set(keys.key("epoch"), "1-a")

    set_up(redis_url, keys, more)
    common = ["--redis-url", redis_url, "--pool", pool]
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    sync.delete(keys.key("epoch"))
    none = CliRunner().invoke(app, ["replace", *common, "--yes"])
    assert none.exit_code == 2 and "has no epoch" in none.output, none.output
    sync.set(keys.key("epoch"), "1-a")
    plan = CliRunner().invoke(app, ["replace", *common, "--by", "op"], input="n\n",
                              env={"COLUMNS": "200"})
    assert plan.exit_code == 1, plan.output
    assert ("nodes of pool roll-cli of its first 0 creates, and any it adopted (--cutoff 0@1-a)"
            in plan.output)
    assert "3 ready, 0 booting, 2 in a session (1 to drain in it)" in plan.output
    assert "no replica of pool roll-cli has sent a heartbeat in the last minute" in plan.output
    assert json.loads(CliRunner().invoke(app, ["nodes", *common, "--json"]).output)[0][
        "state"] != "terminating"
    other = CliRunner().invoke(app, ["replace", *common, "--cutoff", "5@0-z"])
    assert other.exit_code == 2 and "run it without --cutoff" in other.output, other.output
    # a count the pool never reached: its replacements would be drained without end (a review)
    ahead = CliRunner().invoke(app, ["replace", *common, "--cutoff", "999999@1-a", "--yes"])
    assert ahead.exit_code == 2, ahead.output
    assert "counts 999999 creates, and pool roll-cli has made 0 in that state" in " ".join(
        ahead.output.split()), ahead.output
    bad = CliRunner().invoke(app, ["replace", *common, "--cutoff", "5"])
    assert bad.exit_code == 2 and "COUNT@EPOCH" in bad.output, bad.output
    below = CliRunner().invoke(app, ["replace", *common, "--max-unavailable", "-1"])
    assert below.exit_code == 2 and "--max-unavailable" in below.output, below.output

    async def mark_n4_as_a_run() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        scripts = Scripts(client, keys)
        await scripts.drain_node(int(time.time() * 1000), "n4", "op" + rolling.TAG)
        # a run going on, whose hold the cancel lets go of (so that the run stops)
        await scripts.hold_spare(int(time.time() * 1000), "take", "run1", 1, 60_000)
        await client.aclose()

    asyncio.run(mark_n4_as_a_run())
    back = CliRunner().invoke(app, ["replace", *common, "--by", "op", "--cancel", "--yes"],
                              env={"COLUMNS": "200"})
    assert back.exit_code == 0, back.output
    assert "1 in a session drained by op (replace)" in back.output
    assert "a run's hold of spare nodes let go: a run going on stops" in back.output
    assert "taken back 1 of 1" in back.output
    assert sync.get(keys.key("replacing")) is None
    nodes = {n["id"]: n for n in json.loads(
        CliRunner().invoke(app, ["nodes", *common, "--json"]).output)}
    assert "drain_by" not in nodes["n4"] and nodes["n1"]["drain_by"] == "op"


async def test_a_run_whose_hold_is_let_go_or_taken_over_stops_before_draining_more(
        pool: PoolUnderTest) -> None:
    """A review's drill: `replace --cancel` while a run went on took back its drains, and the
    run marked them all again within 2 s. The cancel lets go of the run's hold first; the run
    finds it gone at its next round and stops. A second run takes the hold over: the first
    stops, naming it."""
    await old_pool(pool)
    stop, low = asyncio.Event(), [99]
    ticking = asyncio.create_task(replica(pool, stop, low))
    await asyncio.sleep(0.6)
    cutoff = await rolling.cutoff_now(pool.redis, pool.keys)
    said: list[str] = []
    run = asyncio.create_task(rolling.replace_nodes(
        pool.redis, pool.keys, cutoff, by="op", say=said.append, poll_s=0.05))
    await hold_taken(pool)
    assert (await pool.scripts.hold_spare(pool.now, "release", ""))[0] is Hold.RELEASED
    outcome = await asyncio.wait_for(run, 5)
    assert outcome.taken_back == "" and not outcome.done, said
    await asyncio.sleep(0.3)
    # The drains it sent, by the log: not the old nodes still ready, which the replica reaps
    # as the spare let go of leaves them above its floor (once a decision with the hold in it
    # had booted one: a failure under load, made sure of with a pause before the release).
    drains = [fields["reason"] for _, fields in await pool.redis.xrange(
        pool.keys.key("decisions")) if fields["kind"] == "drain"]
    assert sorted(reason.split()[1] for reason in drains
                  if reason.endswith(rolling.TAG + ": was ready; its DELETE is sent by the "
                                     "next replica to tick")) == sorted(outcome.drained), drains
    first = asyncio.create_task(rolling.replace_nodes(
        pool.redis, pool.keys, cutoff, by="op", say=lambda _: None, poll_s=0.05))
    await hold_taken(pool)  # the first's, before the second is started: not a fixed pause
    second = asyncio.create_task(rolling.replace_nodes(
        pool.redis, pool.keys, cutoff, by="op", say=lambda _: None, poll_s=0.05,
        wait_limit_s=0.5))
    taken_over = await asyncio.wait_for(first, 5)
    assert taken_over.taken_back and not taken_over.done
    second.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await second
    assert await pool.redis.get(pool.keys.key("replacing")) is None  # let go as it stopped
    stop.set()
    await ticking


def test_sigterm_stops_a_run_as_ctrl_c_does_and_lets_go_of_its_hold(redis_url: str) -> None:
    """A review's drill: `docker stop` of a run in a container (its PID 1, which ignores a
    signal it has no handler for) went on draining for the 10 s before the KILL, and said
    nothing of where it stopped. SIGTERM now stops it as Ctrl-C does."""
    import os
    import signal
    import subprocess
    import sys

    pool = "roll-term"
    keys = PoolKeys(pool)

    # a replica heard from, deciding none
    set_up(redis_url, keys, lambda under: under.scripts.heartbeat("r1", {}, 60_000))
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "provisioner", "replace", "--redis-url", redis_url, "--pool",
         pool, "--yes"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COLUMNS": "200"})
    try:
        for _ in range(200):
            if sync.get(keys.key("replacing")):
                break
            time.sleep(0.05)
        assert sync.get(keys.key("replacing")), "the run never held its spare"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, output
    assert "stopped: run it again with --cutoff" in " ".join(output.split()), output
    assert sync.get(keys.key("replacing")) is None


@pytest.mark.parametrize("stop", [asyncio.CancelledError, KeyboardInterrupt])
async def test_a_run_stopped_as_its_hold_is_taken_lets_go_of_it(
        pool: PoolUnderTest, monkeypatch: pytest.MonkeyPatch,
        stop: type[BaseException]) -> None:
    """A clean clone's CI: SIGTERM (Ctrl-C's twin) as the run took its hold, the take applied
    and its reply not yet read, left the hold to its lease: the pool held the spare for a
    minute more. The let-go covered the rounds only, not the take."""
    await old_pool(pool)
    cutoff = await rolling.cutoff_now(pool.redis, pool.keys)
    hold_spare = Scripts.hold_spare

    async def interrupted(self: Scripts, now_ms: int, mode: str, *args: Any) -> Any:
        answer = await hold_spare(self, now_ms, mode, *args)
        if mode == "take":  # applied: the stop comes before its reply is read
            raise stop
        return answer

    monkeypatch.setattr(Scripts, "hold_spare", interrupted)
    with pytest.raises(stop):
        await rolling.replace_nodes(pool.redis, pool.keys, cutoff, by="op",
                                    say=lambda _: None, poll_s=0.05)
    assert await pool.redis.get(pool.keys.key("replacing")) is None


async def hold_taken(pool: PoolUnderTest, limit_s: float = 10) -> None:
    """Once a run holds its spare (the hold's key is there), within `limit_s`."""
    for _ in range(int(limit_s / 0.01)):
        if await pool.redis.get(pool.keys.key("replacing")):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the run never held its spare")


async def writes_refused(pool: PoolUnderTest, seconds: float, *,
                         meanwhile: Callable[[], Awaitable[object]] | None = None) -> None:
    """The server refuses every write for `seconds` (`maxmemory 1`), then takes them again;
    `meanwhile` is awaited once the refusal has begun."""
    await pool.redis.config_set("maxmemory", 1)
    try:
        if meanwhile is not None:
            await meanwhile()
        await asyncio.sleep(seconds)
    finally:
        await pool.redis.config_set("maxmemory", 0)


async def test_a_server_refusing_writes_for_a_while_is_waited_out(pool: PoolUnderTest) -> None:
    """A review: two seconds of `maxmemory 1` ended a run with OutOfMemoryError (each round
    renews its hold, a write), where a waiting run only read before. Refused writes are
    waited for as any hold-up, within the wait limit; a lease that ended meanwhile stops the
    run as lost, not as cancelled."""
    await old_pool(pool)
    cutoff = await rolling.cutoff_now(pool.redis, pool.keys)
    said: list[str] = []
    run = asyncio.create_task(rolling.replace_nodes(
        pool.redis, pool.keys, cutoff, by="op", wait_limit_s=1.5, say=said.append,
        poll_s=0.05))
    await asyncio.sleep(0.3)
    await writes_refused(pool, 0.6)
    outcome = await asyncio.wait_for(run, 10)
    assert any(line.startswith("waiting for the server to take its writes again")
               for line in said), said
    assert outcome.taken_back is None and outcome.waited_for == (
        "a first decision of the pool"), outcome
    assert await pool.redis.get(pool.keys.key("replacing")) is None
    # refused past its lease (here 0.3 s): the hold is gone, and the run says why
    run = asyncio.create_task(rolling.replace_nodes(
        pool.redis, pool.keys, cutoff, by="op", wait_limit_s=5, say=said.append,
        poll_s=0.05))
    await hold_taken(pool)  # not a fixed pause: a run that took its hold late took it in full
    # The lease cut to 0.3 s once the writes are refused (PEXPIRE is taken out of memory), not
    # before: a renewal landing between the cut and the refusal gave the lease back, and the
    # run went on as if none had lapsed (a failure under load, made sure of with a pause there).
    await writes_refused(pool, 0.6, meanwhile=lambda: pool.redis.pexpire(
        pool.keys.key("replacing"), 300))
    outcome = await asyncio.wait_for(run, 10)
    assert outcome.taken_back == "" and outcome.lapsed, outcome

async def test_a_cancel_after_refused_writes_were_waited_out_is_a_cancel_not_a_lapse(
        pool: PoolUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    """`lapsed` says the lease may have ended while the server refused the run's writes: once
    a renewal is taken again, the refusal is over, and a later `--cancel` is told as a cancel
    alone (the CLI says "let go by replace --cancel", not "or lost as its lease ended")."""
    await pool.boot("n1")
    real_hold = Scripts.hold_spare
    renewals = {"refused": 2, "taken": 0}

    async def hold(self: Scripts, now_ms: int, mode: str, *args: object, **kw: object) -> object:
        if mode == "renew":
            if renewals["refused"] > 0:
                renewals["refused"] -= 1
                raise redis.exceptions.OutOfMemoryError("command not allowed when used memory")
            renewals["taken"] += 1
        return await real_hold(self, now_ms, mode, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Scripts, "hold_spare", hold)
    cutoff = await rolling.cutoff_now(pool.redis, pool.keys)
    said: list[str] = []
    run = asyncio.create_task(rolling.replace_nodes(
        pool.redis, pool.keys, cutoff, by="op", wait_limit_s=5, say=said.append, poll_s=0.02))
    for _ in range(250):
        if renewals["taken"] >= 2:
            break
        await asyncio.sleep(0.02)
    assert renewals == {"refused": 0, "taken": 2} or renewals["taken"] > 2, renewals
    assert (await pool.scripts.hold_spare(pool.now, "release", ""))[0] is Hold.RELEASED
    outcome = await asyncio.wait_for(run, 5)
    assert any(line.startswith("waiting for the server to take its writes again")
               for line in said), said
    assert outcome.taken_back == "" and not outcome.lapsed, outcome



def _hold_spare_failing(monkeypatch: pytest.MonkeyPatch, mode: str,
                        failures: list[Exception]) -> None:
    """`hold_spare` in `mode` raising each of `failures` in turn, then as it is."""
    real_hold = Scripts.hold_spare

    async def hold(self: Scripts, now_ms: int, asked: str, *args: object, **kw: object) -> object:
        if asked == mode and failures:
            raise failures.pop(0)
        return await real_hold(self, now_ms, asked, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Scripts, "hold_spare", hold)


async def test_credentials_refused_in_a_run_end_it_not_wait_it_out(
        pool: PoolUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py files a password refused on a new connection as a connection error: a run
    whose password was changed under it waited, saying "waiting for the server to take its
    writes again (invalid username-password pair)", until its wait limit. It ends now, as on
    any error that does not pass; the CLI says the credentials were refused."""
    await pool.boot("n1")
    _hold_spare_failing(monkeypatch, "renew", [redis.exceptions.AuthenticationError(
        "invalid username-password pair or user is disabled.")])
    cutoff = await rolling.cutoff_now(pool.redis, pool.keys)
    said: list[str] = []
    with pytest.raises(redis.exceptions.AuthenticationError):
        await asyncio.wait_for(rolling.replace_nodes(
            pool.redis, pool.keys, cutoff, by="op", wait_limit_s=5, say=said.append,
            poll_s=0.02), 4)
    assert not any(line.startswith("waiting for " + rolling.WRITES_REFUSED)
                   for line in said), said


async def test_a_run_ended_by_credentials_refused_says_its_hold_was_not_let_go(
        pool: PoolUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its release is refused as its rounds were (the same credentials): the hold stays until
    its lease ends, and the outcome says so, for the CLI to tell (a review: the CLI said
    nothing, and the pool held the spare 30 s more)."""
    await pool.boot("n1")
    refused = redis.exceptions.AuthenticationError(
        "invalid username-password pair or user is disabled.")
    _hold_spare_failing(monkeypatch, "renew", [refused])
    real_hold = Scripts.hold_spare

    async def hold(self: Scripts, now_ms: int, asked: str, *args: object, **kw: object) -> object:
        if asked == "release":
            raise refused
        return await real_hold(self, now_ms, asked, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Scripts, "hold_spare", hold)
    cutoff = await rolling.cutoff_now(pool.redis, pool.keys)
    outcome = rolling.Outcome(done=False)
    with pytest.raises(redis.exceptions.AuthenticationError):
        await asyncio.wait_for(rolling.replace_nodes(
            pool.redis, pool.keys, cutoff, by="op", wait_limit_s=5, say=lambda _: None,
            poll_s=0.02, outcome=outcome), 4)
    assert outcome.hold_left
    assert await pool.redis.exists(pool.keys.key("replacing"))


async def test_a_server_out_of_reach_for_a_moment_is_waited_out(
        pool: PoolUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection cut or a reply timed out (a failover, a restart still loading) is waited
    out as refused writes are, within the wait limit: not an end of the run with its hold
    left to lapse."""
    await pool.boot("n1")
    failures: list[Exception] = [
        redis.exceptions.ConnectionError("Connection closed by server."),
        redis.exceptions.TimeoutError("Timeout reading from socket")]
    _hold_spare_failing(monkeypatch, "renew", failures)
    cutoff = await rolling.cutoff_now(pool.redis, pool.keys)
    said: list[str] = []
    outcome = await rolling.replace_nodes(pool.redis, pool.keys, cutoff, by="op",
                                          wait_limit_s=0.5, say=said.append, poll_s=0.02)
    assert failures == [] and outcome.waited_for == "a first decision of the pool", outcome
    assert any(line.startswith("waiting for the server to take its writes again")
               for line in said), said
    assert await pool.redis.get(pool.keys.key("replacing")) is None


async def test_a_cancel_after_the_last_batch_stops_the_run_and_is_not_undone(
        pool: PoolUnderTest) -> None:
    """A review: a run that let go of its hold with its last batch marked sessions with no
    token and renewed nothing, so a `--cancel` then was undone and the run ended "done". The
    run holds the spare to its end: the cancel stops it, and its mark stays taken back."""
    for node in ("n4", "n1"):
        await pool.boot(node)
    await pool.scripts.allocate(pool.now, "u1")  # n4
    cutoff = await rolling.cutoff_now(pool.redis, pool.keys)
    decided = asyncio.create_task(decided_in(pool, 0.1, {"target": 1, "keep": 1, "held": 1}))
    said: list[str] = []
    run = asyncio.create_task(rolling.replace_nodes(
        pool.redis, pool.keys, cutoff, by="op", say=said.append, poll_s=0.05))
    await decided
    for _ in range(500):
        if "waiting for a replica to decide after the last drain" in said:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError(f"the run never waited after its last drain: {said}")
    assert "n1: drained (ready); 0 ready or booting to go" in said, said
    assert (await pool.scripts.hold_spare(pool.now, "release", ""))[0] is Hold.RELEASED
    taken = await pool.scripts.drain_node(pool.now, "n4", "op" + rolling.TAG, cancel=True)
    assert taken.code.name == "CANCELLED"
    outcome = await asyncio.wait_for(run, 5)
    await asyncio.sleep(0.3)
    assert outcome.taken_back == "" and not outcome.done and outcome.marked == ["n4"]
    assert "drain_by" not in await pool.node("n4")


async def test_a_run_started_while_the_server_refuses_writes_waits_to_take_its_hold(
        pool: PoolUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run started while the server refused writes (maxmemory) stopped at once with exit
    2 on its first take of the hold, where a run already going waits (a review's drill). The
    take waits too, within the wait limit; past it, the run stops having waited."""
    await pool.boot("n1")
    refusals: list[Exception] = [
        redis.exceptions.OutOfMemoryError("command not allowed when used memory")
        for _ in range(3)]
    _hold_spare_failing(monkeypatch, "take", refusals)
    cutoff = await rolling.cutoff_now(pool.redis, pool.keys)
    said: list[str] = []
    outcome = await rolling.replace_nodes(pool.redis, pool.keys, cutoff, by="op",
                                          wait_limit_s=0.5, say=said.append, poll_s=0.01)
    # the hold taken, the run went on to its rounds (here waiting for a first decision)
    assert refusals == [] and outcome.waited_for == "a first decision of the pool", outcome
    assert said[0].startswith("waiting for the server to take its writes again"), said
    assert said[1].startswith("run "), said  # named once it holds
    assert sum(line.startswith("waiting for the server") for line in said) == 1, said
    refusals.extend(redis.exceptions.OutOfMemoryError("command not allowed when used memory")
                    for _ in range(1_000))
    said.clear()
    outcome = await rolling.replace_nodes(pool.redis, pool.keys, cutoff, by="op",
                                          wait_limit_s=0.05, say=said.append, poll_s=0.01)
    assert not outcome.done and outcome.waited_for.startswith("the server to take its writes")
    assert outcome.drained == [] and not any(line.startswith("run ") for line in said), said


async def test_a_batch_refused_part_way_is_a_batch_and_busy_is_waited_out(
        pool: PoolUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: a round refused after the first drain of a batch (out of memory) lost that
    drain, and the next round drained two more with no decision between; and a BUSY reply
    (a script running long) ended the run with its hold left behind. The drain made counts,
    the next batch waits for a decision after it, and BUSY is waited out."""
    for node in ("n1", "n2", "n3", "n4"):
        await pool.boot(node)
    real_drain, real_hold = Scripts.drain_node, Scripts.hold_spare
    calls = {"drain": 0, "renew": 0}

    async def drain(self: Scripts, *args: object, **kw: object) -> object:
        calls["drain"] += 1
        if calls["drain"] == 2:
            raise redis.exceptions.OutOfMemoryError("command not allowed when used memory")
        return await real_drain(self, *args, **kw)  # type: ignore[arg-type]

    async def hold(self: Scripts, now_ms: int, mode: str, *args: object, **kw: object) -> object:
        if mode == "renew":
            calls["renew"] += 1
            if calls["renew"] == 1:
                raise redis.exceptions.ResponseError("BUSY Redis is busy running a script.")
        return await real_hold(self, now_ms, mode, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Scripts, "drain_node", drain)
    monkeypatch.setattr(Scripts, "hold_spare", hold)
    cutoff = await rolling.cutoff_now(pool.redis, pool.keys)
    decided = asyncio.create_task(decided_in(pool, 0.1, {"target": 2, "keep": 2, "held": 2}))
    said: list[str] = []
    outcome = await rolling.replace_nodes(pool.redis, pool.keys, cutoff, by="op", at_once=2,
                                          wait_limit_s=0.6, say=said.append, poll_s=0.05)
    await decided
    assert said[0].startswith("run ") and " (by op) holds 2 spare node(s)" in said[0], said
    assert said[1].startswith("waiting for the server to take its writes again"), said
    assert outcome.drained == ["n1"], said
    assert outcome.waited_for == "a replica to decide after the last drain", outcome
    assert await pool.ready_list() == ["n2", "n3", "n4"]


async def test_a_hold_let_go_between_its_renewal_and_a_mark_stops_the_run_not_done(
        pool: PoolUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    """`replace --cancel` lands between a round's renewal of the hold and its mark of the
    last old node, in a session: the mark is refused (NOT_HELD) and the run stops as
    cancelled. Read as any other refusal, the round found no old node ready or booting and
    said "done", with that node never drained: it went back to the pool when its session
    ended, old, and the rollout script was told the pool was replaced."""
    await pool.boot("n4")
    await pool.scripts.allocate(pool.now, "u1")  # n4
    real_hold = Scripts.hold_spare
    cancelled: list[tuple[Hold, str]] = []

    async def hold(self: Scripts, now_ms: int, mode: str, *args: Any, **kw: Any) -> Any:
        held = await real_hold(self, now_ms, mode, *args, **kw)
        if mode in ("renew", "keep") and not cancelled:  # a --cancel, just after
            cancelled.append(await real_hold(self, now_ms, "release", ""))
        return held

    monkeypatch.setattr(Scripts, "hold_spare", hold)
    cutoff = await rolling.cutoff_now(pool.redis, pool.keys)
    said: list[str] = []
    outcome = await asyncio.wait_for(rolling.replace_nodes(
        pool.redis, pool.keys, cutoff, by="op", say=said.append, poll_s=0.05), 5)
    assert cancelled == [(Hold.RELEASED, cancelled[0][1])], cancelled
    assert not outcome.done and outcome.taken_back == "", (outcome, said)
    assert outcome.marked == [] and outcome.in_sessions == [], outcome
    assert "drain_by" not in await pool.node("n4")


async def test_a_hold_let_go_in_the_middle_of_a_batch_sends_no_more_of_its_drains(
        pool: PoolUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    """`replace --cancel` lands after the first drain of a batch: the next drain is refused
    (NOT_HELD) and the run stops there, the drain made counted, the rest of the batch never
    sent: a cancelled run keeps asking the server for drains the operator has just called
    off."""
    for node in ("n1", "n2", "n3", "n4"):
        await pool.boot(node)
    real_drain = Scripts.drain_node
    codes: list[str] = []

    async def drain(self: Scripts, *args: Any, **kw: Any) -> Any:
        result = await real_drain(self, *args, **kw)
        codes.append(result.code.name)
        if len(codes) == 1:  # a --cancel, just after the batch's first drain
            await self.hold_spare(pool.now, "release", "")
        return result

    monkeypatch.setattr(Scripts, "drain_node", drain)
    cutoff = await rolling.cutoff_now(pool.redis, pool.keys)
    decided = asyncio.create_task(decided_in(pool, 0.1, {"target": 3, "keep": 3, "held": 3}))
    said: list[str] = []
    outcome = await asyncio.wait_for(rolling.replace_nodes(
        pool.redis, pool.keys, cutoff, by="op", at_once=3, say=said.append, poll_s=0.05), 5)
    await decided
    assert codes == ["DRAINING", "NOT_HELD"], (codes, said)
    assert outcome.drained == ["n1"] and outcome.taken_back == "" and not outcome.done
    assert "n1: drained (ready); 3 ready or booting to go" in said, said
    assert await pool.ready_list() == ["n2", "n3", "n4"]


def test_the_cli_asks_before_draining_and_a_no_drains_nothing(redis_url: str) -> None:
    """Without --yes the plan is shown and asked about; a "no", or no one to answer, drains
    nothing and takes no hold of spare nodes: a replace is a rollout of the whole pool."""
    pool = "roll-ask"
    keys = PoolKeys(pool)
    set_up(redis_url, keys, lambda under: under.scripts.heartbeat("r1", {}, 60_000))
    common = ["--redis-url", redis_url, "--pool", pool, "--max-unavailable", "1"]
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    for answer, said in (("n\n", "not confirmed: nothing drained"),
                         ("", "not confirmed (no answer): nothing drained; --yes replaces")):
        asked = CliRunner().invoke(app, ["replace", *common], input=answer,
                                   env={"COLUMNS": "200"})
        assert asked.exit_code == 2, asked.output
        assert ("Replace them, 1 ready node(s) at a time, the pool up to 1 below its keep "
                "level before their replacements are ready?") in asked.output, asked.output
        assert said in " ".join(asked.output.split()), asked.output
        assert sync.get(keys.key("replacing")) is None
        nodes = json.loads(CliRunner().invoke(app, ["nodes", "--redis-url", redis_url,
                                                    "--pool", pool, "--json"]).output)
        assert not any("drain_by" in n or n["state"] == "terminating" for n in nodes), nodes


def test_the_cli_exits_1_when_the_old_nodes_stand_still_past_the_wait_limit(
        redis_url: str) -> None:
    """A replica heard from that decides nothing (a pool held short, a stuck boot): the run
    drains what it may, waits --wait-limit, and exits 1 naming what it waited for and the
    --cutoff to go on with. An exit 0 would tell a rollout script the pool was replaced."""
    pool = "roll-still"
    keys = PoolKeys(pool)
    set_up(redis_url, keys, lambda under: under.scripts.heartbeat("r1", {}, 60_000))
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    run = CliRunner().invoke(app, ["replace", "--redis-url", redis_url, "--pool", pool,
                                   "--yes", "--wait-limit", "1"], env={"COLUMNS": "200"})
    said = " ".join(run.output.split())
    assert run.exit_code == 1, run.output
    assert "error: the old nodes stood still for 1s while it waited for" in said, said
    assert "stopped; run it again with --cutoff 0@" in said, said
    assert "done" not in said, said
    assert sync.get(keys.key("replacing")) is None  # its hold let go as it stopped


async def _cancel_the_hold(client: aioredis.Redis, scripts: Scripts) -> None:
    await scripts.hold_spare(int(time.time() * 1000), "release", "")  # replace --cancel


async def _take_the_hold_over(client: aioredis.Redis, scripts: Scripts) -> None:
    await scripts.hold_spare(int(time.time() * 1000), "take", "run2", 1, 60_000)


async def _lose_the_state(client: aioredis.Redis, scripts: Scripts) -> None:
    await client.set(scripts.keys.key("epoch"), "2-b")  # lost, and begun again


@pytest.mark.parametrize("meanwhile, said", [
    (_lose_the_state, "error: the pool's state was lost and begun again while it ran (a new "
     "epoch): the nodes adopted since are no longer told apart by their creates; stopped; run "
     "it again without --cutoff"),
    (_take_the_hold_over, "error: its hold of spare nodes was taken over by another run "
     "(run2): stopped; run it again with --cutoff 0@1-a to go on"),
    (_cancel_the_hold, "error: its hold of spare nodes was let go by replace --cancel: "
     "stopped; run it again with --cutoff 0@1-a to go on"),
], ids=["state lost", "taken over", "let go"])
def test_the_cli_exits_1_saying_why_when_its_run_is_stopped_from_outside(
        redis_url: str, meanwhile: Callable[[aioredis.Redis, Scripts], Awaitable[None]],
        said: str) -> None:
    """While a run goes on the pool's state is lost (a new epoch), or its hold of spare nodes
    is taken over by another run or let go by `replace --cancel`: it stops, says which and
    how to go on (the cutoff, or none after a loss), and exits 1. An exit 0, or "done", would
    tell a rollout script the pool was replaced; a cutoff offered after a loss would name
    nodes by the creates of a state that is gone."""
    import threading

    pool = f"roll-stopped-{meanwhile.__name__.strip('_')}"
    keys = PoolKeys(pool)

    async def heard(under: PoolUnderTest) -> None:
        await under.redis.set(keys.key("epoch"), "1-a")
        await under.scripts.heartbeat("r1", {}, 60_000)

    set_up(redis_url, keys, heard)
    sync = redis.Redis.from_url(redis_url, decode_responses=True)

    def from_outside() -> None:
        for _ in range(200):
            if sync.get(keys.key("replacing")):
                break
            time.sleep(0.02)

        async def go() -> None:
            client = aioredis.Redis.from_url(redis_url, decode_responses=True)
            await meanwhile(client, Scripts(client, keys))
            await client.aclose()

        asyncio.run(go())

    outside = threading.Thread(target=from_outside)
    outside.start()
    try:
        run = CliRunner().invoke(app, ["replace", "--redis-url", redis_url, "--pool", pool,
                                       "--yes", "--wait-limit", "30"], env={"COLUMNS": "300"})
    finally:
        outside.join(10)
    output = " ".join(run.output.split())
    assert run.exit_code == 1, run.output
    assert said in output, output
    assert "done" not in output, output
    assert " ".join(run.stderr.split()).startswith(said), run.stderr  # on stderr
    if meanwhile is not _take_the_hold_over:
        assert sync.get(keys.key("replacing")) is None  # its hold let go as it stopped
    else:
        assert sync.get(keys.key("replacing")) is not None  # the other run's, kept


def test_replace_cancel_asks_and_exits_1_for_a_drain_it_could_not_take_back(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`replace --cancel` asks before it stops a run and takes back its drains: a "no" lets
    go of nothing and takes nothing back (exit 2). A drain whose session ended as it was
    taken back (the node terminated with it) is not taken back: exit 1, so that a script
    that cancels a rollout does not report every node kept."""
    pool = "roll-cancel"
    keys = PoolKeys(pool)

    async def marked_by_a_run(under: PoolUnderTest) -> None:
        await under.redis.set(keys.key("epoch"), "1-a")
        await under.scripts.drain_node(int(time.time() * 1000), "n4", "op" + rolling.TAG)
        await under.scripts.hold_spare(int(time.time() * 1000), "take", "run1", 1, 60_000)

    set_up(redis_url, keys, marked_by_a_run)
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    common = ["replace", "--redis-url", redis_url, "--pool", pool, "--by", "op", "--cancel"]
    no = CliRunner().invoke(app, common, input="n\n", env={"COLUMNS": "200"})
    assert no.exit_code == 2, no.output
    assert "1 in a session drained by op (replace)" in no.output, no.output
    assert ("Stop a run going on, and take back the drain of 1 node(s) of pool roll-cancel?"
            in no.output), no.output
    assert "not confirmed: nothing taken back" in " ".join(no.output.split()), no.output
    assert sync.get(keys.key("replacing")) is not None  # the run's hold, kept
    assert sync.hget(keys.node("n4"), "drain_by") == "op" + rolling.TAG

    real_drain = Scripts.drain_node

    async def session_ends_first(self: Scripts, now_ms: int, node: str, *args: Any,
                                 **kw: Any) -> Any:
        if kw.get("cancel"):
            await self.release(now_ms, "u1")  # u1 disconnects as the cancel is sent
        return await real_drain(self, now_ms, node, *args, **kw)

    monkeypatch.setattr(Scripts, "drain_node", session_ends_first)
    late = CliRunner().invoke(app, [*common, "--yes"], env={"COLUMNS": "200"})
    assert late.exit_code == 1, late.output
    assert "a run's hold of spare nodes let go: a run going on stops" in late.output
    assert "taken back 0 of 1" in late.output, late.output
    assert "n4: not taken back, now terminating" in late.output, late.output
    assert sync.get(keys.key("replacing")) is None
    assert sync.hget(keys.node("n4"), "state") == "terminating"


def test_the_cli_says_there_is_nothing_to_replace_in_a_pool_of_new_nodes(
        redis_url: str) -> None:
    """No old node ready, booting or in a session: nothing is asked or drained, exit 0 (a
    rollout script run again after it finished)."""
    pool = "roll-none"
    keys = PoolKeys(pool)
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    sync.set(keys.key("epoch"), "1-a")
    run = CliRunner().invoke(app, ["replace", "--redis-url", redis_url, "--pool", pool],
                             input="", env={"COLUMNS": "200"})
    assert run.exit_code == 0, run.output
    assert "0 ready, 0 booting, 0 in a session (0 to drain in it)" in run.output, run.output
    assert "nothing to replace" in run.output and "Replace them" not in run.output


async def test_a_decision_made_between_the_gate_s_read_and_the_drain_is_not_one_after_it(
        pool: PoolUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica decided after the round read the decided slot and before its batch was
    drained: that decision never saw the drain, so the next batch still waits for one after
    it (the slot is read again once the batch is drained)."""
    for node in ("n1", "n2", "n3", "n4"):
        await pool.boot(node)
    real_drain = Scripts.drain_node
    drains = {"n": 0}

    async def drain(self: Scripts, *args: object, **kw: object) -> object:
        drains["n"] += 1
        if drains["n"] == 1:  # a decision just before the first drain
            await pool.redis.set(pool.keys.key("tick_lock"), f"{time.time_ns()}")
        return await real_drain(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Scripts, "drain_node", drain)
    await pool.redis.hset(pool.keys.key("stats"), "last_numbers",
                          json.dumps({"target": 2, "keep": 2, "held": 1}))
    await pool.redis.set(pool.keys.key("tick_lock"), "first")
    cutoff = await rolling.cutoff_now(pool.redis, pool.keys)
    outcome = await rolling.replace_nodes(pool.redis, pool.keys, cutoff, by="op",
                                          wait_limit_s=0.5, say=lambda _: None, poll_s=0.05)
    assert outcome.drained == ["n1"], outcome
    assert outcome.waited_for == "a replica to decide after the last drain"
    assert await pool.ready_list() == ["n2", "n3", "n4"]
