"""A replica's Python side: event handling, ticks acting on decisions, reconciliation."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any
from urllib.parse import urlparse

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.exceptions import BusyLoadingError, NoScriptError, OutOfMemoryError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from provisioner.clock import ManualClock
from provisioner.config import ConfigError, PoolConfig, ServiceConfig, redis_client
from provisioner.keys import PoolKeys
from provisioner.logs import Throttle
from provisioner.metrics import Metrics
from provisioner.nodeapi import CreateOutcome, CreateResult, DeleteOutcome, ListedNode, NodeApi
from provisioner.scripts import (
    FORECAST_TERMS,
    Activity,
    AllocateResult,
    Allocation,
    Release,
    ReleaseResult,
)
from provisioner.service import (
    ACTIVITY_BATCH,
    LEFT_FOR_LATER,
    LISTEN_BATCH,
    Outcome,
    Replica,
    http_app,
)
from provisioner.view import check_invariants
from tests.fakes import FakeNodeApi
from tests.helpers import T0, Subscriber, answering, dump_pool, heard_ago

POOL = "svc"
#: These tests are about the replica's plumbing, so the pool holds exactly its floor: the
#: first release's heuristic with no conversion. The forecast has tests/test_forecast.py.
FLOOR_ONLY = PoolConfig(min_ready=1, scaling_policy="heuristic", conversion=0)


def make_replica(redis: aioredis.Redis, api: NodeApi, clock: ManualClock, name: str,
                 pool: PoolConfig | None = None) -> Replica:
    service = ServiceConfig("redis://x", "http://api", pool=POOL, replica_id=name)
    return Replica(redis, service, pool or FLOOR_ONLY, api, clock=clock,
                   metrics=Metrics())


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def api() -> FakeNodeApi:
    return FakeNodeApi()


@pytest.fixture
async def replica(aredis: aioredis.Redis, api: FakeNodeApi,
                  clock: ManualClock) -> AsyncIterator[Replica]:
    yield make_replica(aredis, api, clock, "r1")


def counter(replica: Replica, name: str, **labels: str) -> float:
    value = replica.metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


async def send(replicas: list[Replica], channel: str, payload: object) -> None:
    data = json.dumps(payload).encode()
    for replica in replicas:
        await replica.handle(channel, data)


async def test_malformed_messages_are_counted_and_change_nothing(
    replica: Replica, aredis: aioredis.Redis,
) -> None:
    await send([replica], "user:connect", {"user_id": "u1"})
    before = {k: await aredis.dump(k) for k in await aredis.keys("*")}
    bad = [
        ("user:connect", b"not json"),
        ("user:connect", b'{"user_id": ""}'),
        ("user:activity", b'{"user_id": "u2", "timestamp": "soon"}'),
        ("user:activity", b'{"user_id": "u2", "timestamp": 1}'),
        ("node:status", b'{"node_id": "n1", "status": "exploded"}'),
        ("user:disconnect", b"x" * 5000),
        ("user:disconnect", b"[]"),
    ]
    for channel, data in bad:
        await replica.handle(channel, data)
    after = {k: await aredis.dump(k) for k in await aredis.keys("*")}
    assert after == before
    assert counter(replica, "provisioner_events_rejected_total", channel="user:connect",
                   reason="not_json") == 1
    assert counter(replica, "provisioner_events_rejected_total", channel="user:activity",
                   reason="bad_timestamp") == 1
    assert counter(replica, "provisioner_events_rejected_total", channel="node:status",
                   reason="unknown_status") == 1
    assert counter(replica, "provisioner_events_rejected_total", channel="user:disconnect",
                   reason="too_large") == 1


async def test_activity_timestamps_within_one_second_count_once(
    replica: Replica, aredis: aioredis.Redis,
) -> None:
    # The contract's timestamp is Unix seconds, and activity is keyed by its second ("How
    # replicas cooperate"); a publisher that sends time.time() sends fractions. Each fraction
    # was its own event: 20 requests within one second put a new user at the top level of the
    # forecast's cells, past the engaged threshold, and each ran the whole script.
    second = T0 // 1000
    outcomes = await replica.handle_many([
        ("user:activity", json.dumps({"user_id": "u1", "timestamp": second + i / 20}).encode())
        for i in range(20)])
    assert [getattr(outcome, "code", None) for outcome in outcomes] == (
        [Activity.RECORDED] + [Activity.DUPLICATE] * 19)
    assert await aredis.zrange(replica.keys.acts("u1"), 0, -1, withscores=True) == [
        (str(T0), float(T0))]
    stats = await aredis.hgetall(replica.keys.key("stats"))
    assert (stats["activities"], stats["activity_duplicates"]) == ("1", "19")


async def test_tick_creates_the_floor_and_a_connect_gets_a_ready_node(
    replica: Replica, api: FakeNodeApi, clock: ManualClock, aredis: aioredis.Redis,
) -> None:
    await replica.tick()
    await replica.settle()
    assert api.created == ["node-1"]
    await send([replica], "node:status", {"node_id": "node-1", "status": "booting"})
    clock.advance(30_000)
    await send([replica], "node:status", {"node_id": "node-1", "status": "ready"})
    async with Subscriber(aredis, "user:allocated") as sub:
        await send([replica], "user:connect", {"user_id": "u1"})
        messages = await sub.drain()
    assert messages == [("user:allocated", {"user_id": "u1", "node_id": "node-1",
                                            "waited_ms": 0})]
    assert counter(replica, "provisioner_hits_total") == 1
    clock.advance(1000)
    await replica.tick()  # the floor is spare nodes: one more for the next user
    await replica.settle()
    assert api.created == ["node-1", "node-2"]
    assert await check_invariants(aredis, POOL) == []


async def test_a_connect_that_resumes_a_session_is_counted_and_logged_as_one(
    replica: Replica, aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture,
) -> None:
    await replica.scripts.apply_node_status(T0, "node-1", "booting")
    await replica.scripts.apply_node_status(T0, "node-1", "ready")
    await send([replica], "user:connect", {"user_id": "u1"})
    await send([replica], "user:disconnect", {"user_id": "u1"})
    with caplog.at_level("INFO", logger="provisioner.service"):
        await send([replica], "user:connect", {"user_id": "u1"})
    assert counter(replica, "provisioner_connects_total") == 2
    assert counter(replica, "provisioner_sessions_resumed_total") == 1
    assert counter(replica, "provisioner_resumed_misses_total") == 0  # a hit
    assert "connect u1: hit, node node-1 (resumes the session or wait the user ended within 30s" \
        in caplog.text
    assert await check_invariants(aredis, POOL) == []


async def test_a_connect_that_resumes_a_wait_is_counted_and_logged_as_one(
    replica: Replica, aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture,
) -> None:
    # No node: the connect waits (not resumed: no count), its wait is abandoned, and the
    # connect again within 30 s waits again, resuming it: counted once, and said in its line.
    with caplog.at_level("INFO", logger="provisioner.service"):
        await send([replica], "user:connect", {"user_id": "u1"})
    assert counter(replica, "provisioner_sessions_resumed_total") == 0
    assert "connect u1: miss, waiting at position 1\n" in caplog.text + "\n"
    assert "resumes" not in caplog.text
    await send([replica], "user:disconnect", {"user_id": "u1"})
    caplog.clear()
    with caplog.at_level("INFO", logger="provisioner.service"):
        await send([replica], "user:connect", {"user_id": "u1"})
    assert counter(replica, "provisioner_connects_total") == 2
    assert counter(replica, "provisioner_sessions_resumed_total") == 1
    # both connects missed; the miss-rate alert leaves out the second, a resumed wait's
    assert counter(replica, "provisioner_misses_total") == 2
    assert counter(replica, "provisioner_resumed_misses_total") == 1
    assert "connect u1: miss, waiting at position 1 (resumes the session or wait the user " \
        "ended within 30s: taught nothing)" in caplog.text
    assert await check_invariants(aredis, POOL) == []


async def test_a_client_reconnecting_in_a_loop_logs_a_line_of_it_every_ten_seconds(
    replica: Replica, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A loop at 100 a second logged two lines a cycle on every replica: 200 a second each.
    seconds = [1000.0]
    monkeypatch.setattr("provisioner.logs.time.monotonic", lambda: seconds[0])
    await replica.scripts.apply_node_status(T0, "node-1", "booting")
    await replica.scripts.apply_node_status(T0, "node-1", "ready")
    resumes = " (resumes the session or wait the user ended within 30s: taught nothing"
    with caplog.at_level("INFO", logger="provisioner.service"):
        await send([replica], "user:connect", {"user_id": "u1"})
        for _ in range(50):
            await send([replica], "user:disconnect", {"user_id": "u1"})
            await send([replica], "user:connect", {"user_id": "u1"})
        seconds[0] += 10
        await send([replica], "user:disconnect", {"user_id": "u1"})
        await send([replica], "user:connect", {"user_id": "u1"})
    assert [record.getMessage() for record in caplog.records
            if " u1:" in record.getMessage()] == [
        "connect u1: hit, node node-1",
        "disconnect u1: released node-1",
        f"connect u1: hit, node node-1{resumes})",
        "disconnect u1: released node-1",
        f"connect u1: hit, node node-1{resumes}; 98 more of this user's connects and "
        "disconnects since the last line)"]
    assert counter(replica, "provisioner_sessions_resumed_total") == 51


async def test_a_wait_abandoned_is_logged_with_no_node(
    replica: Replica, caplog: pytest.LogCaptureFixture,
) -> None:
    # An operator's drill: "disconnect u2: abandoned " ended in the space before a node id it
    # did not have.
    with caplog.at_level("INFO", logger="provisioner.service"):
        await send([replica], "user:connect", {"user_id": "u2"})
        await send([replica], "user:disconnect", {"user_id": "u2"})
    assert [record.getMessage() for record in caplog.records
            if record.getMessage().startswith("disconnect u2")] == ["disconnect u2: abandoned"]

def test_a_throttle_of_users_forgets_the_quiet_ones_past_its_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seconds = [0.0]
    monkeypatch.setattr("provisioner.logs.time.monotonic", lambda: seconds[0])
    throttle = Throttle(10.0, most=4)
    for user in ("a", "b", "c", "d"):
        assert throttle.due(user) == 0
    assert throttle.held_back("a") and not throttle.held_back("e")
    seconds[0] = 20.0
    assert throttle.due("e") == 0  # five keys: the four quiet ones go
    assert throttle.due("a") == 0  # its count held back went with it
    for user in ("f", "g", "h"):
        throttle.due(user)
    assert len(throttle._last) <= 4  # all within 10 s: the older half goes


async def _a_tick_whose_reply_is_lost(replica: Replica, script: str = "scale_decide") -> None:
    """A tick whose `script` (scale_decide, or reap_idle) ran on the server and whose reply
    never came: a server frozen past the client's timeout (DEBUG SLEEP, SIGSTOP) runs the
    script when it wakes."""
    call = getattr(replica.scripts, script)

    async def reply_lost(args: Any) -> Any:
        await call(args)
        raise RedisTimeoutError("Timeout reading from 127.0.0.1:6379")

    setattr(replica.scripts, script, reply_lost)
    try:
        with pytest.raises(RedisTimeoutError):
            await replica.tick()
    finally:
        setattr(replica.scripts, script, call)
    await replica.settle()


async def test_the_creates_of_a_decision_whose_reply_was_lost_are_sent(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """A helper's drill (DEBUG SLEEP 15): the reservations a decision whose reply was lost
    took were never POSTed, and the pool counted them as creating until their deadline
    (--create-timeout, 60 s), a floor of 2 held at nothing meanwhile. The replica's next
    decision sends them."""
    replica = make_replica(aredis, api, clock, "r1", dataclasses.replace(FLOOR_ONLY, min_ready=2))
    await _a_tick_whose_reply_is_lost(replica)
    assert api.created == []
    assert await aredis.zcard(PoolKeys(POOL).key("pending")) == 2
    clock.advance(1000)
    await replica.tick()
    await replica.settle()
    assert sorted(api.created) == ["node-1", "node-2"]
    assert await aredis.zcard(PoolKeys(POOL).key("pending")) == 0
    clock.advance(1000)
    await replica.tick()  # nothing sent twice
    await replica.settle()
    assert len(api.created) == 2
    assert await check_invariants(aredis, POOL) == []


async def test_a_lost_decision_sends_none_of_the_creates_sent_before_it(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """An uncertain create keeps its reservation to its deadline, its node perhaps made: the
    creates of a decision lost after it are sent, and not it a second time (nor another
    replica's reservation)."""
    replica = make_replica(aredis, api, clock, "r1", dataclasses.replace(FLOOR_ONLY, min_ready=1))
    api.create_outcomes.append(CreateResult(CreateOutcome.UNCERTAIN, detail="no answer"))
    await replica.tick()
    await replica.settle()
    pending = PoolKeys(POOL).key("pending")
    uncertain = await aredis.zrange(pending, 0, -1)
    assert len(uncertain) == 1 and api.created == []
    other = make_replica(aredis, api, clock, "r2",
                         dataclasses.replace(FLOOR_ONLY, min_ready=2))
    clock.advance(1000)
    await _a_tick_whose_reply_is_lost(other)  # r2's, one reservation, not r1's to send
    theirs = [m for m in await aredis.zrange(pending, 0, -1) if m.startswith("r2:")]
    assert len(theirs) == 1
    replica.pool = dataclasses.replace(FLOOR_ONLY, min_ready=3)
    clock.advance(1000)
    await _a_tick_whose_reply_is_lost(replica)
    assert await aredis.zcard(pending) == 3
    clock.advance(1000)
    await replica.tick()
    await replica.settle()
    assert api.created == ["node-1"]  # the lost decision's one, alone
    assert sorted(await aredis.zrange(pending, 0, -1)) == sorted([*uncertain, *theirs])


async def test_the_deletes_of_a_reap_whose_reply_was_lost_are_sent(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """As a decision's creates: a reap_idle that ran while its reply was lost left its idle
    nodes terminating with no DELETE until their deadline (--delete-timeout, 60 s), billed
    meanwhile. The next decision sends them, and no DELETE of another node, each counted as
    a termination this replica started (a review of the mend: provisioner_terminations_total
    counted none, by any reason; the reap's own reasons were in the reply lost)."""
    replica = await _two_nodes_idle_past_their_timeout(aredis, api, clock)
    await send([replica], "node:status", {"node_id": "n3", "status": "ready"})
    await _a_tick_whose_reply_is_lost(replica, "reap_idle")
    assert api.deleted == []
    assert sorted(await aredis.zrange(replica.keys.key("terminating"), 0, -1)) == ["n1", "n2"]
    clock.advance(1000)
    await replica.tick()
    await replica.settle()
    assert sorted(api.deleted) == ["n1", "n2"]
    started = {sample.labels["reason"]: sample.value
               for metric in replica.metrics.registry.collect()
               for sample in metric.samples if sample.name == "provisioner_terminations_total"}
    assert sum(started.values()) == 2 and started["lost_reply"] == 2, started
    clock.advance(1000)
    await replica.tick()  # nothing sent twice
    await replica.settle()
    assert sorted(api.deleted) == ["n1", "n2"]
    assert await check_invariants(aredis, POOL) == []


@pytest.mark.parametrize(("lost_before", "failing_read"), [(1, 1), (2, 2)],
                         ids=["the-decisions-own-creates", "the-calls-read-before-it"])
async def test_a_read_of_the_lost_calls_takings_that_fails_leaves_nothing_unsent(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock, lost_before: int,
    failing_read: int,
) -> None:
    """Reviews of the mend: a decision whose read of the lost calls' reservations failed (the
    server stalled again) left unsent its own creates (1 lost, then a decision that reserves
    one more, read 1 fails), or the creates of the lost calls read before the read that failed
    (2 lost, read 2 fails): each counted as creating to its deadline, short of the floor."""
    replica = make_replica(aredis, api, clock, "r1", dataclasses.replace(FLOOR_ONLY, min_ready=1))
    await _a_tick_whose_reply_is_lost(replica)
    replica.pool = dataclasses.replace(FLOOR_ONLY, min_ready=2)
    if lost_before == 2:
        clock.advance(1000)
        await _a_tick_whose_reply_is_lost(replica)
    read = aredis.zrangebyscore
    reads = 0

    async def a_read_lost(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        if reads == failing_read:
            raise RedisTimeoutError("Timeout reading from 127.0.0.1:6379")
        return await read(*args, **kwargs)

    aredis.zrangebyscore = a_read_lost  # type: ignore[method-assign]
    clock.advance(1000)
    try:
        with contextlib.suppress(RedisTimeoutError):
            await replica.tick()
    finally:
        aredis.zrangebyscore = read  # type: ignore[method-assign]
    await replica.settle()
    assert reads == failing_read
    clock.advance(1000)
    await replica.tick()
    await replica.settle()
    assert sorted(api.created) == ["node-1", "node-2"]
    assert await aredis.zcard(PoolKeys(POOL).key("pending")) == 0
    assert await check_invariants(aredis, POOL) == []


async def test_a_replica_without_gauges_decides_the_same_and_exports_no_pool_gauges(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    # The replay benchmark's replica: no scrape, so no per-tick snapshot for the gauges.
    service = ServiceConfig("redis://x", "http://api", pool=POOL, replica_id="r1")
    replica = Replica(aredis, service, FLOOR_ONLY, api, clock=clock, metrics=Metrics(),
                      gauges=False)
    await replica.tick()
    await replica.settle()
    assert api.created == ["node-1"]  # decided and acted as ever
    assert counter(replica, "provisioner_scaling", quantity="creates") == 0
    await replica.refresh_gauges(clock.now_ms())  # what a replica with gauges does each tick
    assert counter(replica, "provisioner_scaling", quantity="creates") == 1


async def test_the_forecast_check_is_exported_for_prometheus(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    replica = make_replica(aredis, api, clock, "r1", PoolConfig())
    await replica.tick()  # opens a check over the boot prior, 60 s
    await send([replica], "user:connect", {"user_id": "u1"})
    await send([replica], "user:connect", {"user_id": "u2"})
    clock.advance(60_000)
    await replica.tick()
    await replica.settle()

    def gauge(quantity: str) -> float:
        return counter(replica, "provisioner_forecast_check", quantity=quantity)

    assert (gauge("horizons"), gauge("seen"), gauge("above_buffer")) == (1, 2, 1)
    assert 0 < gauge("expected") < 1 and gauge("sq_error") > 1 and gauge("above_poisson") > 0
    assert gauge("variance") == pytest.approx(gauge("expected"))  # a Poisson prior
    # the first tick's forecast, checked from every tick too
    assert (gauge("sliding_checks"), gauge("sliding_above")) == (1, 1)
    assert gauge("sliding_above_poisson") == pytest.approx(gauge("above_poisson"))
    assert (gauge("sliding_came"), gauge("sliding_came_sq")) == (2, 4)
    assert gauge("sliding_sq_error") == pytest.approx(gauge("sq_error"))
    # no node was allocated: the frees forecast is the sessions forecast to begin and end
    # within the lead time (a share of the connects forecast), and none came
    assert (gauge("sliding_summed"), gauge("sliding_frees_came")) == (1, 0)
    assert 0 < gauge("sliding_frees_forecast") < gauge("expected")
    # the exported labels are the metrics' contract: every summed figure, `checks` as `horizons`
    exported = {sample.labels["quantity"]
                for metric in replica.metrics.registry.collect()
                if metric.name == "provisioner_forecast_check" for sample in metric.samples}
    assert exported == {
        "horizons", "expected", "seen", "sq_error", "variance", "above_buffer", "above_poisson",
        "sliding_checks", "sliding_above", "sliding_above_poisson", "sliding_summed",
        "sliding_came", "sliding_came_sq", "sliding_sq_error", "sliding_frees_forecast",
        "sliding_frees_came"}


async def test_the_scaling_totals_are_exported_for_prometheus(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    replica = make_replica(aredis, api, clock, "r1", PoolConfig(min_ready=2))
    await replica.tick()  # the floor, from nothing: two creates on a rise of the target
    await replica.settle()
    await send([replica], "user:connect", {"user_id": "u1"})  # waits: spare is used
    clock.advance(1000)
    await replica.tick()
    await replica.settle()

    def gauge(quantity: str) -> float:
        return counter(replica, "provisioner_scaling", quantity=quantity)

    snap = await replica.scripts.snapshot(clock.now_ms(), 120_000)
    assert {q: gauge(q) for q in snap.scaling().as_dict()} == snap.scaling().as_dict()
    assert (gauge("creates"), gauge("on_rise")) == (len(api.created), 2)
    assert gauge("to_refill") >= 1


async def test_values_repaired_are_exported_and_shown(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """A value broken by hand is started again by the script that adds to it (`add_to`); the
    operator sees how many, on /metrics (and its alert) and in `provisioner status`."""
    from rich.console import Console

    from provisioner.view import read_view, render_view

    replica = make_replica(aredis, api, clock, "r1")
    await replica.refresh_gauges(clock.now_ms())
    assert counter(replica, "provisioner_values_repaired") == 0
    await aredis.hset(PoolKeys(POOL).key("stats"), mapping={"connects": "abc", "misses": "x"})
    await send([replica], "user:connect", {"user_id": "u1"})  # a miss: both repaired
    await replica.refresh_gauges(clock.now_ms())
    assert counter(replica, "provisioner_values_repaired") == 2
    shown = await read_view(aredis, POOL, clock.now_ms(), 120_000)
    assert shown.as_dict()["values_repaired"] == 2
    console = Console(width=200, record=True)
    console.print(render_view(shown))
    assert "values repaired 2" in console.export_text()


async def test_a_lost_subscription_is_taken_again_and_its_gap_counted(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """The server drops a subscriber (a lost connection, or a publish past its pub/sub buffer
    limit): the listener subscribes again, counts the seconds it was deaf, and applies what
    comes after."""
    replica = make_replica(aredis, api, clock, "r1")
    listening = asyncio.create_task(replica.listen())
    try:
        await asyncio.wait_for(replica.subscribed.wait(), 5)
        assert counter(replica, "provisioner_unsubscribed_seconds_total") == 0
        killed = await aredis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        assert killed >= 1
        await _until(lambda: counter(replica, "provisioner_errors_total",
                                     where="subscribe") == 1)
        await _until(lambda: counter(replica, "provisioner_unsubscribed_seconds_total") > 0)
        assert replica.subscribed.is_set()
        gap = counter(replica, "provisioner_unsubscribed_seconds_total")
        assert 0 < gap < 3  # the first retry waits 0.2 s
        await aredis.publish("user:connect", json.dumps({"user_id": "after"}))
        await _until(lambda: counter(replica, "provisioner_connects_total") == 1)
        # and `provisioner status` says so, from the replica's heartbeat
        await replica.heartbeat()
        [seen] = await replica.scripts.replicas()
        assert seen.unsubscribed_s == round(gap, 3)
        assert f"unsubscribed {gap:.1f}s in all" in seen.describe()
    finally:
        replica.stopping.set()
        await listening


def _probing_replica(client: aioredis.Redis, max_event_lag_s: float = 0.5,
                     **service: Any) -> Replica:
    """A replica on `client` whose heartbeats' probes go every 0.2 s: the silence it allows
    is max(2 * max_event_lag_s, 1 s)."""
    settings = {"pool": POOL, "replica_id": "r1", **service}
    return Replica(client, ServiceConfig("redis://x", "http://api",
                                         max_event_lag_s=max_event_lag_s,
                                         heartbeat_interval_s=0.2, **settings),
                   PoolConfig(min_ready=0, scaling_policy="heuristic"), FakeNodeApi(),
                   metrics=Metrics())


async def _probes_all_back(replica: Replica, seconds: float) -> None:
    """A heartbeat's probe every 0.2 s for `seconds`, then every one back."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        await replica.probe_lag()
        await asyncio.sleep(0.2)
    await _until(lambda: not replica._probes_out)


async def _silencing_proxy(redis_url: str, frozen: asyncio.Event, behind_s: float,
                           tasks: list[asyncio.Future[Any]], *, replies_only: bool = False,
                           half_message: bool = False) -> asyncio.AbstractServer:
    """A TCP proxy to the server. A subscribed connection's messages reach the client
    `behind_s` late (a listener that far behind the stream; replies to commands are not held).
    Once `frozen` is set, the connections open then carry nothing more, either way, and are not
    closed (a middlebox dropping the flow, a partition); new ones go through. With
    `replies_only`, once `frozen` is set, the next connection to send a script call has
    nothing more back from then on, its commands still reaching the server, and `frozen` is
    cleared: replies lost. With `half_message`, a frozen connection passes the first half of
    the next bytes it carries back (a connection dead inside a message)."""
    target = urlparse(redis_url)

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       freeze: asyncio.Event, subscribed: asyncio.Event) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if b"SUBSCRIBE" in data.upper():
                    subscribed.set()
                if replies_only and frozen.is_set() and b"EVALSHA" in data.upper():
                    frozen.clear()
                    freeze.set()  # this connection's downstream: replies lost from now
                elif freeze.is_set() and not replies_only:
                    await asyncio.Event().wait()  # held: a silent path
                writer.write(data)
                await writer.drain()

    async def downstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         freeze: asyncio.Event, subscribed: asyncio.Event) -> None:
        line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def take() -> None:
            while data := await reader.read(65536):
                line.put_nowait((time.monotonic() + (behind_s if subscribed.is_set() else 0),
                                 data))

        taking = asyncio.create_task(take())
        with contextlib.suppress(OSError, asyncio.CancelledError):
            try:
                while True:
                    due, data = await line.get()
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                    if freeze.is_set():
                        if half_message:
                            writer.write(data[:len(data) // 2])
                            await writer.drain()
                        await asyncio.Event().wait()  # held: a silent path
                    writer.write(data)
                    await writer.drain()
            finally:
                taking.cancel()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(target.hostname, target.port)
        freeze = asyncio.Event() if replies_only or frozen.is_set() else frozen
        subscribed = asyncio.Event()
        tasks.append(asyncio.gather(upstream(client_r, server_w, freeze, subscribed),
                                    downstream(server_r, client_w, freeze, subscribed)))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@contextlib.asynccontextmanager
async def _listening_through_proxy(redis_url: str, behind_s: float = 0.0, **proxy: bool,
                                   ) -> AsyncIterator[tuple[Replica, asyncio.Event]]:
    """A probing replica listening through `_silencing_proxy`, subscribed and its probes all
    back; with the event that freezes the proxy."""
    frozen = asyncio.Event()
    tasks: list[asyncio.Future[Any]] = []
    server = await _silencing_proxy(redis_url, frozen, behind_s, tasks, **proxy)
    async with _replica_through(server, tasks) as replica:
        await asyncio.wait_for(replica.subscribed.wait(), 5)
        await _probes_all_back(replica, 1.0)
        yield replica, frozen


@contextlib.asynccontextmanager
async def _replica_through(server: asyncio.Server, tasks: list[asyncio.Future[Any]],
                           **client: Any) -> AsyncIterator[Replica]:
    """A probing replica listening through the proxy `server` (its connections' copying in
    `tasks`), its client made with `client` (`parser_class`, ...); stopped at the end, and the
    proxy with it."""
    port = server.sockets[0].getsockname()[1]
    through = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=1,
                                      **client)
    replica = _probing_replica(through)
    listening = asyncio.create_task(replica.listen())
    try:
        yield replica
    finally:
        replica.stopping.set()
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(through.aclose(), 2)


async def _until_taken_for_silent(replica: Replica, every_s: float) -> None:
    """Probes sent over new connections, as heartbeats send them, every `every_s` until the
    subscription is taken for silent (within 8 s)."""
    started = time.monotonic()
    while counter(replica, "provisioner_errors_total", where="subscribe") == 0:
        assert time.monotonic() - started < 8, (
            f"never subscribed again: probes out {len(replica._probes_out)}, lag "
            f"{replica.event_lag_s():.1f}s")
        with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError,
                                 asyncio.TimeoutError):
            await asyncio.wait_for(replica.probe_lag(), max(every_s, 0.05))
        await asyncio.sleep(every_s)


@pytest.mark.parametrize("behind_s", [0.0, 0.3])
async def test_a_subscription_gone_silent_is_taken_again_and_its_gap_counted(
    redis_url: str, aredis: aioredis.Redis, behind_s: float,
) -> None:
    """Found by a review: the listener's connection stopped carrying bytes without being
    closed. The replica knew it (its probes never came back, /readyz failed) but never
    subscribed again: redis-py's pub/sub notices no such thing, and the listener resubscribed
    only on an error. And found by the review of that fix: a listener behind the stream (0.3 s
    here) always had a probe on its way sent before its last read, which never came back and
    hid every later one from the check."""
    async with _listening_through_proxy(redis_url, behind_s) as (replica, frozen):
        assert counter(replica, "provisioner_errors_total", where="subscribe") == 0
        frozen.set()  # every connection open now goes silent
        await _until_taken_for_silent(replica, 0.2)
        await _until(lambda: replica.subscribed.is_set())
        assert counter(replica, "provisioner_errors_total", where="subscribe") == 1
        # Taken for dead a second or so after the last message it carried (twice
        # --max-event-lag here, five heartbeats), and counted from then.
        assert 1.0 < counter(replica, "provisioner_unsubscribed_seconds_total") < 5
        await aredis.publish("user:connect", json.dumps({"user_id": "carol"}))
        await _until(lambda: counter(replica, "provisioner_connects_total") == 1)


async def test_a_silent_subscription_is_taken_again_at_once(
    redis_url: str, aredis: aioredis.Redis,
) -> None:
    """A subscription taken for silent was taken so because the server answered a probe's
    PUBLISH: it is reachable, and the listener subscribes again at once. It waited the
    backoff of a lost connection first (0.2 s), and lost what was published meanwhile."""
    async with _listening_through_proxy(redis_url) as (replica, frozen):
        frozen.set()
        await _until_taken_for_silent(replica, 0.005)
        await asyncio.sleep(0.05)  # a connect published 50 ms after
        await aredis.publish("user:connect", json.dumps({"user_id": "gina"}))
        await _until(lambda: counter(replica, "provisioner_connects_total") == 1, 2.0)


async def test_a_listener_tries_to_subscribe_again_at_least_every_second(
    api: FakeNodeApi, clock: ManualClock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the server is away the listener tries again 0.2 s after the loss, doubling to
    1 s: up to 5 s, a review's replica stayed deaf 2 s after its server answered again, and
    every event published meanwhile was lost."""
    import provisioner.service as service_module
    from provisioner.redis_server import free_port

    away = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    replica = make_replica(away, api, clock, "r1")
    waits: list[float] = []

    async def recorded(stopping: asyncio.Event, seconds: float) -> bool:
        waits.append(seconds)
        if len(waits) == 7:
            replica.stopping.set()
        return replica.stopping.is_set()

    monkeypatch.setattr(service_module, "sleep_unless", recorded)
    try:
        await asyncio.wait_for(replica.listen(), 10)
    finally:
        await away.aclose()
    assert waits == [0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]


async def test_a_connection_that_dies_inside_a_message_is_taken_for_dead(
    redis_url: str, aredis: aioredis.Redis,
) -> None:
    """The check for bytes not yet read (`_bytes_waiting`) keeps a live listener whose loop
    was blocked. A connection that died in the middle of a message holds such bytes for good:
    the second silent read with them still there takes it for dead (`suspect`). Without that,
    the listener stayed deaf for as long as the connection did."""
    async with _listening_through_proxy(redis_url, half_message=True) as (replica, frozen):
        frozen.set()
        await aredis.publish("user:activity", json.dumps({"user_id": "x" * 60}))
        await _until_taken_for_silent(replica, 0.2)
        await _until(lambda: replica.subscribed.is_set())
        assert counter(replica, "provisioner_errors_total", where="subscribe") == 1
        await aredis.publish("user:connect", json.dumps({"user_id": "erin"}))
        await _until(lambda: counter(replica, "provisioner_connects_total") == 1)


def _parser_class(parser: str) -> type:
    """redis-py's hiredis parser, or its pure-Python one (what it uses where hiredis is not
    importable), by name."""
    from redis._parsers import _AsyncHiredisParser, _AsyncRESP2Parser

    return _AsyncHiredisParser if parser == "hiredis" else _AsyncRESP2Parser


@pytest.mark.parametrize("parser", ["hiredis", "python"])
async def test_bytes_a_listener_has_not_read_are_seen_with_either_parser(
    redis_url: str, aredis: aioredis.Redis, parser: str,
) -> None:
    """The check before a connection is taken for dead (`_bytes_waiting`) sees a message
    waiting unread with redis-py's hiredis parser and with its pure-Python one (what it uses
    where hiredis is not importable). Found by a review: before redis-py 8.0 the Python
    parser's check saw only an end of file."""
    from provisioner.service import _bytes_waiting

    client = aioredis.Redis.from_url(redis_url, parser_class=_parser_class(parser))
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe("unread")
        assert (await pubsub.get_message(timeout=1))["type"] == "subscribe"
        assert not await _bytes_waiting(pubsub)
        await aredis.publish("unread", "hello")
        await asyncio.sleep(0.2)  # the bytes reach the connection
        assert await _bytes_waiting(pubsub)
        message = await pubsub.get_message(timeout=1)
        assert message is not None and message["data"] == b"hello"
    finally:
        await pubsub.aclose()
        await client.aclose()


@contextlib.asynccontextmanager
async def _listening_behind(redis_url: str, behind_s: float,
                            max_lag_s: float = 0.5) -> AsyncIterator[Replica]:
    """A probing replica listening through `run_delay_proxy`, `behind_s` behind the stream,
    subscribed. The proxy runs in a process of its own, so it goes on while a test blocks its
    own loop."""
    import subprocess
    import sys

    target = urlparse(redis_url)
    proxy = subprocess.Popen(  # noqa: ASYNC220 (it prints one line, then runs on its own)
        [sys.executable, "-c", "from tests.helpers import run_delay_proxy; "
         f"run_delay_proxy({target.hostname!r}, {target.port}, {behind_s})"],
        stdout=subprocess.PIPE, text=True)
    through = None
    try:
        assert proxy.stdout is not None
        through = aioredis.Redis.from_url(f"redis://127.0.0.1:{int(proxy.stdout.readline())}/0")
        replica = _probing_replica(through, max_lag_s)
        listening = asyncio.create_task(replica.listen())
        try:
            await asyncio.wait_for(replica.subscribed.wait(), 5)
            yield replica
        finally:
            replica.stopping.set()
            listening.cancel()
            with contextlib.suppress(BaseException):
                await listening
    finally:
        proxy.kill()
        proxy.wait()
        if through is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(through.aclose(), 2)


def _block_the_loop_at_once() -> None:
    time.sleep(1.5)


def _block_the_loop_in_the_reads_timeout_turn() -> None:
    # The loop lags while the listener's read timer comes due, then the next turn blocks: the
    # bytes reach the socket meanwhile, and the timer runs before any select.
    asyncio.get_running_loop().call_soon(time.sleep, 2.5)
    time.sleep(0.6)


def _block_the_loop_again_as_its_last_read_begins() -> None:
    # Past the silence allowed, then again in the turn the listener's read after it begins:
    # its timer and the socket are ready together in the turn after, and the timer wins.
    loop = asyncio.get_running_loop()
    loop.call_soon(lambda: loop.call_soon(time.sleep, 1.6))
    loop.call_later(0.55, lambda: loop.call_soon(time.sleep, 0.5))
    time.sleep(0.6)


@pytest.mark.parametrize(("block", "behind_s", "max_lag_s"), [
    (_block_the_loop_at_once, 0.3, 0.5),
    (_block_the_loop_in_the_reads_timeout_turn, 1.0, 1.0),
    (_block_the_loop_again_as_its_last_read_begins, 1.0, 1.0),
])
async def test_a_live_listener_is_not_taken_for_silent_after_its_loop_was_blocked(
    redis_url: str, aredis: aioredis.Redis, block: Any, behind_s: float, max_lag_s: float,
) -> None:
    """Found by a review: the replica's loop blocked (a synchronous call; or the process
    stopped: SIGSTOP, a VM paused) past the silence allowed, just after a heartbeat's probe
    went out to a listener `behind_s` behind. Woken, the read's timeout and the bytes were
    ready in one turn, the timeout won, and the live listener was taken for silent, dropping
    the connect published just before. Then by the reviews of its fixes: a read once more at
    once lost to its own timeout too, with no wait where the block began in the turn the
    first read timed out, and with 50 ms where a second block began as that read did."""
    async with _listening_behind(redis_url, behind_s, max_lag_s) as replica:
        await _probes_all_back(replica, 1.5)
        await aredis.publish("user:connect", json.dumps({"user_id": "dave"}))
        await replica.probe_lag()  # the heartbeat's: answered, on its way
        block()
        await _until(lambda: counter(replica, "provisioner_connects_total") == 1)
        assert counter(replica, "provisioner_errors_total", where="subscribe") == 0


async def test_a_listener_further_behind_than_the_silence_allowed_is_not_taken_for_silent(
    redis_url: str, aredis: aioredis.Redis,
) -> None:
    """A listener 3 s behind the stream, with 1.5 s of silence allowed and a probe every 0.8 s:
    the probes on their way are older than the silence allowed, but a read every 0.8 s brings
    one sent before it. Only a probe sent since the last read counts (`_looks_silent`): the
    oldest probe out would take this live listener for silent at its first empty read.

    Each probe is read within 1.5 s of the next one sent, 0.7 s to spare. (It was 2 s behind
    with 1 s allowed, and one junk message on its way before the first probe: a probe sent just
    after that message was read waited 1.2 s for the next read, and under eight CPU hogs on
    two cores one run in four took the listener for silent.)"""
    async with _listening_behind(redis_url, 3.0, max_lag_s=0.75) as replica:
        # Something on its way all the while before the first probe: a new subscription 3 s
        # behind reads nothing for 3 s, and would be taken for silent at its start.
        for _ in range(5):
            await aredis.publish(replica.probe_channel, "-inf")
            await asyncio.sleep(0.4)
        for _ in range(8):
            await replica.probe_lag()
            await asyncio.sleep(0.8)
        await aredis.publish("user:connect", json.dumps({"user_id": "frank"}))
        await _until(lambda: counter(replica, "provisioner_connects_total") == 1)
        assert counter(replica, "provisioner_errors_total", where="subscribe") == 0


@pytest.mark.engine  # starts the engine under test itself, to pause it
async def test_a_server_paused_past_the_silence_allowed_loses_no_event() -> None:
    """Found by a review of the check above: a server stopped (SIGSTOP: a VM paused, a fork
    stalled) for longer than the silence allowed, and less than the client's timeout, answered
    the probe's PUBLISH only once it ran again, and the listener took its live connection for
    dead, dropping the connect published meanwhile, which the server then delivered. Only a
    probe whose PUBLISH was answered counts as on its way."""
    import os
    import signal

    from provisioner.redis_server import start_server

    server = start_server(os.environ.get("PROVISIONER_TEST_REDIS_BINARY"))
    client = aioredis.Redis.from_url(server.url)
    producer = aioredis.Redis.from_url(server.url, socket_timeout=None)  # waits out the pause
    replica = _probing_replica(client, pool="paused", reconcile_interval_s=0)
    running = asyncio.create_task(replica.run())
    try:
        await _until(lambda: replica.subscribed.is_set())
        await producer.ping()
        await asyncio.sleep(0.7)  # a heartbeat's probe gone and back
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(0.5)
            published = asyncio.create_task(
                producer.publish("user:connect", json.dumps({"user_id": "alice"})))
            await asyncio.sleep(2.5)  # silence allowed: 1 s
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert await asyncio.wait_for(published, 10) == 1
        await _until(lambda: counter(replica, "provisioner_connects_total") == 1)
        assert counter(replica, "provisioner_errors_total", where="subscribe") == 0
    finally:
        replica.stopping.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 10)
        await producer.aclose()
        await client.aclose()
        server.stop()


def _short_gaps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The holds and edges of a gap, shrunk for a test: held 0.5 s before the question
    (UNREACHABLE_HOLD_S's 10), edges of 0.1 and 0.3 s (0.5 and 3), asked every 0.1 s at most."""
    import provisioner.service as service

    monkeypatch.setattr(service, "UNREACHABLE_HOLD_S", 0.5)
    monkeypatch.setattr(service, "GAP_START_EDGE_S", 0.1)
    monkeypatch.setattr(service, "GAP_END_EDGE_S", 0.3)
    monkeypatch.setattr(service, "GAP_ASK_MAX_S", 0.1)


@contextlib.asynccontextmanager
async def _a_replica_on_a_server_of_its_own(
        monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Any, aioredis.Redis, Replica]]:
    """A server of the engine under test, to pause, a client reading it, and a replica on it
    whose client gives up after 0.3 s (`_short_gaps`)."""
    import os

    from provisioner.redis_server import start_server

    _short_gaps(monkeypatch)
    server = start_server(os.environ.get("PROVISIONER_TEST_REDIS_BINARY"))
    client = aioredis.Redis.from_url(server.url, socket_timeout=0.3, socket_connect_timeout=0.3)
    reader = aioredis.Redis.from_url(server.url)
    try:
        yield server, reader, _probing_replica(client, pool="paused-apply")
    finally:
        await client.aclose()
        await reader.aclose()
        server.stop()


async def _connects_through_a_pause(server: Any, replica: Replica,
                                    caplog: pytest.LogCaptureFixture,
                                    held: bool = True) -> list[Outcome]:
    """ana's and ben's connects, handled as the server is stopped (SIGSTOP) for 1.5 s; `held`:
    whether they are still held as it runs again."""
    import os
    import signal

    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        with caplog.at_level("WARNING", logger="provisioner.service"):
            handled = asyncio.create_task(replica.handle_many(
                [wire("user:connect", {"user_id": user}) for user in ("ana", "ben")]))
            await asyncio.sleep(1.5)
            assert handled.done() is not held
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    return await asyncio.wait_for(handled, 5)


@pytest.mark.engine  # starts the engine under test itself, to pause it
async def test_a_batch_held_through_a_server_pause_is_applied_once_it_answers(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An operator's drill: connects being applied as the server was stopped (SIGSTOP) for
    20 s were dropped by both replicas after UNREACHABLE_HOLD_S's 10 s, and 3 and 4 of 30 users
    were never given a node nor told to wait. A pause looks to a replica like a cut behind a hop
    that takes the connection, where a late copy can end a session begun since (a review of
    the one session that held every such batch for --event-hold). The batch is held till the
    server answers and applied if its heartbeats say it served no replica meanwhile: no one
    can have published a later event (here paused 1.5 s against a hold of 0.5 s)."""
    async with _a_replica_on_a_server_of_its_own(monkeypatch) as (server, reader, replica):
        await replica.heartbeat()  # every 0.2 s, it says: a pause of 0.4 s can be told
        await replica.handle(*wire("user:activity", {"user_id": "ana",
                                                     "timestamp": int(time.time())}))
        outcomes = await _connects_through_a_pause(server, replica, caplog)
        assert await reader.zrange(replica.keys.key("waiting"), 0, -1) == [b"ana", b"ben"], (
            outcomes, caplog.text)
        assert "it was paused, not this replica cut off; applying the 2 events" in caplog.text
        assert counter(replica, "provisioner_server_gaps_total", judged="pause") == 1
        assert counter(replica, "provisioner_errors_total", where="event") == 0


@pytest.mark.engine  # starts the engine under test itself, to pause it
async def test_a_batch_held_through_a_pause_no_heartbeat_can_judge_is_dropped_and_named(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """With no heartbeat to read the server's clock by (a replica just started, or run with
    --heartbeat-interval 0), a pause cannot be told from a cut: the batch is dropped, as a
    cut's is, each event named and counted."""
    async with _a_replica_on_a_server_of_its_own(monkeypatch) as (server, reader, replica):
        assert await _connects_through_a_pause(server, replica, caplog, held=False) == [
            None, None]
        for user in ("ana", "ben"):
            assert f"user:connect of {user} may have been applied" in caplog.text
        assert "no heartbeat to read the server's clock by" in caplog.text
        assert counter(replica, "provisioner_errors_total", where="event") == 2
        assert counter(replica, "provisioner_server_gaps_total", judged="unknown") == 1
        assert await reader.zcard(replica.keys.key("waiting")) == 0


@pytest.mark.engine  # starts the engine under test itself, to pause it
async def test_a_short_pause_no_heartbeat_can_judge_leaves_a_listener_behind_its_backlog(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A third review: a listener 3 s behind (past UNREACHABLE_HOLD_S, 2 s here: 10 s in
    service), its held batch judged at once in a pause of 0.5 s, too short to tell: the
    batches read before the pause and waiting behind it, never tried against a server that
    could not be reached, were dropped as read over UNREACHABLE_HOLD_S before the answer, on
    every replica alike. That drop is for a gap longer than the hold only."""
    import os
    import signal

    import provisioner.service as service

    async with _a_replica_on_a_server_of_its_own(monkeypatch) as (server, reader, replica):
        monkeypatch.setattr(service, "UNREACHABLE_HOLD_S", 2.0)
        await replica.heartbeat()
        read_at = time.monotonic() - 3.0
        # ben's and cleo's connects wait in the backlog behind ana's, read with it
        replica._backlog.extend((b"user:connect", b"{}", read_at + 0.01) for _ in range(2))
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            with caplog.at_level("WARNING", logger="provisioner.service"):
                held = asyncio.create_task(replica.handle_many(
                    [wire("user:connect", {"user_id": "ana"})], read_at))
                await asyncio.sleep(0.5)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        with caplog.at_level("WARNING", logger="provisioner.service"):
            await asyncio.wait_for(held, 5)
            replica._backlog.clear()
            for user in ("ben", "cleo"):
                await replica.handle_many([wire("user:connect", {"user_id": user})],
                                          read_at + 0.01)
        waiting = await reader.zrange(replica.keys.key("waiting"), 0, -1)
        assert b"ben" in waiting and b"cleo" in waiting, caplog.text
        assert counter(replica, "provisioner_server_gaps_total", judged="unknown") == 1


@pytest.mark.engine  # starts the engine under test itself, to pause it
async def test_a_pause_no_heartbeat_can_judge_drops_only_the_batch_held(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A review: a pause judged 'unknown' (here a replica of the pool beats every 5 s, so
    1.5 s cannot tell) dropped every message read before the answer, on every replica alike:
    bob's connect, published during the pause and run by the server as it came back, and the
    batches read before it and waiting behind the held one (cleo's). Only the held batch
    (ana's) goes now, as before gaps were judged."""
    import os
    import signal

    import provisioner.service as service
    from provisioner.redis_server import start_server

    _short_gaps(monkeypatch)
    # ana's try is sent 0.3 s after it is made (`slow_first`), and cleo's connect read
    # meanwhile, before the server was stopped
    monkeypatch.setattr(service, "GAP_READ_EDGE_S", 0.5)
    server = start_server(os.environ.get("PROVISIONER_TEST_REDIS_BINARY"))
    client = aioredis.Redis.from_url(server.url, socket_timeout=0.3, socket_connect_timeout=0.3)
    reader = aioredis.Redis.from_url(server.url)
    producer = aioredis.Redis.from_url(server.url, socket_timeout=None)  # waits out the pause
    replica = _probing_replica(client, max_event_lag_s=30, pool="paused-unknown")
    run_many = replica.scripts.run_many
    first = {"call": True}

    async def slow_first(calls: list[Any]) -> Any:
        if first["call"]:  # ana's: on its way as the server is stopped, cleo's read behind it
            first["call"] = False
            await asyncio.sleep(0.3)
        return await run_many(calls)

    replica.scripts.run_many = slow_first  # type: ignore[method-assign]
    listening = asyncio.create_task(replica.listen())
    try:
        await replica.heartbeat()
        await replica.scripts.heartbeat("r2", {"interval_s": 5.0, "keeps_beats": True},
                                        600_000)
        await asyncio.wait_for(replica.subscribed.wait(), 5)
        with caplog.at_level("WARNING", logger="provisioner.service"):
            await reader.publish("user:connect", json.dumps({"user_id": "ana"}))
            await reader.publish("user:connect", json.dumps({"user_id": "cleo"}))
            await asyncio.sleep(0.1)
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(0.2)
                published = asyncio.create_task(
                    producer.publish("user:connect", json.dumps({"user_id": "bob"})))
                await asyncio.sleep(1.5)
                # The hold long again at the answer, as 10 s is against a pause of seconds:
                # cleo's connect, read 1.7 s before it, is not dropped as read too long ago
                monkeypatch.setattr(service, "UNREACHABLE_HOLD_S", 30.0)
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            assert await asyncio.wait_for(published, 5) == 1
            await _until(lambda: "user:connect of ana" in caplog.text, why=lambda: caplog.text)
            await _until(lambda: not replica._backlog and not replica._taken)
            await asyncio.sleep(0.3)
        waiting = await reader.zrange(replica.keys.key("waiting"), 0, -1)
        assert b"bob" in waiting and b"cleo" in waiting, (waiting, caplog.text)
        assert counter(replica, "provisioner_server_gaps_total", judged="unknown") == 1
        assert "where the longest heartbeat interval takes 10.0s" in caplog.text
    finally:
        replica.stopping.set()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(listening, 10)
        await producer.aclose()
        await client.aclose()
        await reader.aclose()
        server.stop()


@pytest.mark.engine  # starts the engine under test itself, to pause it
async def test_a_probe_whose_reply_is_lost_stays_out_and_times_the_listener() -> None:
    """Found by a partition drill: one replica of two cut from its server for 3 minutes (its
    connections open, carrying nothing), then back. Each heartbeat's probe timed out and was
    forgotten, so its lag read 0.0005 s all through, though its listener read nothing; and
    once back it applied the 3 minutes of events the other replica had applied in time (the
    pool counted 60 connects for 37 published), its lag still 0. A probe whose PUBLISH timed
    out lost its reply, not itself: it is on its way, behind every event published while the
    connection carried nothing, and stays out, its age the lag, until it comes back."""
    import os
    import signal

    from provisioner.redis_server import start_server

    server = start_server(os.environ.get("PROVISIONER_TEST_REDIS_BINARY"))
    client = aioredis.Redis.from_url(server.url, socket_timeout=1)
    producer = aioredis.Redis.from_url(server.url, socket_timeout=None)  # waits out the cut
    replica = _probing_replica(client, pool="cut")
    listening = asyncio.create_task(replica.listen())
    try:
        await asyncio.wait_for(replica.subscribed.wait(), 5)
        await _probes_all_back(replica, 0.6)
        os.kill(server.process.pid, signal.SIGSTOP)  # nothing comes back, nothing is closed
        try:
            with pytest.raises(RedisTimeoutError):
                await replica.probe_lag()  # the heartbeat's: its reply lost
            published = asyncio.create_task(
                producer.publish("user:connect", json.dumps({"user_id": "hana"})))
            status, body = await _readyz(replica)
            assert status == 503
            assert any(problem.startswith("events applied") for problem in body["problems"])
            assert (counter(replica, "provisioner_event_lag_seconds")
                    > replica.service.max_event_lag_s)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert await asyncio.wait_for(published, 10) == 1
        await _until(lambda: counter(replica, "provisioner_connects_total") == 1)
        await _until(lambda: not replica._probes_out)  # back, behind the connect
        assert (counter(replica, "provisioner_event_lag_seconds")
                > replica.service.max_event_lag_s)
    finally:
        replica.stopping.set()
        listening.cancel()
        with contextlib.suppress(BaseException):
            await listening
        await producer.aclose()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.aclose(), 2)
        server.stop()


async def test_a_replica_that_finds_the_pools_state_gone_says_so_once(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis restarted empty (no persistence), flushed, or failed over to an empty replica: the
    pool's epoch changes between two heartbeats, and each replica that ran before counts it and
    logs one error; a replica started after the loss has nothing to compare with."""
    r1, r2 = make_replica(aredis, api, clock, "r1"), make_replica(aredis, api, clock, "r2")
    for _ in range(3):  # the same state: nothing to say
        for replica in (r1, r2):
            await replica.heartbeat()
    assert counter(r1, "provisioner_state_lost_total") == 0
    await send([r1], "node:status", {"node_id": "in-use", "status": "ready"})
    await send([r1], "user:connect", {"user_id": "u1"})
    await aredis.flushall()
    api.listed = [ListedNode("in-use", "ready"), ListedNode("booting-1", "booting")]
    late = make_replica(aredis, api, clock, "r3")
    with caplog.at_level(logging.ERROR, logger="provisioner.service"):
        for replica in (late, r1, r2, r1, r2, late):
            await replica.heartbeat()
    assert [counter(r, "provisioner_state_lost_total") for r in (r1, r2, late)] == [1, 1, 0]
    lost = [rec.getMessage() for rec in caplog.records if "state in Redis was lost" in rec.message]
    assert len(lost) == 2 and "When Redis loses the pool's state" in lost[0]
    # the replicas that saw it took the API's nodes back at once, not at the next interval,
    # and published the settings again; the node in use is free as far as the pool can tell
    assert set(await aredis.zrange(PoolKeys(POOL).key("nodes"), 0, -1)) == {"in-use",
                                                                              "booting-1"}
    assert await aredis.lrange(PoolKeys(POOL).key("ready"), 0, -1) == ["in-use"]
    assert await aredis.hget(PoolKeys(POOL).config, "max_nodes") == str(r1.pool.max_nodes)


async def test_a_state_put_back_from_an_older_copy_is_seen_as_a_loss(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found by a review: a server that came back with an older copy of the pool (a snapshot,
    a replica promoted before it caught up) holds the same epoch; no replica saw the loss, and
    the node a user was handed after the copy went to the next user who connected. The pool
    counts its heartbeats: one that gets fewer than the replica's last one did says so."""
    r1, r2 = make_replica(aredis, api, clock, "r1"), make_replica(aredis, api, clock, "r2")
    for replica in (r1, r2):
        await replica.heartbeat()
    for status in ("booting", "ready"):
        await send([r1], "node:status", {"node_id": "n1", "status": status})
    copy = {key: await aredis.dump(key) for key in await aredis.keys("*")}
    await send([r1], "user:connect", {"user_id": "alice"})
    for _ in range(2):  # later heartbeats, not in the copy
        for replica in (r1, r2):
            await replica.heartbeat()
    assert counter(r1, "provisioner_state_lost_total") == 0
    await aredis.flushall()
    for key, value in copy.items():
        await aredis.restore(key, 0, value)
    api.listed = [ListedNode("n1", "ready")]
    with caplog.at_level(logging.ERROR, logger="provisioner.service"):
        for replica in (r1, r2, r1, r2):
            await replica.heartbeat()
    assert [counter(r, "provisioner_state_lost_total") for r in (r1, r2)] == [1, 1]
    said = [rec.getMessage() for rec in caplog.records if "older copy" in rec.message]
    assert len(said) == 2 and "it counts 4 heartbeats, where this replica's last heartbeat " \
        "counted 6. Sessions" in said[1], said
    # The same epoch, so only the count could tell; the copy is the pool's state from now on.
    assert r1._epoch == r2._epoch
    # A count edited by hand (the scripts start it again, as any value repaired) or deleted
    # is no older copy: a review saw the repair page as one.
    stats = PoolKeys(POOL).key("stats")
    for edit in ("3 (by hand)", None):
        if edit is None:
            await aredis.hdel(stats, "heartbeats")
        else:
            await aredis.hset(stats, "heartbeats", edit)
        for replica in (r1, r2, r1, r2):
            await replica.heartbeat()
    assert [counter(r, "provisioner_state_lost_total") for r in (r1, r2)] == [1, 1]


async def test_the_longest_session_is_exported_for_prometheus(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    replica = make_replica(aredis, api, clock, "r1", PoolConfig(min_ready=1))
    await replica.refresh_gauges(clock.now_ms())
    assert counter(replica, "provisioner_longest_session_seconds") == 0
    for status in ("booting", "ready"):
        await send([replica], "node:status", {"node_id": "n1", "status": status})
    await send([replica], "user:connect", {"user_id": "u1"})
    clock.advance(90_000)
    await replica.refresh_gauges(clock.now_ms())
    assert counter(replica, "provisioner_longest_session_seconds") == 90
    await send([replica], "user:disconnect", {"user_id": "u1"})
    await replica.refresh_gauges(clock.now_ms())
    assert counter(replica, "provisioner_longest_session_seconds") == 0


async def test_the_last_decision_and_its_forecast_terms_are_exported_for_prometheus(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    replica = make_replica(aredis, api, clock, "r1", PoolConfig(min_ready=1))
    await send([replica], "user:activity", {"user_id": "u1", "timestamp": clock.now_ms() // 1000})
    await replica.tick()
    await replica.settle()
    await replica.refresh_gauges(clock.now_ms())
    stats = replica.keys.key("stats")
    numbers = json.loads(await aredis.hget(stats, "last_numbers"))
    assert set(numbers["forecast"]) == set(FORECAST_TERMS)
    for name in ("target", "keep", "spare"):
        assert counter(replica, "provisioner_last_decision", quantity=name) == numbers[name]
    for name, value in numbers["forecast"].items():
        assert counter(replica, "provisioner_last_decision", quantity=name) == value, name
    assert counter(replica, "provisioner_last_decision", quantity="lead_time_s") == 60  # prior
    # A decision with no terms (the heuristic policy, a release before them, a hand edit):
    # their series go, not left at the last value; a number that is not one is left out.
    await aredis.hset(stats, "last_numbers", json.dumps({"target": 2, "keep": "x", "spare": 1}))
    await replica.refresh_gauges(clock.now_ms())
    exported = {s.labels["quantity"]: s.value for m in replica.metrics.registry.collect()
                if m.name == "provisioner_last_decision" for s in m.samples}
    assert exported == {"target": 2, "spare": 1}
    await aredis.hset(stats, "last_numbers", "{broken")
    await replica.refresh_gauges(clock.now_ms())
    assert not [s for m in replica.metrics.registry.collect()
                if m.name == "provisioner_last_decision" for s in m.samples]


async def test_the_last_decision_gauge_survives_a_hand_edited_integer_too_large_for_a_float(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    # JSON's integers have no bound and Python reads them whole: 10**400 is finite to
    # loads_finite, but no float; the gauge must leave it out, not stop the tick or the start.
    replica = make_replica(aredis, api, clock, "r1", PoolConfig(min_ready=1))
    stats = replica.keys.key("stats")
    huge = "1" + "0" * 400
    await aredis.hset(stats, "last_numbers",
                      f'{{"target": {huge}, "spare": 1, "forecast": {{"z": {huge}}}}}')
    await replica.refresh_gauges(clock.now_ms())
    exported = {s.labels["quantity"]: s.value for m in replica.metrics.registry.collect()
                if m.name == "provisioner_last_decision" for s in m.samples}
    assert exported == {"spare": 1}


async def test_the_longest_wait_is_exported_for_prometheus(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    replica = make_replica(aredis, api, clock, "r1", PoolConfig(min_ready=1))
    await send([replica], "user:connect", {"user_id": "u1"})  # no node: waits
    clock.advance(400_000)
    await replica.refresh_gauges(clock.now_ms())
    assert counter(replica, "provisioner_longest_wait_seconds") == 400
    await send([replica], "user:disconnect", {"user_id": "u1"})
    await replica.refresh_gauges(clock.now_ms())
    assert counter(replica, "provisioner_longest_wait_seconds") == 0


async def test_two_replicas_applying_every_event_allocate_once(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    replicas = [make_replica(aredis, api, clock, name) for name in ("r1", "r2")]
    async with Subscriber(aredis, "user:allocated", "user:waiting") as sub:
        await send(replicas, "user:connect", {"user_id": "u1"})
        await send(replicas, "node:status", {"node_id": "n1", "status": "booting"})
        clock.advance(5000)
        await send(replicas, "node:status", {"node_id": "n1", "status": "ready"})
        await send(replicas, "node:status", {"node_id": "n1", "status": "ready"})
        messages = await sub.drain()
    assert messages == [
        ("user:waiting", {"user_id": "u1"}),
        ("user:allocated", {"user_id": "u1", "node_id": "n1", "waited_ms": 5000}),
    ]
    assert sum(counter(r, "provisioner_misses_total") for r in replicas) == 1
    assert sum(counter(r, "provisioner_connects_total") for r in replicas) == 1
    # Both tick in the same interval: only one decides and creates.
    for r in replicas:
        await r.tick()
    for r in replicas:
        await r.settle()
    assert sum(counter(r, "provisioner_scale_decisions_total") for r in replicas) == 1
    assert len(api.created) == 1
    # What ProvisionerNoReplicaTicking reads: the winner's age of its decision, the loser's
    # of the decision it found in its slot, and each one's interval.
    ages = [counter(r, "provisioner_scale_decision_age_seconds") for r in replicas]
    assert all(0 <= age < 5 for age in ages), ages
    assert [counter(r, "provisioner_tick_interval_seconds") for r in replicas] == [
        r.pool.tick_interval_s for r in replicas]


async def test_a_replica_that_finds_its_slot_decided_exports_the_age_of_that_decision(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """With a tick interval of 5 minutes the replica whose ticks come first in each slot wins
    them all, and the other exported +Inf, as if it had never seen a decision: when the
    winner went (a crash, a restart, the last of a release in a rolling upgrade), the least
    age read +Inf and ProvisionerNoReplicaTicking fired a minute later, where the other would
    decide within the interval and the rule allows a minute and two. A tick that finds its
    slot decided by another is a decision seen; one not yet ticked is +Inf."""
    config = dataclasses.replace(FLOOR_ONLY, tick_interval_s=300)
    winner, loser = (make_replica(aredis, api, clock, name, config) for name in ("r1", "r2"))
    assert counter(loser, "provisioner_scale_decision_age_seconds") == math.inf
    for _ in range(3):
        await winner.tick()
        await loser.tick()
        clock.advance(300_000)
    assert counter(winner, "provisioner_scale_decisions_total") == 3
    assert counter(loser, "provisioner_scale_decisions_total") == 0
    assert 0 <= counter(loser, "provisioner_scale_decision_age_seconds") < 5


async def test_a_tick_refused_on_a_lost_state_is_no_decision_seen(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """A tick refused because the pool's state is not the one the replica ran on decides
    nothing, nor did any other: the age ProvisionerNoReplicaTicking reads stays as it was."""
    replica = make_replica(aredis, api, clock, "r1")
    await replica.heartbeat()
    await aredis.flushall()
    await replica.tick()
    assert counter(replica, "provisioner_scale_decisions_total") == 0
    assert counter(replica, "provisioner_scale_decision_age_seconds") == math.inf


async def _tick_side_by_side(*replicas: Replica, turns: int) -> None:
    """`turns` ticks of each replica in turn, each settled, then a second on every clock."""
    for _ in range(turns):
        for replica in replicas:
            await replica.tick()
        for replica in replicas:
            await replica.settle()
        for replica in replicas:
            replica.clock.advance(1000)  # type: ignore[attr-defined]


async def test_a_tick_that_finds_its_slot_held_by_a_clock_ahead_is_no_decision_seen(
    aredis: aioredis.Redis, api: FakeNodeApi,
) -> None:
    """The slot a replica minutes ahead holds is no decision of this replica's interval: if
    that replica goes, its slots stay held and none decides, so the age ProvisionerNoReplica-
    Ticking reads stays as it was (the one ahead exports its own)."""
    ahead = make_replica(aredis, api, ManualClock(T0 + 90_000), "r-ahead")
    behind = make_replica(aredis, api, ManualClock(T0), "r-behind")
    await _tick_side_by_side(ahead, behind, turns=3)
    assert counter(ahead, "provisioner_scale_decisions_total") == 3
    assert 0 <= counter(ahead, "provisioner_scale_decision_age_seconds") < 5
    assert counter(behind, "provisioner_scale_decisions_total") == 0
    assert counter(behind, "provisioner_scale_decision_age_seconds") == math.inf


async def test_failed_create_cancels_and_uncertain_create_keeps_its_reservation(
    replica: Replica, api: FakeNodeApi, clock: ManualClock, aredis: aioredis.Redis,
) -> None:
    api.create_outcomes.append(CreateResult(CreateOutcome.FAILED, detail="HTTP 500"))
    await replica.tick()
    await replica.settle()
    assert await aredis.zcard(replica.keys.key("pending")) == 0
    scaling = (await replica.scripts.snapshot(clock.now_ms(), 120_000)).scaling()
    assert (scaling.creates, scaling.failed) == (1, 1)
    assert "spare used; 1 failed at the Node API), 0 terminations" in scaling.describe()
    api.create_outcomes.append(CreateResult(CreateOutcome.UNCERTAIN, detail="timeout"))
    clock.advance(1000)
    await replica.tick()
    await replica.settle()
    assert await aredis.zcard(replica.keys.key("pending")) == 1
    # The node did exist: its status arrives and it is adopted; nothing more is created.
    await send([replica], "node:status", {"node_id": "lost-1", "status": "booting"})
    clock.advance(1000)
    await replica.tick()
    await replica.settle()
    assert api.created == []
    snap = await replica.scripts.snapshot(clock.now_ms(), 120_000)
    assert snap.counts["booting"] == 1 and snap.counts["unclaimed"] == 1


async def test_creates_are_held_a_while_after_the_node_api_says_it_is_full(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 429 is an answer, and held nothing: a Node API at its capacity got a create every
    tick (1,355 in 8.5 minutes in a review's drill)."""
    replica = make_replica(aredis, api, clock, "r1", dataclasses.replace(FLOOR_ONLY, min_ready=2))
    full = CreateResult(CreateOutcome.FAILED, detail="HTTP 429: 'at most 40 nodes'",
                        at_capacity=True)
    calls = 0

    async def create() -> CreateResult:
        nonlocal calls
        calls += 1
        return full

    api.create = create  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING):
        await replica.tick()
        await replica.settle()
    assert calls == 2
    assert "the Node API is at its capacity (HTTP 429" in caplog.text
    for _ in range(9):  # held for 10 s
        clock.advance(1000)
        await replica.tick()
        await replica.settle()
    assert calls == 2
    reason = await aredis.hget(replica.keys.key("stats"), "last_decision")
    assert "(creates held while the Node API fails, is full or refuses)" in reason
    clock.advance(1000)
    await replica.tick()
    await replica.settle()
    assert calls == 4  # the hold is over: the shortfall asked for again


@pytest.mark.parametrize("answer", ["HTTP 404: 'Not Found'", "an id the pool cannot take"])
async def test_a_node_api_that_refuses_creates_is_asked_less_and_less(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture, answer: str,
) -> None:
    """A 404 (a wrong path), a 401 or a 308 is an answer, and held nothing: a review's API
    answering 404 was asked max_batch times a tick, 1,200 creates and warnings a minute, and
    one naming its nodes with a '/' made and deleted 1,200 nodes a minute. A refusal now
    holds creates 5 s, doubling to 30 s, then one at a time until one is taken. The hold
    doubles per try, not per create: a tick's 20 refused together held creates 30 s at once
    (the probes at 30, 60 and 90 s), where a Node API mended within seconds waited it out."""
    replica = make_replica(aredis, api, clock, "r1",
                           dataclasses.replace(FLOOR_ONLY, min_ready=20, max_nodes=50))
    made: list[str] = []
    taken = False

    async def create() -> CreateResult:
        made.append(f"node-{len(made) + 1}")
        if taken:
            return CreateResult(CreateOutcome.CREATED, made[-1])
        if answer.startswith("HTTP"):
            return CreateResult(CreateOutcome.FAILED, detail=answer, refused=True)
        return CreateResult(CreateOutcome.CREATED, f"zone-a/{made[-1]}")

    api.create = create  # type: ignore[method-assign]
    asked_at: list[int] = []
    with caplog.at_level(logging.WARNING):
        for second in range(120):
            before = len(made)
            await replica.tick()
            await replica.settle()
            asked_at += [second] * (len(made) - before)
            clock.advance(1000)
    # the first tick's batch, one try, then a probe each 5, 10, 20 and 30 s
    assert asked_at == [0] * 20 + [5, 15, 35, 65, 95], asked_at
    assert "the Node API refuses creates" in caplog.text
    assert caplog.text.count("the Node API refuses creates") <= 4
    reason = await aredis.hget(replica.keys.key("stats"), "last_decision")
    assert "(creates held while the Node API fails, is full or refuses)" in reason
    assert counter(replica, "provisioner_creates_held") == 1
    if not answer.startswith("HTTP"):
        assert len(api.deleted) == 25  # each node named so was deleted at once
    # The API takes them again: the probe is taken, and the next tick asks for the rest.
    taken = True
    clock.advance(30_000)
    await replica.tick()
    await replica.settle()
    assert len(made) == 26
    clock.advance(1000)
    await replica.tick()
    await replica.settle()
    assert len(made) == 26 + 19
    assert "the Node API takes creates again, after 25 refused in a row" in caplog.text


async def test_a_refusal_escalates_its_hold_from_5_s_and_a_taken_create_ends_it(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """One refusal at a time: held 5 s, then 10, 20 and 30 at most."""
    replica = make_replica(aredis, api, clock, "r1", dataclasses.replace(FLOOR_ONLY, min_ready=1))
    asked: list[int] = []

    async def create() -> CreateResult:
        asked.append(clock.now_ms())
        return CreateResult(CreateOutcome.FAILED, detail="HTTP 401: 'no token'", refused=True)

    api.create = create  # type: ignore[method-assign]
    start = clock.now_ms()
    for _ in range(100):
        await replica.tick()
        await replica.settle()
        clock.advance(1000)
    assert [(t - start) // 1000 for t in asked] == [0, 5, 15, 35, 65, 95]


@pytest.mark.parametrize(("answered_after_ms", "asked"), [(5_000, True), (60_000, True),
                                                       (60_001, False)])
async def test_a_create_call_s_latency_is_in_the_boot_time_its_node_teaches(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    answered_after_ms: int, asked: bool,
) -> None:
    """A POST answered 5 s after it was sent: its node's boot is timed from the sending, the
    lead time the forecast needs. One answered after its reservation's 60 s (retries through
    an outage, a stalled process) is no boot's lead time, and is timed from its answer."""
    replica = make_replica(aredis, api, clock, "r1", dataclasses.replace(FLOOR_ONLY, min_ready=1))
    sent = clock.now_ms()
    answer = api.create

    async def slow() -> CreateResult:
        clock.advance(answered_after_ms)
        return await answer()

    api.create = slow  # type: ignore[method-assign]
    await replica.tick()
    await replica.settle()
    [node] = api.created
    record = await aredis.hgetall(replica.keys.node(node))
    assert int(record["created_ms"]) == sent + answered_after_ms
    assert record.get("asked_ms") == (str(sent) if asked else None)


async def _tick_with_register_node_raising(replica: Replica, exc: Exception) -> None:
    """A tick whose create the Node API makes, and whose record of it raises `exc`."""
    async def failing(*_: Any) -> Any:
        raise exc

    replica.scripts.register_node = failing  # type: ignore[method-assign]
    await replica.tick()
    await replica.settle()


async def test_a_create_whose_record_the_server_drops_is_a_warning_and_adopted_later(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The Node API made the node, and the server dropped before register_node: a traceback
    before (a chaos review's drill). Now a warning that says what recovers it; the node is
    adopted on its node:status."""
    replica = make_replica(aredis, api, clock, "r1", dataclasses.replace(FLOOR_ONLY, min_ready=1))
    with caplog.at_level(logging.WARNING):
        await _tick_with_register_node_raising(
            replica, RedisConnectionError("Connection closed by server."))
    assert api.created == ["node-1"]
    assert counter(replica, "provisioner_errors_total", where="action") == 1
    [said] = [r for r in caplog.records if "could not be recorded" in r.getMessage()]
    assert not said.exc_info and "Connection closed by server." in said.getMessage()
    assert not any(r.exc_info for r in caplog.records)
    await replica.handle_many([wire("node:status", {"node_id": "node-1", "status": "booting"})])
    assert (await aredis.hget(replica.keys.node("node-1"), "state")) == "booting"

    # A script's own error is a bug, not an outage: it keeps its traceback.
    async def broken(*_: Any) -> Any:
        raise ResponseError("user_script:40: Script attempted to access nonexistent global")

    wider = make_replica(aredis, api, clock, "r2", dataclasses.replace(FLOOR_ONLY, min_ready=2))
    wider.scripts.register_node = broken  # type: ignore[method-assign]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        clock.advance(1000)
        await wider.tick()
        await wider.settle()
    assert api.created == ["node-1", "node-2"]
    assert [r.getMessage() for r in caplog.records if r.exc_info] == ["node action failed"]


@pytest.mark.parametrize(("retry_after", "held_s"), [(30.0, 30), (0.0, 2)])
async def test_a_429s_retry_after_sets_how_long_creates_are_held(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture, retry_after: float, held_s: int,
) -> None:
    """The API says when to come back: 30 s is waited for (the fixed 10 s asked again 20 s
    early), and 0 holds past the next tick, not to it (a create every tick again: a review
    found a hold of one interval ending on the very next tick)."""
    replica = make_replica(aredis, api, clock, "r1", dataclasses.replace(FLOOR_ONLY, min_ready=1))
    calls = 0

    async def create() -> CreateResult:
        nonlocal calls
        calls += 1
        return CreateResult(CreateOutcome.FAILED, detail="HTTP 429: 'full'", at_capacity=True,
                            retry_after_s=retry_after)

    api.create = create  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING):
        await replica.tick()
        await replica.settle()
    assert calls == 1
    assert f"creates held for {held_s}s, as its Retry-After asks" in caplog.text
    for _ in range(held_s - 1):
        clock.advance(1000)
        await replica.tick()
        await replica.settle()
    assert calls == 1
    clock.advance(1000)
    await replica.tick()
    await replica.settle()
    assert calls == 2


async def test_a_429s_retry_after_from_the_mock_node_api_sets_how_long_creates_are_held(
    aredis: aioredis.Redis, clock: ManualClock, caplog: pytest.LogCaptureFixture,
) -> None:
    """The twin of the test above with the real mock over HTTP and the real client, not a
    CreateResult made by hand: the mock's header is read and held to. The clock is the
    test's, so the 5 s are not waited."""
    from aiohttp.test_utils import TestServer

    from provisioner.mock_node_api import BootDelay, MockNodeApi
    from provisioner.nodeapi import HttpNodeApi

    mock = MockNodeApi(aredis, BootDelay.parse("100"), max_nodes=1, retry_after_s=5, seed=1)
    metrics = Metrics()
    try:
        async with TestServer(mock.app(), host="127.0.0.1") as server:
            api = HttpNodeApi(str(server.make_url("")), attempts=1, metrics=metrics)
            try:
                assert (await api.create()).outcome is CreateOutcome.CREATED  # the mock's one
                replica = make_replica(aredis, api, clock, "r1",
                                       dataclasses.replace(FLOOR_ONLY, min_ready=1))

                def refused() -> float:
                    return metrics.registry.get_sample_value(
                        "provisioner_node_api_calls_total",
                        {"op": "create", "outcome": "http_429"}) or 0.0

                with caplog.at_level(logging.WARNING):
                    await replica.tick()
                    await replica.settle()
                assert refused() == 1
                assert "creates held for 5s, as its Retry-After asks" in caplog.text
                assert replica._capacity_held_until_ms == clock.now_ms() + 5_000
                for _ in range(4):
                    clock.advance(1000)
                    await replica.tick()
                    await replica.settle()
                assert refused() == 1
                clock.advance(1000)
                await replica.tick()
                await replica.settle()
                assert refused() == 2  # the hold is over; the mock is still full
            finally:
                await api.aclose()
    finally:
        await mock.close()


async def test_creates_are_held_while_the_node_api_is_down_and_probed_one_at_a_time(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A dead API took max_batch creates a tick, three attempts each, and as many warnings.
    replica = make_replica(aredis, api, clock, "r1", dataclasses.replace(FLOOR_ONLY, min_ready=5))
    down = CreateResult(CreateOutcome.FAILED, detail="could not connect", api_down=True)
    calls = 0

    async def create() -> CreateResult:
        nonlocal calls
        calls += 1
        return api.create_outcomes.popleft() if api.create_outcomes else down

    api.create = create  # type: ignore[method-assign]

    async def tick(advance_ms: int = 1_000) -> Any:
        clock.advance(advance_ms)
        await replica.tick()
        await replica.settle()
        return json.loads(await aredis.hget(replica.keys.key("stats"), "last_numbers") or "{}")

    with caplog.at_level(logging.WARNING):
        await tick(0)
    assert calls == 5  # the floor: five creates, all unanswered
    assert "creates held for 1s" in caplog.text  # one try: the tick's creates failed together
    assert counter(replica, "provisioner_creates_held") == 1
    reason = await aredis.hget(replica.keys.key("stats"), "last_decision")
    # Then a probe each time the hold is over, unanswered, and the hold doubled: 1 s after
    # the first try, 2, 4, 8, 16, then 30 s at most. Before, the five creates of the first
    # tick were five failures in a row, and held creates for 16 s at once (a tick of 20: 30 s).
    probed_at = []
    for second in range(1, 93):
        before = calls
        await tick()
        if calls > before:
            probed_at.append(second)
            assert calls == before + 1
        elif second == 2:
            reason = await aredis.hget(replica.keys.key("stats"), "last_decision")
            assert "create 0 of 5 (creates held while the Node API fails, is full or " \
                "refuses)" in reason
    assert probed_at == [1, 3, 7, 15, 31, 61, 91]
    api.create_outcomes.append(CreateResult(CreateOutcome.CREATED, "node-1"))
    await tick(30_000)  # the probe is answered: creates are made again, as many as wanted
    assert calls == 13 and counter(replica, "provisioner_creates_held") == 0
    api.create_outcomes.extend(CreateResult(CreateOutcome.CREATED, f"node-{n}")
                               for n in range(2, 6))
    await tick()
    assert calls == 17


async def test_a_probe_still_in_flight_holds_the_next_ticks_creates(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    # An operator's drill (a Node API whose creates outlast --api-timeout): once the hold
    # was over, every tick while the probe waited for its answer sent one more, 4 in 4 s.
    replica = make_replica(aredis, api, clock, "r1", dataclasses.replace(FLOOR_ONLY, min_ready=5))
    down = CreateResult(CreateOutcome.UNCERTAIN, detail="Deadline", api_down=True)
    answer = asyncio.Event()
    calls = 0
    hang = False

    async def create() -> CreateResult:
        nonlocal calls
        calls += 1
        if hang:
            await answer.wait()
        return down

    api.create = create  # type: ignore[method-assign]
    await replica.tick()
    await replica.settle()
    assert calls == 5  # the floor, all unanswered: held for 16 s
    hang = True
    for _ in range(80):  # past the hold and the deadlines: one probe goes out, and waits
        clock.advance(1_000)
        await replica.tick()
        for _ in range(5):
            await asyncio.sleep(0)
    assert calls == 6
    answer.set()
    await replica.settle()


async def test_any_answer_of_the_node_api_ends_the_hold(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    # A replica that won no tick since the API came back showed its creates held for minutes.
    replica = make_replica(aredis, api, clock, "r1", dataclasses.replace(FLOOR_ONLY, min_ready=3))
    api.create_outcomes.extend([CreateResult(CreateOutcome.FAILED, detail="down",
                                             api_down=True)] * 3)
    await replica.tick()
    await replica.settle()
    assert counter(replica, "provisioner_creates_held") == 1
    api.listed = []  # its reconciliation is answered
    assert await replica.reconcile() is not None
    assert counter(replica, "provisioner_creates_held") == 0
    clock.advance(1_000)
    await replica.tick()
    await replica.settle()
    assert len(api.created) == 3  # all that the tick wants, not a probe


async def test_an_api_that_answers_no_is_not_down(
    replica: Replica, api: FakeNodeApi, clock: ManualClock,
) -> None:
    # A 4xx (a 429 at the API's capacity) is an answer: the next tick creates again.
    for _ in range(3):
        api.create_outcomes.append(CreateResult(CreateOutcome.FAILED, detail="HTTP 429"))
        await replica.tick()
        await replica.settle()
        clock.advance(1_000)
    assert not api.create_outcomes and counter(replica, "provisioner_creates_held") == 0


async def test_max_nodes_keeping_the_pool_below_its_target_is_said(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A floor above the quota is refused (below); a forecast above it is not: five engaged
    # users who each connect, for the first release's heuristic, against a quota of 3.
    replica = make_replica(aredis, api, clock, "r1", dataclasses.replace(
        FLOOR_ONLY, conversion=1, engaged_threshold=1, max_nodes=3))
    for user in range(5):
        await send([replica], "user:activity",
                   {"user_id": f"u{user}", "timestamp": clock.now_ms() // 1000})
    with caplog.at_level(logging.WARNING):
        await replica.tick()
    await replica.settle()
    assert len(api.created) == 3
    assert "max_nodes (3) keeps the pool 2 node(s) below its target" in caplog.text


def test_a_replica_made_by_code_is_held_to_the_pool_settings_ranges(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """As the CLI's is: a pool setting out of its range, or a floor above the quota, is refused
    when the replica is made, not left to the scripts (a NaN would reach them as "nan")."""
    for pool in (dataclasses.replace(FLOOR_ONLY, min_ready=5, max_nodes=3),
                 dataclasses.replace(FLOOR_ONLY, idle_timeout_s=math.nan),
                 dataclasses.replace(FLOOR_ONLY, buffer_sd=-1)):
        with pytest.raises(ConfigError, match="invalid pool settings"):
            make_replica(aredis, api, clock, "r1", pool)


async def _two_nodes_idle_past_their_timeout(
        aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock) -> Replica:
    """A replica of a pool of no floor, n1 and n2 ready and idle past its 60 s timeout."""
    replica = make_replica(aredis, api, clock, "r1",
                           PoolConfig(min_ready=0, idle_timeout_s=60,
                                      scaling_policy="heuristic"))
    for node in ("n1", "n2"):
        await send([replica], "node:status", {"node_id": node, "status": "ready"})
    clock.advance(61_000)
    return replica


async def test_idle_nodes_are_deleted_and_a_404_ends_them(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    replica = await _two_nodes_idle_past_their_timeout(aredis, api, clock)
    api.delete_outcome = DeleteOutcome.GONE
    await replica.tick()
    await replica.settle()
    assert sorted(api.deleted) == ["n1", "n2"]
    snap = await replica.scripts.snapshot(clock.now_ms(), 120_000)
    assert snap.counts["nodes"] == 0 and snap.counts["terminating"] == 0


async def test_reconcile_adopts_unknown_nodes_and_ends_vanished_ones(
    replica: Replica, api: FakeNodeApi, clock: ManualClock, aredis: aioredis.Redis,
) -> None:
    await send([replica], "node:status", {"node_id": "vanished", "status": "ready"})
    await send([replica], "node:status", {"node_id": "fresh", "status": "booting"})
    clock.advance(120_000)
    await send([replica], "node:status", {"node_id": "just-made", "status": "booting"})
    api.listed = [ListedNode("fresh", "booting"), ListedNode("stranger", "ready"),
                  ListedNode("dying", "terminating")]
    counts = await replica.reconcile()
    # "just-made" is younger than the grace period: not judged although the API omits it.
    assert counts == {"adopted": 1, "vanished": 1, "redeleted": 0, "made_ready": 0,
                      "unusable_deleted": 0, "not_listed_left_young": 1}
    nodes = set(await aredis.zrange(replica.keys.key("nodes"), 0, -1))
    assert nodes == {"fresh", "stranger", "just-made"}
    assert await check_invariants(aredis, POOL) == []


async def test_a_boot_reconciliation_adopts_teaches_no_boot_time_when_its_ready_comes(
    replica: Replica, api: FakeNodeApi, clock: ManualClock, aredis: aioredis.Redis,
) -> None:
    """Found by a review: reconciliation adopted a booting node it found in the Node API's
    list (its create's answer and `booting` lost) with origin `status`, as if its `booting` had
    been received, where apply_node_status records it `listed` only when told so; stamped when
    listed, perhaps a reconcile interval after its create, its `ready` taught a boot that short."""
    # n2 is a boot-time sample (by its id's hash): a ready received would teach its boot time.
    api.listed = [ListedNode("n2", "booting")]
    counts = await replica.reconcile()
    assert counts is not None and counts["adopted"] == 1
    assert await aredis.hmget(replica.keys.node("n2"), "origin", "boot_sample") == ["listed", "1"]
    clock.advance(5_000)
    await send([replica], "node:status", {"node_id": "n2", "status": "ready"})
    assert await aredis.hget(replica.keys.node("n2"), "state") == "ready"
    assert await aredis.hmget(replica.keys.key("model"), "boot_ms", "boot_n") == [None, None]


async def test_reconcile_ends_a_vanished_node_stamped_by_a_clock_ahead(
    api: FakeNodeApi, clock: ManualClock, aredis: aioredis.Redis,
) -> None:
    """A replica whose clock ran 600 s ahead stamped the nodes it saw; read as created in the
    future, they stayed "younger than the grace" after they vanished, for the whole offset."""
    ahead = make_replica(aredis, api, ManualClock(clock.now_ms() + 600_000), "r-ahead")
    await send([ahead], "node:status", {"node_id": "gone", "status": "ready"})
    replica = make_replica(aredis, api, clock, "r1")
    api.listed = []
    counts = await replica.reconcile()
    assert counts is not None and counts["vanished"] == 1
    assert await aredis.hget(replica.keys.node("gone"), "state") == "terminated"


async def test_reconcile_ends_a_node_the_api_lists_as_ending_before_anyone_is_handed_it(
    replica: Replica, api: FakeNodeApi, clock: ManualClock, aredis: aioredis.Redis,
) -> None:
    # Its `terminated` was lost; the API keeps listing it, as terminated or still terminating.
    # Judged at once: the API's word, not its silence, needs no grace period.
    await send([replica], "node:status", {"node_id": "dead", "status": "ready"})
    await send([replica], "node:status", {"node_id": "dying", "status": "ready"})
    api.listed = [ListedNode("dead", "terminated"), ListedNode("dying", "terminating")]
    counts = await replica.reconcile()
    assert counts is not None and counts["vanished"] == 2
    await send([replica], "user:connect", {"user_id": "victim"})
    assert await aredis.hgetall(replica.keys.key("alloc")) == {}
    assert await check_invariants(aredis, POOL) == []


async def test_reconcile_leaves_a_node_the_pool_is_deleting_to_its_own_end(
    api: FakeNodeApi, clock: ManualClock, aredis: aioredis.Redis,
) -> None:
    replica = make_replica(aredis, api, clock, "r1", dataclasses.replace(FLOOR_ONLY, min_ready=0))
    await send([replica], "node:status", {"node_id": "n1", "status": "ready"})
    clock.advance(3_600_000)  # idle past every timeout: the reaper deletes it
    await replica.tick()
    await replica.drain(5.0)
    assert api.deleted == ["n1"]
    api.listed = [ListedNode("n1", "terminating")]  # its DELETE arriving
    counts = await replica.reconcile()
    assert counts is not None and not any(counts.values())
    assert await aredis.hget(replica.keys.node("n1"), "state") == "terminating"


async def test_reconcile_makes_ready_a_node_whose_ready_was_lost_and_learns_no_boot_from_it(
    replica: Replica, api: FakeNodeApi, clock: ManualClock, aredis: aioredis.Redis,
) -> None:
    await send([replica], "node:status", {"node_id": "n2", "status": "booting"})
    # A boot-time sample (by its id's hash): its ready would teach the boot time.
    assert await aredis.hget(replica.keys.node("n2"), "boot_sample") == "1"
    await send([replica], "user:connect", {"user_id": "u1"})  # a miss: u1 waits beside n2
    clock.advance(120_000)  # n2's `ready` is lost; the API lists it ready
    api.listed = [ListedNode("n2", "ready")]
    model_before = await aredis.hgetall(replica.keys.key("model"))
    counts = await replica.reconcile()
    assert counts is not None and counts["made_ready"] == 1
    assert await aredis.hgetall(replica.keys.key("alloc")) == {"u1": "n2"}
    # Counted as a served wait, as a listener's `ready` would be (a review: it was not)
    assert counter(replica, "provisioner_allocations_total", kind="after_wait") == 1
    assert counter(replica, "provisioner_wait_seconds_sum") == 120
    # When n2 became ready is not known: 120 s would be a boot time it never took.
    model = await aredis.hgetall(replica.keys.key("model"))
    assert model.get("boot_ms") == model_before.get("boot_ms") and "boot_n" not in model
    # Its late `ready` changes nothing, and a second reconciliation finds nothing to do.
    await send([replica], "node:status", {"node_id": "n2", "status": "ready"})
    counts = await replica.reconcile()
    assert counts is not None and not any(counts.values())
    assert await check_invariants(aredis, POOL) == []


async def test_the_gauges_are_read_when_the_decision_fails(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """The gauges were read at the end of a tick that decided: while the server refused
    writes (out of memory), scale_decide raised and every replica's gauges froze, though the
    snapshot's reads still worked (a review). The tick's own error is still raised."""
    replica = make_replica(aredis, api, clock, "r1")
    replica.gauges = True
    await send([replica], "user:connect", {"user_id": "u1"})

    async def refused(*_: object) -> None:
        raise ResponseError("OOM command not allowed when used memory > 'maxmemory'.")

    replica.scripts.scale_decide = refused  # type: ignore[method-assign]
    with pytest.raises(ResponseError, match="OOM"):
        await replica.tick()
    assert counter(replica, "provisioner_users", state="waiting") == 1


async def test_reconcile_deletes_a_node_whose_id_the_pool_cannot_take(
    replica: Replica, api: FakeNodeApi, aredis: aioredis.Redis,
) -> None:
    api.listed = [ListedNode("node 1/x", "booting"), ListedNode("gone one", "terminated"),
                  ListedNode("n1", "booting")]
    counts = await replica.reconcile()
    await replica.drain(5.0)
    assert counts is not None and counts["unusable_deleted"] == 1 and counts["adopted"] == 1
    assert api.deleted == ["node 1/x"]
    assert counter(replica, "provisioner_errors_total", where="unusable_id") == 1


@pytest.mark.parametrize("score", [math.inf, -math.inf])
async def test_a_node_score_edited_to_infinity_does_not_stop_reconciliation(
    replica: Replica, api: FakeNodeApi, aredis: aioredis.Redis, score: float,
) -> None:
    """A review: int(inf) raised, and every reconciliation ended in an OverflowError (after a
    loss of the state, every tick waited on it)."""
    await send([replica], "node:status", {"node_id": "n1", "status": "booting"})
    await send([replica], "node:status", {"node_id": "n2", "status": "booting"})
    await aredis.zadd(replica.keys.key("nodes"), {"n2": score})  # a hand edit
    api.listed = [ListedNode("n1", "ready")]
    counts = await replica.reconcile()
    assert counts is not None and counts["made_ready"] == 1
    # n2, not listed and stamped at no time near now, is taken for gone
    assert counts["vanished"] == 1


async def test_no_list_from_the_api_is_no_reconciliation(
    replica: Replica, api: FakeNodeApi, aredis: aioredis.Redis,
) -> None:
    await send([replica], "node:status", {"node_id": "n1", "status": "ready"})
    api.listed = None
    assert await replica.reconcile() is None
    assert await aredis.zrange(replica.keys.key("nodes"), 0, -1) == ["n1"]


async def one_reservation(replica: Replica) -> str:
    """The one create a decision of `replica` reserves now, its call not begun."""
    [reservation] = (await replica.scripts.scale_decide(
        replica.pool.policy_args(replica.clock.now_ms(), replica.replica_id))).reservations
    return reservation


async def forget_node(replica: Replica, node: str) -> None:
    """Take `node` out of the pool by hand, so that it wants one again."""
    await replica.redis.delete(replica.keys.key("nodes"), replica.keys.key("booting"),
                               replica.keys.node(node))


async def test_a_create_whose_reservation_lapsed_before_its_post_is_not_sent(
    aredis: aioredis.Redis, clock: ManualClock, caplog: pytest.LogCaptureFixture,
) -> None:
    """A review: replica A reserved the pool's one create and stalled before its POST (a GC
    pause, a frozen VM) past --create-timeout; B's tick let the reservation lapse and made the
    node in its place; A then sent its POST, and the pool held two nodes at max_nodes 1."""
    pool = dataclasses.replace(FLOOR_ONLY, min_ready=1, max_nodes=1)
    api_a, api_b = FakeNodeApi(), FakeNodeApi()
    api_b.created = ["x"]  # B's node is named node-2, apart from what A's would be
    a = make_replica(aredis, api_a, clock, "ra", pool)
    b = make_replica(aredis, api_b, clock, "rb", pool)
    reservation = await one_reservation(a)  # A's decision; its call has not begun
    with caplog.at_level(logging.WARNING):
        clock.advance(int(pool.create_timeout_s * 1000) + 2000)  # A stalls
        await b.tick()  # the reservation lapsed: B creates in its place
        await b.settle()
        await a._create(reservation)  # A's call, after the stall
    assert api_a.created == [] and api_b.created == ["x", "node-2"]
    assert await aredis.zrange(a.keys.key("nodes"), 0, -1) == ["node-2"]
    assert "not sent: its reservation lapsed" in caplog.text


@pytest.mark.parametrize("create_timeout_s", [60.0, 30.0, 1.0])
async def test_a_create_with_any_time_left_is_sent_where_the_call_takes_none(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock, create_timeout_s: float,
) -> None:
    """The first version of the check measured every Node API by an HTTP call's longest
    (30.6 s by default): every create of a replay at create_timeout_s 30, whose Node API is
    no HTTP one, was withdrawn (a second review). One whose call takes no time is sent while
    its reservation is pending."""
    pool = dataclasses.replace(FLOOR_ONLY, min_ready=1, create_timeout_s=create_timeout_s)
    replica = make_replica(aredis, api, clock, "r1", pool)
    reservation = await one_reservation(replica)
    clock.advance(int(create_timeout_s * 1000) - 1)  # 1 ms left
    await replica._create(reservation)
    assert api.created == ["node-1"]
    stats = await aredis.hgetall(replica.keys.key("stats"))
    assert "creates_withdrawn" not in stats


async def test_a_create_with_less_left_than_its_call_may_take_is_not_sent(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """A third review: a replica held up 45 s of its 60 sent its POST with 15 s left; the call
    took 20, another tick made the node in the lapsed reservation's place, and the pool of
    max_nodes 1 held two. With less left than the call's longest (the client's tries and the
    pauses between), it is withdrawn; `run` asks a create timeout 5 s over that longest, so
    that only a stall does it."""
    api.longest_create_s = 30.6  # type: ignore[attr-defined]  # an HTTP client's, by default
    replica = make_replica(aredis, api, clock, "r1", dataclasses.replace(FLOOR_ONLY, min_ready=1))
    first = await one_reservation(replica)
    clock.advance(29_000)  # 31 s left: sent
    await replica._create(first)
    assert api.created == ["node-1"]
    await forget_node(replica, "node-1")
    clock.advance(1000)
    second = await one_reservation(replica)
    clock.advance(45_000)  # 15 s left
    await replica._create(second)
    assert api.created == ["node-1"]
    scaling = (await replica.scripts.snapshot(clock.now_ms(), FLOOR_ONLY.window_ms)).scaling()
    assert (scaling.withdrawn, scaling.failed) == (1, 0)


async def test_a_create_left_exactly_its_call_s_longest_is_not_sent(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """Sent, a reservation must outlive the call's longest: with exactly that left, the call's
    end may find it lapsed and another node made in its place. Withdrawn; a millisecond
    more is sent."""
    api.longest_create_s = 30.6  # type: ignore[attr-defined]
    replica = make_replica(aredis, api, clock, "r1", dataclasses.replace(FLOOR_ONLY, min_ready=1))
    exact = await one_reservation(replica)
    clock.advance(29_400)  # 30.6 s left of 60
    await replica._create(exact)
    assert api.created == []
    clock.advance(1000)
    more = await one_reservation(replica)
    clock.advance(29_399)  # 30.601 s left
    await replica._create(more)
    assert api.created == ["node-1"]


async def test_a_replica_built_with_a_create_timeout_under_its_call_s_longest_still_creates(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """`run` refuses such a timeout; a replica built in code (a test, an embedding) with one
    withdrew every create, each said to be a stall (a fourth review). Only a stall of over
    5 s withdraws one there."""
    api.longest_create_s = 30.6  # type: ignore[attr-defined]
    pool = dataclasses.replace(FLOOR_ONLY, min_ready=1, create_timeout_s=30)
    replica = make_replica(aredis, api, clock, "r1", pool)
    await replica._create(await one_reservation(replica))
    assert api.created == ["node-1"]
    await forget_node(replica, "node-1")
    clock.advance(1000)
    stalled = await one_reservation(replica)
    clock.advance(5_001)  # 24.999 s left of 30: a stall of over 5 s
    await replica._create(stalled)
    assert api.created == ["node-1"]


async def test_a_create_whose_reservation_cannot_be_read_is_sent(
    replica: Replica, api: FakeNodeApi, aredis: aioredis.Redis, clock: ManualClock,
) -> None:
    """A review: a timeout on the read of the deadline raised out of the create, which was
    never sent, its reservation held for a minute."""
    reservation = await one_reservation(replica)

    async def times_out(*_: object) -> None:
        raise RedisTimeoutError("Timeout reading from socket")

    replica.redis.zscore = times_out  # type: ignore[method-assign,assignment]
    try:
        await replica._create(reservation)
    finally:
        del replica.redis.zscore
    assert api.created == ["node-1"]
    assert await aredis.zrange(replica.keys.key("nodes"), 0, -1) == ["node-1"]


async def test_a_create_answered_with_an_id_the_pool_cannot_take_is_deleted_and_given_back(
    replica: Replica, api: FakeNodeApi, aredis: aioredis.Redis,
) -> None:
    api.create_outcomes.append(CreateResult(CreateOutcome.CREATED, "node 1/x"))
    await replica.tick()  # the floor: one create
    await replica.drain(5.0)
    assert api.deleted == ["node 1/x"]
    # given back: a tick creates again once the hold for the refusal is over
    assert await aredis.zcard(replica.keys.key("pending")) == 0
    assert counter(replica, "provisioner_errors_total", where="unusable_id") == 1
    # a node was made, and billed: not one the API failed to make (a review)
    stats = await aredis.hgetall(replica.keys.key("stats"))
    assert (stats.get("creates_unusable"), stats.get("creates_failed")) == ("1", None)


async def test_shutdown_lets_in_flight_creates_finish(
    replica: Replica, api: FakeNodeApi, aredis: aioredis.Redis,
) -> None:
    api.delay = 0.3
    await replica.tick()
    assert replica._actions
    await replica.drain(5.0)
    assert api.created == ["node-1"]
    assert await aredis.zcard(replica.keys.key("pending")) == 0


async def test_run_stops_within_the_grace_period(replica: Replica) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(replica.run())
    await asyncio.wait_for(replica.subscribed.wait(), 5)
    started = loop.time()
    replica.stopping.set()
    await asyncio.wait_for(task, 5)
    assert loop.time() - started < 3


async def test_a_replica_started_with_heartbeats_or_reconciliation_off_says_what_is_lost(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for heartbeat, reconcile, said in ((0.0, 30.0, ["--heartbeat-interval 0"]),
                                       (2.0, 0.0, ["--reconcile-interval 0"]),
                                       (2.0, 30.0, [])):
        service = ServiceConfig("redis://x", "http://api", pool=POOL, replica_id="r1",
                                heartbeat_interval_s=heartbeat, reconcile_interval_s=reconcile)
        replica = Replica(aredis, service, FLOOR_ONLY, api, clock=clock, metrics=Metrics())
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            task = asyncio.create_task(replica.run())
            await asyncio.wait_for(replica.subscribed.wait(), 5)
            replica.stopping.set()
            await asyncio.wait_for(task, 5)
        turned_off = [r.getMessage() for r in caplog.records if "turns off" in r.getMessage()]
        assert [m.split(" turns off")[0] for m in turned_off] == said, turned_off
        if heartbeat == 0:
            assert "a loss of the pool's state is not detected" in turned_off[0]


async def test_a_replica_stopped_cleanly_leaves_the_replica_list(
    replica: Replica, clock: ManualClock,
) -> None:
    # It was listed as silent for ten minutes, like a crashed one.
    task = asyncio.create_task(replica.run())
    await asyncio.wait_for(replica.subscribed.wait(), 5)
    await replica.heartbeat()
    other = make_replica(replica.redis, FakeNodeApi(), clock, "r2")
    await other.heartbeat()
    assert {r.replica_id for r in await replica.scripts.replicas()} == {"r1", "r2"}
    replica.stopping.set()
    await asyncio.wait_for(task, 5)
    assert [r.replica_id for r in await replica.scripts.replicas()] == ["r2"]
    assert await replica.redis.hkeys(replica.keys.key("replica_info")) == ["r2"]


async def test_replicas_restarted_with_heartbeats_off_leave_no_marks_behind(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """A review of the marks: `applied` keeps one entry per replica id, which goes "when it
    leaves or is forgotten" (README). A replica run with --heartbeat-interval 0 does neither:
    it never leaves (its stop sends no leaving heartbeat) and, never listed, is never
    forgotten. With the default replica id (host-pid), each restart of such a replica that
    applied a connect or disconnect left its entry for good: here three clean stops, three
    entries, and another replica's heartbeats, forgetting every silent one, leave them."""
    keys = PoolKeys(POOL)
    for restart in range(3):
        service = ServiceConfig("redis://x", "http://api", pool=POOL,
                                replica_id=f"host-{1000 + restart}", heartbeat_interval_s=0.0,
                                reconcile_interval_s=0.0)
        replica = Replica(aredis, service, FLOOR_ONLY, api, clock=clock, metrics=Metrics())
        task = asyncio.create_task(replica.run())
        await asyncio.wait_for(replica.subscribed.wait(), 5)
        await aredis.publish("user:connect", json.dumps({"user_id": f"u{restart}"}))
        for _ in range(1000):  # until the connect is applied
            if await aredis.hexists(keys.key("waiting_since"), f"u{restart}"):
                break
            await asyncio.sleep(0.01)
        else:  # none applied leaves no entry either: the test would pass having tested nothing
            raise AssertionError(f"the connect of u{restart} was never applied")
        replica.stopping.set()  # a clean stop
        await asyncio.wait_for(task, 10)
    other = make_replica(aredis, api, clock, "r-hb")
    await other.scripts.heartbeat("r-hb", {}, 1, "tok")  # forgets every replica silent 1 ms
    assert await aredis.hkeys(keys.key("applied")) == [], await aredis.hgetall(
        keys.key("applied"))


async def test_a_loop_stuck_in_a_slow_call_is_cancelled_after_the_grace(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    service = ServiceConfig("redis://x", "http://api", pool=POOL, replica_id="r1",
                            reconcile_interval_s=1, shutdown_grace_s=0.5)
    replica = Replica(aredis, service, FLOOR_ONLY, api, clock=clock, metrics=Metrics())
    listing = asyncio.Event()

    async def hangs() -> None:
        listing.set()
        await asyncio.sleep(60)  # a GET /api/nodes that takes the API timeout

    api.list_nodes = hangs  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(replica.run())
    await asyncio.wait_for(listing.wait(), 5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    replica.stopping.set()
    await asyncio.wait_for(task, 5)
    assert loop.time() - started < 3


async def test_a_stuck_loop_and_a_stuck_create_share_one_grace(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """The grace was waited for the loops, then again for the Node API calls: a review's
    replica took 11.7 s to stop with a reconciliation and two creates hung, past `docker
    stop`'s 10 s. The calls run while the loops are waited for, and get what is left."""
    service = ServiceConfig("redis://x", "http://api", pool=POOL, replica_id="r1",
                            reconcile_interval_s=1, shutdown_grace_s=2.0)
    replica = Replica(aredis, service, dataclasses.replace(FLOOR_ONLY, min_ready=2), api,
                      clock=clock, metrics=Metrics())
    listing, creating = asyncio.Event(), asyncio.Event()

    async def list_hangs() -> None:
        listing.set()
        await asyncio.sleep(60)  # a GET /api/nodes that takes the API timeout

    async def create_hangs() -> CreateResult:
        creating.set()
        await asyncio.sleep(60)
        raise AssertionError("never answered")

    api.list_nodes = list_hangs  # type: ignore[method-assign,assignment]
    api.create = create_hangs  # type: ignore[method-assign]
    # the first reconciliation hangs; the ticks wait for another replica's turn instead (on
    # a state begun long ago: on a young one a replica's first turn is its own)
    await aredis.set(replica.keys.reconcile_lock, "r2", px=500)
    await aredis.set(replica.keys.key("epoch"), "1-long-ago")
    task = asyncio.create_task(replica.run())
    await asyncio.wait_for(asyncio.gather(listing.wait(), creating.wait()), 10)
    loop = asyncio.get_running_loop()
    started = loop.time()
    replica.stopping.set()
    await asyncio.wait_for(task, 10)
    assert loop.time() - started < 3.5  # 2 s of grace, once (twice: over 4 s)
    assert await aredis.zcard(replica.keys.key("pending")) == 2  # left to their deadline


async def test_a_request_left_half_sent_does_not_hold_the_replica_s_exit(
        redis_url: str, aredis: aioredis.Redis) -> None:
    """aiohttp waits 60 s for a request still open at shutdown, and a half-sent POST /metrics
    held a review's replica 10 s past its stop; it is cut after a second."""
    import socket

    from provisioner.service import serve

    service = ServiceConfig(redis_url, "http://127.0.0.1:9", pool="half-sent",
                            http_host="127.0.0.1", reconcile_interval_s=0)
    stop = asyncio.Event()
    serving, port, _ = await answering(
        lambda port: serve(dataclasses.replace(service, http_port=port), FLOOR_ONLY, stop),
        "/healthz", "127.0.0.1")
    peer = socket.create_connection(("127.0.0.1", port))
    try:
        peer.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n01")
        await asyncio.sleep(0.3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        stop.set()
        await asyncio.wait_for(serving, 30)
        assert loop.time() - started < 6  # a second for the request, not 10
    finally:
        peer.close()
        await aredis.delete(*[key async for key in aredis.scan_iter("prov:{half-sent}:*")])


async def test_serve_ends_with_the_error_of_a_replica_that_cannot_start(redis_url: str,
                                                                        aredis: aioredis.Redis,
                                                                        ) -> None:
    from provisioner.service import serve

    await aredis.set(PoolKeys("broken").config, "a string, where the settings hash goes")
    service = ServiceConfig(redis_url, "http://127.0.0.1:9", pool="broken", http_port=0)
    try:
        # the key named (a review: the replica said only WRONGTYPE)
        with pytest.raises(aioredis.ResponseError,
                           match=r"^WRONGTYPE .*: pool key prov:\{broken\}:config, where"):
            await asyncio.wait_for(serve(service, FLOOR_ONLY), 10)
    finally:
        await aredis.delete(PoolKeys("broken").config)


@pytest.mark.parametrize("host", ["::1", "127.0.0.1"])
async def test_serve_logs_where_it_listens_as_a_url_that_reaches_it(
        host: str, redis_url: str, aredis: aioredis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    """Found by a review: --http-host ::1 logged "metrics and health on http://::1:PORT", a
    URL no client takes (an IPv6 address goes in brackets)."""
    import httpx

    from provisioner.service import serve

    service = ServiceConfig(redis_url, "http://127.0.0.1:9", pool="listens", http_host=host,
                            reconcile_interval_s=0)
    if ":" in host:
        import socket

        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind((host, 0))
        except OSError as exc:  # a host without IPv6
            pytest.skip(f"cannot listen on {host}: {exc}")
    stop = asyncio.Event()
    caplog.set_level(logging.INFO, logger="provisioner.service")
    serving, _, _ = await answering(
        lambda port: serve(dataclasses.replace(service, http_port=port), FLOOR_ONLY, stop),
        "/healthz", host)
    try:
        said = [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("metrics and health on ")]
        url = said[-1].removeprefix("metrics and health on ")
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{url}/healthz")).status_code == 200, url
    finally:
        stop.set()
        await asyncio.wait_for(serving, 10)
        await aredis.delete(*[key async for key in aredis.scan_iter("prov:{listens}:*")])


async def test_outcomes_carry_text_ids_on_a_bytes_client(redis_url: str, aredis: aioredis.Redis,
                                                         api: FakeNodeApi,
                                                         clock: ManualClock) -> None:
    # The service's own client does not decode replies; ids must still come back as text.
    raw = aioredis.Redis.from_url(redis_url)
    try:
        replica = make_replica(raw, api, clock, "r1", PoolConfig(min_ready=0, conversion=0))
        await send([replica], "user:connect", {"user_id": "u1"})
        await send([replica], "node:status", {"node_id": "node-7", "status": "ready"})
        await send([replica], "user:disconnect", {"user_id": "u1"})
        await send([replica], "user:connect", {"user_id": "u2"})
        await send([replica], "user:connect", {"user_id": "u3"})
        freed = await replica.handle("user:disconnect", json.dumps({"user_id": "u2"}))
    finally:
        await raw.aclose()
    assert isinstance(freed, ReleaseResult)
    assert freed.node_id == "node-7"
    assert [(s.user_id, s.node_id) for s in freed.served] == [("u3", "node-7")]


async def test_a_tick_decided_in_a_surge_is_counted(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    replica = make_replica(aredis, api, clock, "r1", PoolConfig(min_ready=0, max_nodes=100))

    async def arrive(user: str) -> None:
        await send([replica], "user:activity",
                   {"user_id": user, "timestamp": clock.now_ms() // 1000})

    for minute in range(30):  # one arrival a minute for half an hour: no surge
        await arrive(f"steady-{minute}")
        clock.advance(60_000)
        await replica.tick()
    await replica.settle()
    assert counter(replica, "provisioner_scale_decisions_total") == 30
    assert counter(replica, "provisioner_surge_decisions_total") == 0
    for i in range(20):  # then twenty in a few seconds
        await arrive(f"crowd-{i}")
    clock.advance(1000)
    await replica.tick()
    await replica.settle()
    assert counter(replica, "provisioner_surge_decisions_total") == 1


#: a session's messages, bad ones among them: what a burst on the channels could hold
SESSION = [
    ("user:activity", {"user_id": "u1", "timestamp": T0 // 1000}),
    ("user:activity", {"user_id": "u1", "timestamp": T0 // 1000}),  # the same second again
    ("user:connect", {"user_id": "u1"}),  # no node: waits
    ("user:connect", "not json"),
    ("node:status", {"node_id": "n1", "status": "booting"}),
    ("node:status", {"node_id": "n1", "status": "ready"}),  # serves u1
    ("user:activity", {"user_id": "u2", "timestamp": T0 // 1000}),
    ("user:connect", {"user_id": "u2"}),  # waits
    ("user:disconnect", {"user_id": "u1"}),  # n1 goes to u2
    ("node:status", {"node_id": "n9", "status": "sideways"}),
    ("user:disconnect", {"user_id": "u3"}),  # nobody
]


def wire(channel: str, payload: object) -> tuple[bytes, bytes]:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return channel.encode(), data.encode()


async def test_a_batch_decides_what_the_same_messages_one_at_a_time_decide(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    service = ServiceConfig("redis://x", "http://api", pool="one-by-one", replica_id="r1")
    one = Replica(aredis, service, FLOOR_ONLY, api, clock=clock, metrics=Metrics())
    batched = make_replica(aredis, api, clock, "r1")
    singly = [await one.handle(*wire(channel, payload)) for channel, payload in SESSION]
    together = await batched.handle_many([wire(channel, payload) for channel, payload in SESSION])
    assert together == singly
    assert [None if o is None else type(o).__name__ for o in together] == [
        "ActivityResult", "ActivityResult", "AllocateResult", None, "NodeStatusResult",
        "NodeStatusResult", "ActivityResult", "AllocateResult", "ReleaseResult", None,
        "ReleaseResult"]
    states = [await dump_pool(aredis, PoolKeys(pool)) for pool in (POOL, "one-by-one")]
    for state in states:  # the marks are each batch's own: one replica's each
        state["applied"] = sorted(state["applied"])
    assert states[0] == states[1]
    for name in ("provisioner_hits_total", "provisioner_misses_total"):
        assert counter(batched, name) == counter(one, name)
    assert counter(batched, "provisioner_events_rejected_total", channel="user:connect",
                   reason="not_json") == 1
    assert await check_invariants(aredis, POOL) == []


async def test_a_message_the_server_refuses_is_counted_and_the_rest_of_its_batch_applies(
    aredis: aioredis.Redis, replica: Replica, clock: ManualClock,
) -> None:
    # u1's activity window is not a sorted set: its script fails, alone.
    await aredis.set(replica.keys.acts("u1"), "not a sorted set")
    outcomes = await replica.handle_many([
        wire("user:activity", {"user_id": "u0", "timestamp": T0 // 1000}),
        wire("user:activity", {"user_id": "u1", "timestamp": T0 // 1000}),
        wire("user:connect", {"user_id": "u2"}),
    ])
    assert outcomes[1] is None and outcomes[0] is not None and outcomes[2] is not None
    assert counter(replica, "provisioner_errors_total", where="event") == 1
    assert await aredis.hget(replica.keys.key("waiting_since"), "u2") is not None
    assert await aredis.zscore(replica.keys.key("active"), "u0") is not None


async def test_events_the_server_cannot_be_reached_for_are_tried_again_not_dropped(
    redis_url: str, aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server stalled past the client's timeout (here 0.3 s; 5 s by default) dropped every
    event of the batch: a connect so dropped by every replica is a user who never gets a node.
    The batch is tried again, and a try that went through before its reply was lost is a
    second copy the scripts take as a no-op."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=0.3)
    replica = make_replica(client, api, clock, "r1")
    try:
        await aredis.execute_command("CLIENT", "PAUSE", "1200", "ALL")
        with caplog.at_level("WARNING", logger="provisioner.service"):
            outcomes = await replica.handle_many([
                wire("user:activity", {"user_id": "u1", "timestamp": T0 // 1000}),
                wire("user:connect", {"user_id": "u1"})])
    finally:
        await client.aclose()
    assert [type(o).__name__ for o in outcomes] == ["ActivityResult", "AllocateResult"]
    assert await aredis.hget(replica.keys.key("waiting_since"), "u1") is not None
    assert int(await aredis.hget(replica.keys.key("stats"), "connects") or 0) == 1
    assert counter(replica, "provisioner_errors_total", where="event") == 0
    assert counter(replica, "provisioner_errors_total", where="event_retry") >= 1
    assert "trying again" in caplog.text
    assert await check_invariants(aredis, POOL) == []


async def test_events_a_server_out_of_memory_refuses_are_tried_again_from_the_first_refused(
    aredis: aioredis.Redis, replica: Replica, caplog: pytest.LogCaptureFixture,
) -> None:
    """A server past its maxmemory refuses every write for now: its replies are not the
    events' fault, and they were dropped at once (users connected and never got a node). The
    batch is tried again (from which call: the test after this one)."""
    await aredis.config_set("maxmemory", 1)
    loop = asyncio.get_running_loop()
    loop.call_later(0.5, lambda: asyncio.ensure_future(aredis.config_set("maxmemory", 0)))
    with caplog.at_level("WARNING", logger="provisioner.service"):
        outcomes = await replica.handle_many([wire("user:connect", {"user_id": "oom"})])
    assert isinstance(outcomes[0], AllocateResult)
    assert await aredis.hget(replica.keys.key("waiting_since"), "oom") is not None
    assert "trying again" in caplog.text


@pytest.mark.parametrize("refused", [OutOfMemoryError("command not allowed"),
                                     NoScriptError("No matching script.")],
                         ids=["out of memory", "script flushed"])
async def test_a_batch_refused_from_its_second_call_is_tried_again_from_there(
    aredis: aioredis.Redis, replica: Replica, refused: Exception,
) -> None:
    """Refused from the second call on: the first is applied once, the rest when let through.
    A script flushed (found by a review: a SCRIPT FLUSH between the pipeline's load of the
    scripts and its calls answered NOSCRIPT, and the events were dropped as errors, a
    disconnect among them) did not run, as a call out of memory did not."""
    async def first_only(run_many: Any, calls: list[Any]) -> list[Any]:
        results: list[Any] = await run_many(calls[:1])
        return results + [refused] * (len(calls) - 1)

    sent = _tried_as(replica, first_only, _as_is)
    outcomes = await replica.handle_many([wire("user:connect", {"user_id": f"x{k}"})
                                          for k in range(3)])
    assert sent == [3, 2]
    assert all(isinstance(o, AllocateResult) for o in outcomes)
    stats = await aredis.hgetall(replica.keys.key("stats"))
    assert int(stats["connects"]) == 3  # x0, x1, x2: each once
    assert counter(replica, "provisioner_errors_total", where="event") == 0
    assert await check_invariants(aredis, POOL) == []
    assert replica.writes_refused() is None


async def test_a_call_refused_before_one_that_ran_is_dropped_not_made_again(
    aredis: aioredis.Redis, replica: Replica, caplog: pytest.LogCaptureFixture,
) -> None:
    """Found by a review: a flush mid-batch, and another client loading the scripts again
    before its next calls, answered NOSCRIPT to carol's connect and ran alice's connect and
    disconnect after it; the batch was tried again from carol's, so alice's two events applied
    twice (connects counted 3, and a disconnect run again could end a session begun after it).
    Made again after alice's, carol's would apply out of order: it is dropped and named, as a
    connect the server refused is."""
    await _booted(replica, "n1")
    sent = _tried_as(replica, _refusing_first(NoScriptError("No matching script.")), _as_is)
    with caplog.at_level("WARNING", logger="provisioner.service"):
        outcomes = await replica.handle_many([wire("user:connect", {"user_id": "carol"}),
                                              wire("user:connect", {"user_id": "alice"}),
                                              wire("user:disconnect", {"user_id": "alice"})])
    assert len(sent) == 1 and outcomes[0] is None
    stats = await aredis.hgetall(replica.keys.key("stats"))
    assert (stats["connects"], stats["hits"], stats["releases"]) == ("1", "1", "1")
    assert "could not apply user:connect of carol (dropped)" in caplog.text
    assert counter(replica, "provisioner_errors_total", where="event") == 1
    assert await check_invariants(aredis, POOL) == []


#: One try of a batch, for `_tried_as`: the real `run_many` and the try's calls.
Try = Callable[[Any, list[Any]], Awaitable[list[Any]]]


def _tried_as(replica: Replica, *tries: Try) -> list[int]:
    """The replica's batches go as `tries`, in turn (the last one for every later try); what
    it returns fills with each try's number of calls."""
    run_many = replica.scripts.run_many
    sent: list[int] = []

    async def run(calls: list[Any]) -> list[Any]:
        sent.append(len(calls))
        return await tries[min(len(sent), len(tries)) - 1](run_many, calls)

    replica.scripts.run_many = run  # type: ignore[method-assign]
    return sent


async def _as_is(run_many: Any, calls: list[Any]) -> list[Any]:
    results: list[Any] = await run_many(calls)
    return results


def _refusing_first(refusal: Exception, reply_lost: bool = False) -> Try:
    """A try whose first call the server refuses and whose others run; its reply lost, or not."""
    async def go(run_many: Any, calls: list[Any]) -> list[Any]:
        results: list[Any] = [refusal] + await run_many(calls[1:])
        if reply_lost:
            raise RedisTimeoutError("Timeout reading from socket")
        return results
    return go


async def _reply_lost(run_many: Any, calls: list[Any]) -> list[Any]:
    await run_many(calls)
    raise RedisTimeoutError("Timeout reading from socket")


async def _booted(replica: Replica, *nodes: str) -> None:
    for node in nodes:
        for status in ("booting", "ready"):
            await replica.handle(*wire("node:status", {"node_id": node, "status": status}))


@pytest.mark.parametrize("ran", [2, 1], ids=["both ran", "the first ran"])
async def test_a_batch_whose_reply_was_lost_does_not_end_the_session_it_began(
    aredis: aioredis.Redis, replica: Replica, ran: int,
) -> None:
    """A batch that ran, and whose reply was lost (a stall past the client's timeout, a
    connection cut), is tried again. Its disconnect and connect of one user applied again ended
    the session the first try began and began another on the other node, while the product's
    user was on the first: that node was then free to hand to someone else. Each connect and
    disconnect carries the replica's mark of the try, and a call made again is a no-op. Cut
    after the first call ran, only the second applies when tried again."""
    await _booted(replica, "n1", "n2")
    await replica.handle(*wire("user:connect", {"user_id": "alice"}))
    held_after_first: str | None = None

    async def cut_after(run_many: Any, calls: list[Any]) -> list[Any]:
        nonlocal held_after_first
        await run_many(calls[:ran])
        held_after_first = await aredis.hget(replica.keys.key("alloc"), "alice")
        raise RedisTimeoutError("Timeout reading from socket")

    sent = _tried_as(replica, cut_after, _as_is)
    outcomes = await replica.handle_many([wire("user:disconnect", {"user_id": "alice"}),
                                          wire("user:connect", {"user_id": "alice"})])
    assert len(sent) == 2
    held = await aredis.hget(replica.keys.key("alloc"), "alice")
    assert held == (held_after_first if ran == 2 else "n2")
    stats = await aredis.hgetall(replica.keys.key("stats"))
    assert (int(stats["connects"]), int(stats["releases"])) == (2, 1)
    assert int(stats["calls_made_again"]) == ran
    from rich.console import Console

    from provisioner.view import read_view, render_view
    shown = await read_view(aredis, POOL, replica.clock.now_ms(), replica.pool.window_ms)
    assert shown.as_dict()["calls_made_again"] == ran
    console = Console(width=200, record=True)
    console.print(render_view(shown))
    assert f"made again after a lost reply {ran}" in console.export_text()
    assert isinstance(outcomes[0], ReleaseResult) and isinstance(outcomes[1], AllocateResult)
    assert outcomes[0].code is Release.MADE_AGAIN
    assert outcomes[1].code is (Allocation.MADE_AGAIN if ran == 2 else Allocation.ALLOCATED)
    assert counter(replica, "provisioner_errors_total", where="event") == 0
    # The replica's counters: what the lost reply held is counted apart, not as a connect
    # (a review: the metrics module called the sums over replicas exact, and they missed it).
    assert counter(replica, "provisioner_calls_made_again_total", event="disconnect") == 1
    assert counter(replica, "provisioner_calls_made_again_total", event="connect") == ran - 1
    assert counter(replica, "provisioner_connects_total") == 1 + (ran == 1)
    assert await check_invariants(aredis, POOL) == []


async def test_a_batch_applied_after_a_later_one_is_not_taken_for_made_again(
    aredis: aioredis.Redis, replica: Replica,
) -> None:
    """One listener applies one batch at a time, but nothing in the marks relies on it: a batch
    read first and applied after a later one (held here until the later one has run) is
    applied whole. Marks counted across batches would have taken its calls for made again and
    dropped its two connects."""
    run_many, later_ran = replica.scripts.run_many, asyncio.Event()

    async def first_read_last(calls: Any) -> Any:
        if calls[0].args[1] == "a1":
            await later_ran.wait()
        results = await run_many(calls)
        later_ran.set()
        return results

    replica.scripts.run_many = first_read_last  # type: ignore[method-assign]
    first = asyncio.ensure_future(replica.handle_many(
        [wire("user:connect", {"user_id": user}) for user in ("a1", "a2")]))
    await asyncio.sleep(0)  # read (and marked) first
    await replica.handle_many([wire("user:connect", {"user_id": user}) for user in ("b1", "b2")])
    outcomes = await first
    assert [o.code for o in outcomes] == [Allocation.WAITING] * 2  # type: ignore[union-attr]
    stats = await aredis.hgetall(replica.keys.key("stats"))
    assert int(stats["connects"]) == 4 and "calls_made_again" not in stats


async def test_a_batch_whose_replies_a_proxy_lost_applies_once(
    redis_url: str, aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """The same through a real server, whose replies to the first try are lost on the way
    back (a proxy holds them): the client times out, and tries again on a new connection."""
    frozen = asyncio.Event()
    tasks: list[asyncio.Future[Any]] = []
    proxy = await _silencing_proxy(redis_url, frozen, 0.0, tasks, replies_only=True)
    port = proxy.sockets[0].getsockname()[1]
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}", decode_responses=True,
                                     socket_timeout=0.3)  # as the service's: no retries
    replica = make_replica(client, api, clock, "r1")
    try:
        for node in ("n1", "n2"):
            for status in ("booting", "ready"):
                await replica.handle(*wire("node:status", {"node_id": node, "status": status}))
        await replica.handle(*wire("user:connect", {"user_id": "alice"}))
        frozen.set()
        await replica.handle_many([wire("user:disconnect", {"user_id": "alice"}),
                                   wire("user:connect", {"user_id": "alice"})])
    finally:
        await client.aclose()
        proxy.close()
        for task in tasks:
            task.cancel()
        # retrieved, so that no future is left to log its CancelledError when collected (in
        # a later test's import, that log tripped CPython 3.11's AST recursion check)
        await asyncio.gather(*tasks, return_exceptions=True)
    assert counter(replica, "provisioner_errors_total", where="event_retry") >= 1
    stats = await aredis.hgetall(replica.keys.key("stats"))
    assert (int(stats["connects"]), int(stats["releases"])) == (2, 1)
    assert int(stats["calls_made_again"]) >= 2
    assert await aredis.hget(replica.keys.key("alloc"), "alice") == "n2"
    assert await check_invariants(aredis, POOL) == []


async def test_a_call_refused_out_of_memory_before_one_that_ran_with_the_reply_lost_is_named(
    redis_url: str, aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same through a real server: out of memory under its maxmemory when alice's
    disconnect reaches it, and not by the time bob's connect does (memory freed between the
    two), the replies of that try lost on the way back. Tried again, alice's disconnect was
    taken for made again: it never ran, her node stayed hers, and nothing named it."""
    target = urlparse(redis_url)
    tasks: list[asyncio.Future[Any]] = []
    armed = asyncio.Event()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   lose: asyncio.Event, upstream: bool) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                second = data.find(b"$7\r\nEVALSHA", data.find(b"$7\r\nEVALSHA") + 1)
                if upstream and armed.is_set() and second > 0:
                    armed.clear()
                    lose.set()  # this connection's replies are lost from now on
                    cut = data.rindex(b"*", 0, second)
                    writer.write(data[:cut])  # alice's disconnect, refused: out of memory
                    await writer.drain()
                    await asyncio.sleep(0.1)
                    await aredis.config_set("maxmemory", 0)  # memory freed meanwhile
                    data = data[cut:]  # bob's connect, which runs
                elif not upstream and lose.is_set():
                    continue
                writer.write(data)
                await writer.drain()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(target.hostname, target.port)
        lose = asyncio.Event()
        tasks.append(asyncio.gather(pump(client_r, server_w, lose, True),
                                    pump(server_r, client_w, lose, False)))

    proxy = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}", decode_responses=True,
                                     socket_timeout=0.3)
    replica = make_replica(client, api, clock, "r1")
    try:
        for status in ("booting", "ready"):
            await replica.handle(*wire("node:status", {"node_id": "n1", "status": status}))
        await replica.handle(*wire("user:connect", {"user_id": "alice"}))
        await aredis.config_set("maxmemory", 1)
        armed.set()
        with caplog.at_level("INFO", logger="provisioner.service"):
            outcomes = await replica.handle_many([
                wire("user:disconnect", {"user_id": "alice"}),
                wire("user:connect", {"user_id": "bob"})])
    finally:
        await aredis.config_set("maxmemory", 0)
        await client.aclose()
        proxy.close()
        for task in tasks:
            task.cancel()
        # retrieved, so that no future is left to log its CancelledError when collected (in
        # a later test's import, that log tripped CPython 3.11's AST recursion check)
        await asyncio.gather(*tasks, return_exceptions=True)
    assert not armed.is_set()  # the proxy did split the batch
    assert counter(replica, "provisioner_errors_total", where="event_retry") >= 1
    assert await aredis.hget(replica.keys.key("waiting_since"), "bob") is not None
    assert int((await aredis.hgetall(replica.keys.key("stats")))["connects"]) == 2  # bob ran
    # alice's disconnect never ran: not one made again, but dropped and named
    assert not (isinstance(outcomes[0], ReleaseResult)
                and outcomes[0].code is Release.MADE_AGAIN), outcomes[0]
    assert "disconnect alice: already applied" not in caplog.text
    assert "could not apply user:disconnect of alice (dropped)" in caplog.text


@pytest.mark.parametrize("ran", [True, False], ids=["ran in a lost try", "never ran"])
@pytest.mark.parametrize("later", [
    wire("user:connect", {"user_id": "bob"}),
    wire("node:status", {"node_id": "n2", "status": "booting"}),
    wire("user:activity", {"user_id": "bob", "timestamp": T0 // 1000}),
], ids=["a connect", "a node status", "an activity"])
async def test_a_call_refused_before_a_later_one_that_ran_after_a_lost_reply(
    aredis: aioredis.Redis, replica: Replica, caplog: pytest.LogCaptureFixture,
    later: tuple[str, str], ran: bool,
) -> None:
    """Reviews of the marks: alice's disconnect, in a try whose reply was lost, then refused
    out of memory when made again, before a later call the server ran (bob's connect, or one
    that carries no mark: a node status, an activity). One that ran in the lost try was
    dropped and named "could not apply", an error, though it ran: an operator told so would
    release her by hand, ending whatever session she holds by then. It is asked about (a mark
    ending in '?', which the pool never applies) and answered made again. One that never ran
    (refused in the lost try too) is still dropped and named, and never applied after the
    later call."""
    await _booted(replica, "n1")
    await replica.handle(*wire("user:connect", {"user_id": "alice"}))
    oom = OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
    _tried_as(replica, _reply_lost if ran else _refusing_first(oom, reply_lost=True),
              _refusing_first(oom), _as_is)
    with caplog.at_level("INFO", logger="provisioner.service"):
        outcomes = await replica.handle_many([wire("user:disconnect", {"user_id": "alice"}),
                                              later])
    stats = await aredis.hgetall(replica.keys.key("stats"))
    assert await aredis.hget(replica.keys.key("alloc"), "alice") == (None if ran else "n1")
    assert int(stats.get("releases", 0)) == (1 if ran else 0)
    named = "could not apply user:disconnect of alice (dropped)" in caplog.text
    assert named is not ran, caplog.text
    assert counter(replica, "provisioner_errors_total", where="event") == (0 if ran else 1)
    assert ("disconnect alice: already applied" in caplog.text) is ran
    made_again = isinstance(outcomes[0], ReleaseResult) and outcomes[0].code is Release.MADE_AGAIN
    assert made_again is ran
    assert outcomes[1] is not None
    assert await check_invariants(aredis, POOL) == []


async def test_a_call_that_ran_refused_before_one_the_pool_answered_passed_over_is_not_named(
    aredis: aioredis.Redis, replica: Replica, caplog: pytest.LogCaptureFixture,
) -> None:
    """Review of 175f767: a first try runs alice's disconnect, is refused bob's connect out of
    memory, runs carol's connect, and loses its reply. Made again, alice's is refused out of
    memory, bob's answered PASSED OVER (an error reply: it never ran) and carol's refused: the
    pool's mark covers alice's (bob's seq is under it), but only a later call answered with a
    result had it asked again. It was dropped and named, an error, though it ran."""
    await _booted(replica, "n1")
    await replica.handle(*wire("user:connect", {"user_id": "alice"}))
    oom = OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")

    async def first(run_many: Any, calls: list[Any]) -> list[Any]:
        await run_many(calls[:1])  # alice's disconnect runs; bob's connect refused
        await run_many(calls[2:])  # carol's connect runs
        raise RedisTimeoutError("Timeout reading from socket")

    async def second(run_many: Any, calls: list[Any]) -> list[Any]:
        return [oom] + await run_many(calls[1:2]) + [oom]  # bob's answered, the others refused

    sent = _tried_as(replica, first, second, _as_is)
    with caplog.at_level("INFO", logger="provisioner.service"):
        outcomes = await replica.handle_many([wire("user:disconnect", {"user_id": "alice"}),
                                              wire("user:connect", {"user_id": "bob"}),
                                              wire("user:connect", {"user_id": "carol"})])
    assert sent[:2] == [3, 3]
    stats = await aredis.hgetall(replica.keys.key("stats"))
    assert await aredis.hget(replica.keys.key("alloc"), "alice") is None
    assert int(stats["releases"]) == 1
    assert "could not apply user:connect of bob (dropped): PASSED OVER" in caplog.text
    assert "could not apply user:disconnect of alice" not in caplog.text, caplog.text
    assert counter(replica, "provisioner_errors_total", where="event") == 1  # bob's only
    assert isinstance(outcomes[0], ReleaseResult) and outcomes[0].code is Release.MADE_AGAIN
    assert isinstance(outcomes[2], AllocateResult) and outcomes[2].code is Allocation.MADE_AGAIN
    assert await check_invariants(aredis, POOL) == []


@pytest.mark.parametrize("question", ["refused for now", "connection dropped"])
async def test_a_question_about_a_call_refused_for_now_is_asked_again_within_the_deadline(
    aredis: aioredis.Redis, replica: Replica, caplog: pytest.LogCaptureFixture, question: str,
) -> None:
    """Review of 175f767: alice's disconnect ran in a try whose reply was lost, was refused
    out of memory when made again before bob's connect, which the pool answered, and the
    question about it was refused out of memory too (memory still short a moment later). Its
    refusal stood at once, with most of its --event-hold left: dropped and named "could not
    apply", an error, though it ran. A question changes nothing, so it is asked again. So is
    one whose connection dropped (a failover, a proxy's restart): a moment's, not a reason
    to stop the batch or drop her disconnect as an error."""
    await _booted(replica, "n1")
    await replica.handle(*wire("user:connect", {"user_id": "alice"}))
    oom = OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")

    async def refused(run_many: Any, calls: list[Any]) -> list[Any]:
        if question == "connection dropped":
            raise RedisConnectionError("Connection closed by server.")
        return [oom] * len(calls)

    sent = _tried_as(replica, _reply_lost, _refusing_first(oom), refused, _as_is)
    with caplog.at_level("INFO", logger="provisioner.service"):
        outcomes = await replica.handle_many([wire("user:disconnect", {"user_id": "alice"}),
                                              wire("user:connect", {"user_id": "bob"})])
    assert sent == [2, 2, 1, 1]
    assert await aredis.hget(replica.keys.key("alloc"), "alice") is None
    assert int((await aredis.hgetall(replica.keys.key("stats")))["releases"]) == 1
    assert "could not apply user:disconnect of alice" not in caplog.text, caplog.text
    assert "may have been applied" not in caplog.text, caplog.text
    assert counter(replica, "provisioner_errors_total", where="event") == 0
    assert isinstance(outcomes[0], ReleaseResult) and outcomes[0].code is Release.MADE_AGAIN
    assert isinstance(outcomes[1], AllocateResult)


@pytest.mark.parametrize("left", ["unreachable till the deadline", "asked till a stop"])
async def test_a_call_left_unanswered_after_a_lost_reply_is_not_named_never_applied(
    aredis: aioredis.Redis, replica: Replica, caplog: pytest.LogCaptureFixture, left: str,
) -> None:
    """Final review: alice's disconnect ran in a try whose reply was lost. The server then
    stayed unreachable till the batch's deadline, or refused the question about it (out of
    memory) till the replica was stopped (a deploy's SIGTERM). It was logged "could not apply
    user:disconnect of alice (dropped)", as a call the pool never ran is: it ran, her node is
    free, and the operator the line is for repairs a disconnect that applied (a release by
    hand ends whatever session she holds by then, the harm 175f767 and 63380e1 fixed for a
    call the pool answered). Whether it ran is not known: the line says so."""
    await _booted(replica, "n1")
    await replica.handle(*wire("user:connect", {"user_id": "alice"}))
    oom = OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")

    async def unreachable(run_many: Any, calls: list[Any]) -> list[Any]:
        raise RedisConnectionError("Error 111 connecting to redis. Connection refused.")

    async def refused(run_many: Any, calls: list[Any]) -> list[Any]:
        return [oom] * len(calls)

    if left == "unreachable till the deadline":
        replica.service = dataclasses.replace(replica.service, event_hold_s=0.5)
        _tried_as(replica, _reply_lost, unreachable)
    else:
        _tried_as(replica, _reply_lost, _refusing_first(oom), refused)
        asyncio.get_running_loop().call_later(0.4, replica.stopping.set)
    with caplog.at_level("INFO", logger="provisioner.service"):
        await replica.handle_many([wire("user:disconnect", {"user_id": "alice"}),
                                   wire("user:connect", {"user_id": "bob"})])
    assert await aredis.hget(replica.keys.key("alloc"), "alice") is None  # it ran
    assert "could not apply user:disconnect of alice" not in caplog.text, caplog.text
    assert "user:disconnect of alice may have been applied" in caplog.text, caplog.text


async def test_a_script_call_a_flush_fails_twice_is_made_again(
    aredis: aioredis.Redis, replica: Replica,
) -> None:
    """redis-py loads a script the server does not hold and calls it once more; a flush between
    the two failed a tick, or a create's registration (logged with a traceback, in a review's
    drill). The call is made up to three times."""
    scripts = replica.scripts
    real = scripts._scripts["allocate"]
    failures = 0

    async def flushed(**kwargs: Any) -> Any:
        nonlocal failures
        if failures < 2:
            failures += 1
            raise NoScriptError("No matching script.")
        return await real(**kwargs)

    scripts._scripts["allocate"] = flushed  # type: ignore[assignment]
    assert (await scripts.allocate(T0, "u1")).code is Allocation.WAITING
    assert failures == 2
    failures = -1  # three in a row: the server is flushing faster than anyone can load
    with pytest.raises(NoScriptError):
        await scripts.allocate(T0, "u2")


async def test_a_run_of_activity_goes_in_few_calls_and_other_events_keep_their_place(
    aredis: aioredis.Redis, replica: Replica,
) -> None:
    sent: list[tuple[str, int]] = []
    run_many = replica.scripts.run_many

    async def spy(calls: Any) -> Any:
        sent.extend((call.name, len(call.args)) for call in calls)
        return await run_many(calls)

    replica.scripts.run_many = spy  # type: ignore[method-assign]
    second = T0 // 1000
    messages = [wire("user:activity", {"user_id": f"u{k}", "timestamp": second})
                for k in range(ACTIVITY_BATCH + 20)]
    # u1 connects between its activities: the one before is a browsing user's, the one after
    # a user's who waits (recorded, not placed in a cell).
    messages += [wire("user:connect", {"user_id": "u1"}),
                 wire("user:activity", {"user_id": "u1", "timestamp": second - 1}),
                 wire("user:activity", {"user_id": "u1", "timestamp": second - 1}),
                 wire("user:activity", "not json"),
                 wire("user:activity", {"user_id": "u2", "timestamp": second - 1})]
    outcomes = await replica.handle_many(messages)
    per_pair = 2
    assert sent == [("record_activity", 4 + per_pair * ACTIVITY_BATCH),
                    ("record_activity", 4 + per_pair * 20),
                    ("allocate", 5),
                    ("record_activity", 4 + per_pair * 3)]
    assert [None if o is None else type(o).__name__ for o in outcomes[-6:]] == [
        "ActivityResult", "AllocateResult", "ActivityResult", "ActivityResult", None,
        "ActivityResult"]
    assert [o.code.name for o in outcomes[-4:-2]] == ["RECORDED", "DUPLICATE"]  # type: ignore
    assert len(outcomes) == len(messages)
    stats = await aredis.hgetall(replica.keys.key("stats"))
    assert int(stats["activities"]) == ACTIVITY_BATCH + 20 + 2
    assert await aredis.hget(replica.keys.key("waiting_since"), "u1") is not None


async def test_a_message_the_replica_fails_on_is_dropped_and_the_listener_goes_on(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Bugs, not bad input (that is rejected): a message whose reading raises, and a batch
    whose applying raises, are counted and logged, and the next messages still apply."""
    from provisioner import events

    replica = make_replica(aredis, api, clock, "r1")
    parse = events.parse

    def broken_parse(channel: str, data: Any, *args: Any, **kwargs: Any) -> Any:
        if b"crash-parse" in (data if isinstance(data, bytes) else data.encode()):
            raise OverflowError("a bug in reading")
        return parse(channel, data, *args, **kwargs)

    monkeypatch.setattr(events, "parse", broken_parse)
    report = replica._report

    def broken_report(event: Any, result: Any) -> Any:
        if getattr(event, "user_id", "") == "crash-report":
            raise AssertionError("a bug in reporting")
        return report(event, result)

    replica._report = broken_report  # type: ignore[method-assign]
    listening = asyncio.create_task(replica.listen())
    try:
        await asyncio.wait_for(replica.subscribed.wait(), 5)
        for sent, user in enumerate(("crash-parse", "crash-report", "after"), start=1):
            await aredis.publish("user:connect", json.dumps({"user_id": user}))
            await _until(lambda n=sent: counter(
                replica, "provisioner_events_total", channel="user:connect") >= n)
        await _until(lambda: counter(replica, "provisioner_connects_total") >= 1)
    finally:
        replica.stopping.set()
        await listening
    assert counter(replica, "provisioner_errors_total", where="event") == 2
    waiting = await aredis.hgetall(replica.keys.key("waiting_since"))
    assert set(waiting) == {"crash-report", "after"}  # the script ran; only its report failed
    assert "a bug in reading" in caplog.text and "a bug in reporting" in caplog.text
    # In one batch, the message read wrong is dropped alone.
    outcomes = await replica.handle_many([wire("user:connect", {"user_id": "crash-parse"}),
                                          wire("user:connect", {"user_id": "later"})])
    assert outcomes[0] is None and isinstance(outcomes[1], AllocateResult)
    assert counter(replica, "provisioner_errors_total", where="event") == 3


async def test_the_listener_applies_a_burst_in_batches_in_order(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    replica = make_replica(aredis, api, clock, "r1")
    sizes: list[int] = []
    handle_many = replica.handle_many

    async def spy(messages: Any, read_at: float | None = None) -> Any:
        sizes.append(len(messages))
        return await handle_many(messages, read_at)

    replica.handle_many = spy  # type: ignore[method-assign]
    listening = asyncio.create_task(replica.listen())
    try:
        await asyncio.wait_for(replica.subscribed.wait(), 5)
        async with aredis.pipeline(transaction=False) as pipe:
            for k in range(300):
                pipe.publish("user:activity", json.dumps(
                    {"user_id": f"u{k % 30}", "timestamp": T0 // 1000 - k // 30}))
            pipe.publish("user:connect", json.dumps({"user_id": "late"}))
            await pipe.execute()
        for _ in range(500):
            if sum(sizes) >= 301:
                break
            await asyncio.sleep(0.01)
    finally:
        replica.stopping.set()
        await listening
    assert sum(sizes) == 301 and max(sizes) > 1 and max(sizes) <= LISTEN_BATCH
    stats = await aredis.hgetall(replica.keys.key("stats"))
    assert int(stats["activities"]) == 300
    assert await aredis.hget(replica.keys.key("waiting_since"), "late") is not None


# --- the listener's backlog -----------------------------------------------------------------


def _service(replica: Replica, **settings: Any) -> None:
    replica.service = dataclasses.replace(replica.service, **settings)


async def _publish(aredis: aioredis.Redis, messages: list[tuple[str, Any]]) -> None:
    async with aredis.pipeline(transaction=False) as pipe:
        for channel, payload in messages:
            pipe.publish(channel, json.dumps(payload))
        await pipe.execute()


async def _held_connect(aredis: aioredis.Redis, replica: Replica, user: str) -> None:
    """Publish `user`'s connect and wait until the listener holds it, refused (a first retry).
    The wait is long: under `.ci/run`'s second engine, both cores busy, it once passed 5 s;
    what the listener had then is in the failure, should it come again."""
    await _publish(aredis, [("user:connect", {"user_id": user})])
    await _until(lambda: counter(replica, "provisioner_errors_total",
                                 where="event_retry") >= 1, 20.0,
                 why=lambda: _listener_state(replica))


def _listener_state(replica: Replica) -> str:
    """What a listener holds, for a failed wait: its backlog and batch, the refusal it saw,
    the connects it applied and the events it failed on."""
    return (f"backlog {len(replica._backlog)}, taken {len(replica._taken)}, refused "
            f"{replica.writes_refused()!r}, connects applied "
            f"{counter(replica, 'provisioner_events_total', channel='user:connect')}, event "
            f"errors {counter(replica, 'provisioner_errors_total', where='event')}")


def _never_answered(replica: Replica) -> asyncio.Event:
    """Make every script call of `replica` wait for good, as a call the server leaves
    unanswered does; the event is set once one is made."""
    stuck = asyncio.Event()

    async def unanswered(calls: list[Any]) -> list[Any]:
        stuck.set()
        await asyncio.Event().wait()  # never answered
        raise AssertionError("unreachable")

    replica.scripts.run_many = unanswered  # type: ignore[method-assign]
    return stuck


@contextlib.asynccontextmanager
async def _refusing_writes(aredis: aioredis.Redis,
                           replica: Replica) -> AsyncIterator[asyncio.Task[None]]:
    """`replica` listening (the task yielded) and subscribed, while the server refuses every
    write (maxmemory 1), as out of memory, till the block ends."""
    listening = asyncio.create_task(replica.listen())
    policy = (await aredis.config_get("maxmemory-policy"))["maxmemory-policy"]
    await aredis.config_set("maxmemory-policy", "noeviction")  # refused, never evicted
    await aredis.config_set("maxmemory", 1)
    try:
        # confirmed by the server (`_read`): a message published now reaches the listener
        await asyncio.wait_for(replica.subscribed.wait(), 5)
        yield listening
    finally:
        await aredis.config_set("maxmemory", 0)
        await aredis.config_set("maxmemory-policy", policy)


def _activities(count: int) -> list[tuple[str, Any]]:
    return [("user:activity", {"user_id": f"u{k}", "timestamp": T0 // 1000})
            for k in range(count)]


async def test_the_listener_reads_on_while_the_server_refuses_writes_and_applies_it_all_after(
    aredis: aioredis.Redis, replica: Replica,
) -> None:
    """Out of memory, the server refuses the replica's writes, not its pub/sub. The listener
    held the batch it was applying and read nothing meanwhile: what was published waited in
    the server's output buffer for the subscription (whose limit, 8 MB for a minute by
    default, cuts the subscription and loses it all), and a batch held past 10 s was dropped.
    Now it reads on into its own backlog while it holds the batch, and once the server takes
    writes again every event is applied, in the order published."""
    await _booted(replica, "n1", "n2")
    async with _refusing_writes(aredis, replica) as listening:
        await _publish(aredis, [("user:connect", {"user_id": "alice"}), *_activities(600),
                                ("user:disconnect", {"user_id": "alice"}),
                                ("user:connect", {"user_id": "bob"})])
        await _until(lambda: counter(replica, "provisioner_event_backlog") >= 602 - LISTEN_BATCH)
        # The backlog fills while the first try is on its way: its refusal comes after.
        await _until(lambda: counter(replica, "provisioner_errors_total",
                                     where="event_retry") >= 1)
    await _until(lambda: counter(replica, "provisioner_event_backlog") == 0)
    await _until(lambda: counter(replica, "provisioner_errors_total", where="event") == 0
                 and replica.writes_refused() is None)
    replica.stopping.set()
    await listening
    stats = await aredis.hgetall(replica.keys.key("stats"))
    assert int(stats["activities"]) == 600
    assert await aredis.hget(replica.keys.key("alloc"), "alice") is None
    assert await aredis.hget(replica.keys.key("alloc"), "bob") is not None
    assert int(stats["releases"]) == 1
    assert counter(replica, "provisioner_errors_total", where="event") == 0
    assert await check_invariants(aredis, POOL) == []


@pytest.mark.parametrize("hold_s", [0.3, 5.0])
async def test_a_batch_is_held_for_the_event_hold_and_dropped_past_it(
    aredis: aioredis.Redis, replica: Replica, caplog: pytest.LogCaptureFixture, hold_s: float,
) -> None:
    """--event-hold is how long a batch the server refuses is tried again: here the server
    refuses writes for 1.5 s. It was 10 s whatever was set."""
    _service(replica, event_hold_s=hold_s)
    await aredis.config_set("maxmemory", 1)
    loop = asyncio.get_running_loop()
    loop.call_later(1.5, lambda: asyncio.ensure_future(aredis.config_set("maxmemory", 0)))
    try:
        with caplog.at_level("WARNING", logger="provisioner.service"):
            outcomes = await replica.handle_many([wire("user:connect", {"user_id": "carol"})])
    finally:
        await aredis.config_set("maxmemory", 0)
    waiting = await aredis.hget(replica.keys.key("waiting_since"), "carol")
    if hold_s < 1.5:
        assert outcomes == [None]
        assert waiting is None
        assert "could not apply user:connect of carol (dropped)" in caplog.text, caplog.text
    else:
        assert isinstance(outcomes[0], AllocateResult)
        assert waiting is not None


async def test_a_full_backlog_stops_the_reading_and_the_server_holds_the_rest(
    aredis: aioredis.Redis, replica: Replica, caplog: pytest.LogCaptureFixture,
) -> None:
    """Past --event-backlog messages read and not applied, the listener reads no more (the
    replica's memory is bounded): the server holds the rest in its output buffer, and it is
    all applied once the server takes writes again. Said once, and counted."""
    _service(replica, event_backlog=200)
    async with _refusing_writes(aredis, replica) as listening:
        with caplog.at_level("WARNING", logger="provisioner.service"):
            await _publish(aredis, [*_activities(1500), ("user:connect", {"user_id": "dave"})])
            await _until(lambda: counter(replica, "provisioner_errors_total",
                                         where="event_backlog_full") >= 1)
            await asyncio.sleep(0.3)
            # The batch held, and the backlog no further: the other 1,000 and more are left
            # to the server and the sockets.
            assert 200 <= len(replica._backlog) <= 200 + LISTEN_BATCH
        assert "messages read and not applied (--event-backlog)" in caplog.text, caplog.text
    for _ in range(1000):  # dave's connect, published last, applied
        if await aredis.hget(replica.keys.key("waiting_since"), "dave") is not None:
            break
        await asyncio.sleep(0.01)
    replica.stopping.set()
    await listening
    stats = await aredis.hgetall(replica.keys.key("stats"))
    assert int(stats["activities"]) == 1500
    assert await aredis.hget(replica.keys.key("waiting_since"), "dave") is not None
    assert counter(replica, "provisioner_errors_total", where="event") == 0


async def test_a_replica_stopped_while_refused_ends_and_says_what_it_read_and_dropped(
    aredis: aioredis.Redis, replica: Replica, caplog: pytest.LogCaptureFixture,
) -> None:
    """Stopped while the server refuses its writes, the listener does not hold its backlog
    for --event-hold: it ends at once and says how many messages it read and did not apply
    (every other replica applies them)."""
    async with _refusing_writes(aredis, replica) as listening:
        await _held_connect(aredis, replica, "erin")
        await _publish(aredis, _activities(10))
        await _until(lambda: len(replica._backlog) == 10)
        with caplog.at_level("WARNING", logger="provisioner.service"):
            started = time.monotonic()
            replica.stopping.set()
            await asyncio.wait_for(listening, 5)
        assert time.monotonic() - started < 2
    assert "could not apply user:connect of erin (dropped)" in caplog.text, caplog.text
    assert "stopped with 10 messages read and not applied (dropped)" in caplog.text, caplog.text
    assert counter(replica, "provisioner_event_backlog") == 0


async def test_a_listener_is_subscribed_once_the_server_confirms_not_once_it_asks(
    replica: Replica,
) -> None:
    """redis-py sends SUBSCRIBE and reads its confirmation later, with the messages: the
    listener said subscribed (and /readyz ready) once it had sent it, and a message published
    before the server had it did not reach it (a test's first message, perhaps, in a flaky
    run). It is subscribed once the server has confirmed every channel."""
    class SlowToConfirm:
        def __init__(self) -> None:
            self.confirm = asyncio.Event()
            self.pending: list[dict[str, Any]] = []

        async def subscribe(self, *channels: str) -> None:
            self.pending = [{"type": "subscribe", "pattern": None, "channel": c, "data": i + 1}
                            for i, c in enumerate(channels)]

        async def get_message(self, ignore_subscribe_messages: bool = False,
                              timeout: float = 0.0) -> dict[str, Any] | None:  # noqa: ASYNC109
            if self.confirm.is_set() and self.pending:
                confirmed = self.pending.pop(0)  # as redis-py: read, and dropped if asked to
                return None if ignore_subscribe_messages else confirmed
            await asyncio.sleep(min(timeout, 0.01))
            return None

        async def aclose(self) -> None:
            pass

    stub = SlowToConfirm()
    replica.redis.pubsub = lambda: stub  # type: ignore[method-assign]
    listening = asyncio.create_task(replica.listen())
    try:
        await asyncio.sleep(0.3)
        assert not replica.subscribed.is_set() and len(stub.pending) == 5  # asked, unconfirmed
        stub.confirm.set()
        await asyncio.wait_for(replica.subscribed.wait(), 5)
        assert stub.pending == []
    finally:
        replica.stopping.set()
        await asyncio.wait_for(listening, 5)


async def test_a_probe_behind_a_held_batch_measures_the_hold(
    aredis: aioredis.Redis, replica: Replica,
) -> None:
    """The listener reads a probe while it holds a batch before it: the probe comes back once
    what was published before it is applied, so the lag says how late the events are applied,
    not how soon they are read."""
    async with _refusing_writes(aredis, replica) as listening:
        await _held_connect(aredis, replica, "frank")
        await replica.probe_lag()
        await _until(lambda: len(replica._backlog) == 1)
        await asyncio.sleep(1.0)
        assert replica.event_lag_s() >= 1.0
        assert replica._probes_out
    await _until(lambda: not replica._probes_out)
    assert replica.event_lag_s() >= 1.0  # the probe's own lag, measured when it came back
    await replica.probe_lag()
    await _until(lambda: not replica._probes_out)
    assert replica.event_lag_s() < 0.5
    replica.stopping.set()
    await listening


async def test_a_listener_cancelled_mid_read_ends_with_its_applier_stuck_in_a_call(
    aredis: aioredis.Redis, replica: Replica,
) -> None:
    """run's finally (serve cancelled, an embedding's wait_for) sets stopping and cancels the
    listener at once, mid-read. The cancel ended `_read`, and `listen` then awaited its
    applier with no bound: an applier inside a call the server leaves unanswered (a stall,
    CLIENT PAUSE WRITE; serve's client has no socket timeout unless the URL sets one) held
    the cancelled listener, and run, for as long as the server did."""
    stuck = _never_answered(replica)
    listening = asyncio.create_task(replica.listen())
    try:
        await asyncio.wait_for(replica.subscribed.wait(), 5)
        await _publish(aredis, [("user:connect", {"user_id": "gail"})])
        await asyncio.wait_for(stuck.wait(), 5)
        await asyncio.sleep(0.1)  # the listener back in its read
        replica.stopping.set()
        listening.cancel()
        done, _ = await asyncio.wait({listening}, timeout=2)
        assert done, "the cancelled listener still waits for its applier"
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "apply" and not t.done()]


async def test_the_backlog_gauge_counts_the_batch_held(
    aredis: aioredis.Redis, replica: Replica,
) -> None:
    """provisioner_event_backlog is the messages read and not yet applied: the batch the
    applier holds while the server refuses it (up to 200 of them) was taken out of the
    backlog first and counted nowhere, so under a refusal with less traffic than a batch the
    gauge read 0 all along."""
    async with _refusing_writes(aredis, replica) as listening:
        await _publish(aredis, [("user:connect", {"user_id": "ivan"}), *_activities(9)])
        await _until(lambda: counter(replica, "provisioner_errors_total",
                                     where="event_retry") >= 1)
        assert counter(replica, "provisioner_event_backlog") == 10
    await _until(lambda: counter(replica, "provisioner_event_backlog") == 0)
    replica.stopping.set()
    await listening


async def test_the_backlog_holds_no_more_of_a_message_than_a_payload_may_be(
    aredis: aioredis.Redis, replica: Replica,
) -> None:
    """--event-backlog bounds the messages held, not their bytes: a message past the 4 KiB a
    payload may be, rejected only once applied, was held whole in the backlog while the
    server refused writes: 203 messages of 64 KiB held 13 MB here at --event-backlog 200
    (100,000 of 1 MiB would hold 100 GB), where before the server held them in its output
    buffer and cut the subscription at 32 MB. Only what tells it is too large need be kept."""
    from provisioner.events import MAX_PAYLOAD_BYTES

    _service(replica, event_backlog=200)
    async with _refusing_writes(aredis, replica) as listening:
        await _held_connect(aredis, replica, "judy")
        async with aredis.pipeline(transaction=False) as pipe:
            for _ in range(400):
                pipe.publish("user:activity", "x" * 65536)
            await pipe.execute()
        await _until(lambda: len(replica._backlog) >= 200)
        held = sum(len(data) for _, data, _ in replica._backlog)
        assert held <= len(replica._backlog) * (MAX_PAYLOAD_BYTES + 1), (
            f"{held} bytes held for {len(replica._backlog)} messages")
    await _until(lambda: counter(replica, "provisioner_events_rejected_total",
                                 channel="user:activity", reason="too_large") == 400, 10)
    replica.stopping.set()
    await listening


async def test_a_listener_subscribed_again_behind_its_backlog_still_shows_its_lag(
    aredis: aioredis.Redis, replica: Replica,
) -> None:
    """The backlog outlives a lost subscription now: what was read before it is still to be
    applied after. Subscribing again forgot every probe out and set the lag to 0, those read
    into the backlog among them, which do come back, behind it: a listener 3 s behind read
    as 0 s behind, and /readyz said ready, until a probe sent after it aged past
    --max-event-lag."""
    real = replica.handle_many

    async def slow(messages: Any, read_at: float | None = None) -> Any:
        await asyncio.sleep(1.0)  # a slow apply: 1 s a batch
        return await real(messages, read_at)

    replica.handle_many = slow  # type: ignore[method-assign]
    _service(replica, max_event_lag_s=1.0)
    listening = asyncio.create_task(replica.listen())
    try:
        await asyncio.wait_for(replica.subscribed.wait(), 5)
        await _publish(aredis, _activities(1000))  # 5 batches: 5 s to apply
        await replica.probe_lag()  # read behind them
        await _until(lambda: any(channel in replica._probe_names
                                 for channel, _, _ in replica._backlog))
        await asyncio.sleep(1.5)
        assert replica.event_lag_s() >= 1.5
        await aredis.client_kill_filter(_type="pubsub")
        await _until(lambda: counter(replica, "provisioner_errors_total",
                                     where="subscribe") >= 1)
        await asyncio.wait_for(replica.subscribed.wait(), 5)
        assert replica._backlog  # still behind it
        assert replica.event_lag_s() >= 1.5, replica.event_lag_s()
        assert (await _readyz(replica))[0] == 503
    finally:
        replica.stopping.set()
        await listening


#: The errors a replica cut off gets, the first try's and the later ones': the connection made
#: before the cut times out reading, as a paused server's does; the tries after it connect
#: anew, and cannot; or, behind a hop that takes the connection for the server (a sidecar, a
#: tunnel: a review), every try times out reading.
_REFUSED = RedisConnectionError("Error 110 connecting to redis:6379. Connection timed out.")
_READING = RedisTimeoutError("Timeout reading from redis:6379")
_CONNECTING = RedisTimeoutError("Timeout connecting to server")
_CUTS = {"refused": (_REFUSED, _REFUSED), "timed out reading": (_READING, _REFUSED),
         "timed out connecting": (_CONNECTING, _CONNECTING),
         "every try timed out reading": (_READING, _READING)}


def _cut_off(replica: Replica, cut: dict[str, bool], first: str = "refused") -> list[int]:
    """Cut `replica` from the server while `cut["on"]`: its events' calls and its question
    about the gap (judge_gap) fail as `_CUTS[first]` says. Returns the count of calls of each
    try of events."""
    first_try, later_tries = _CUTS[first]
    run_many, judge_gap = replica.scripts.run_many, replica.scripts.judge_gap
    tries: list[int] = []

    async def partitioned(calls: list[Any]) -> list[Any]:
        tries.append(len(calls))
        if cut["on"]:
            raise first_try if len(tries) == 1 else later_tries
        return await run_many(calls)

    async def asked(*args: int) -> Any:
        if cut["on"]:
            raise later_tries
        return await judge_gap(*args)

    replica.scripts.run_many = partitioned  # type: ignore[method-assign]
    replica.scripts.judge_gap = asked  # type: ignore[method-assign]
    return tries


async def _beating(replicas: list[Replica], every_s: float = 0.05) -> None:
    """The replicas' heartbeats, every `every_s`, until cancelled."""
    while True:
        for replica in replicas:
            await replica.heartbeat()
        await asyncio.sleep(every_s)


async def _cancelled(task: asyncio.Task[Any]) -> None:
    """Cancel `task` until it ends: a cancel can be lost (Python 3.11's `wait_for`, a client
    library's own handling), and a loop that lost one runs on (a clean clone's `.ci/run` once
    waited on a heartbeat loop for over 15 minutes)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()


async def _stop_beating_and_listening(beating: asyncio.Task[None], replica: Replica,
                                      listening: asyncio.Task[None]) -> None:
    await _cancelled(beating)
    replica.stopping.set()
    await listening


async def _server_clock_stepped_past(replica: Replica) -> int:
    """The server's clock stepped 60 s forward (NTP) since the replica's heartbeat, made by
    moving the replica's reading of it (`_server_clock`) back 60 s: the server's time (ms) the
    replica now reads for its heartbeat's."""
    await replica.heartbeat()
    assert replica._server_clock is not None
    server_ms, then = replica._server_clock
    replica._server_clock = (server_ms - 60_000, then)
    return server_ms - 60_000


async def _alice_connected_beside(aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
                                  replica: Replica, monkeypatch: pytest.MonkeyPatch) -> Replica:
    """A mate for `replica` (r2), both beating every 0.1 s if they beat, gaps short
    (`_short_gaps`), two ready nodes, and alice's connect applied by both."""
    _short_gaps(monkeypatch)
    mate = make_replica(aredis, api, clock, "r2")
    for each in (replica, mate):
        _service(each, heartbeat_interval_s=0.1)
    await _booted(mate, "n1", "n2")
    await send([mate, replica], "user:connect", {"user_id": "alice"})
    return mate


async def _alice_back_while_cut_off(aredis: aioredis.Redis, replica: Replica, mate: Replica,
                                    beating: Coroutine[Any, Any, None], first: str,
                                    caplog: pytest.LogCaptureFixture) -> str:
    """Cut `replica` off (`_cut_off`, as `first` says) while it applies alice's disconnect and
    `beating` runs, and have `mate` apply her disconnect and her next connect meanwhile; heal
    the cut 1.5 s on and wait for the replica's batch. Returns the node of alice's new
    session, which the replica's copy of her disconnect must leave alone."""
    cut = {"on": True}
    _cut_off(replica, cut, first)
    beats = asyncio.create_task(beating)
    try:
        with caplog.at_level("WARNING", logger="provisioner.service"):
            held = asyncio.create_task(replica.handle(*wire("user:disconnect",
                                                            {"user_id": "alice"})))
            await send([mate], "user:disconnect", {"user_id": "alice"})
            await send([mate], "user:connect", {"user_id": "alice"})
            node = await aredis.hget(replica.keys.key("alloc"), "alice")
            assert node is not None  # her new session
            await asyncio.sleep(1.5)
            cut["on"] = False
            await asyncio.wait_for(held, 5)
    finally:
        await _cancelled(beats)
    return str(node)


@pytest.mark.parametrize("beats", [False, True], ids=["no heartbeats", "heartbeats"])
@pytest.mark.parametrize("first", list(_CUTS))
async def test_a_replica_cut_off_alone_does_not_end_a_session_begun_since_with_a_held_disconnect(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock, replica: Replica,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, first: str, beats: bool,
) -> None:
    """A replica cut off from the server alone (a partition, its own network) holds the batch
    it was applying and tries it again, while the other replicas apply the same messages and
    those after them. Held for --event-hold, 300 s, where it was 10 s: alice's disconnect,
    held by r1 for 11 s while r2 applied it and then her next connect, ended the session r2
    had begun since (her node freed under her, for the next user in the queue). The payloads
    carry no id ("How replicas cooperate"): held past UNREACHABLE_HOLD_S, the batch is dropped
    once the server answers, as r2's heartbeats say the server served it meanwhile, or, with
    none, as nothing can tell (here held 1.5 s, UNREACHABLE_HOLD_S 0.5 s)."""
    mate = await _alice_connected_beside(aredis, api, clock, replica, monkeypatch)
    if beats:
        await replica.heartbeat()
    node = await _alice_back_while_cut_off(aredis, replica, mate,
                                           _beating([mate] if beats else []), first, caplog)
    assert await aredis.hget(replica.keys.key("alloc"), "alice") == node, (
        "alice's session, begun after her disconnect, was ended by r1's copy of it, held 1.5 s")
    judged = "served" if beats else "unknown"
    assert counter(replica, "provisioner_server_gaps_total", judged=judged) == 1, caplog.text
    if beats:
        assert "this replica was cut off alone" in caplog.text


async def _beating_as_an_older_release(aredis: aioredis.Redis, mate: Replica,
                                       every_s: float = 0.05) -> None:
    """What a heartbeat of the release before `beats` leaves, every `every_s`, until
    cancelled: the replica listed and its entry written (its interval, no `keeps_beats`), and
    no beat kept."""
    while True:
        seconds, micros = await aredis.time()
        await aredis.zadd(mate.keys.key("replicas"),
                          {mate.replica_id: seconds * 1000 + micros // 1000})
        await aredis.hset(mate.keys.key("replica_info"), mate.replica_id,
                          json.dumps({"interval_s": every_s}))
        await asyncio.sleep(every_s)


@pytest.mark.parametrize("mate_runs", ["the release before", "no heartbeats"])
async def test_a_replica_cut_off_beside_one_that_keeps_no_beats_drops_its_held_disconnect(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock, replica: Replica,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, mate_runs: str,
) -> None:
    """A review: r1 cut off alone beside r2, which applied alice's disconnect and her next
    connect and left no beat (a release before `beats`, in a rolling upgrade; or run with
    --heartbeat-interval 0), found no heartbeat in the gap and took it for a pause: its late
    copy of the disconnect ended the session r2 had begun for her. The beats cannot vouch for
    such a pool, and the batch is dropped as nothing can tell."""
    _short_gaps(monkeypatch)
    mate = make_replica(aredis, api, clock, "r2")
    _service(replica, heartbeat_interval_s=0.1)
    await _booted(mate, "n1", "n2")
    await send([mate, replica], "user:connect", {"user_id": "alice"})
    await replica.heartbeat()
    node = await _alice_back_while_cut_off(
        aredis, replica, mate, _beating_as_an_older_release(aredis, mate)
        if mate_runs == "the release before" else _beating([]),
        "every try timed out reading", caplog)
    assert await aredis.hget(replica.keys.key("alloc"), "alice") == node, caplog.text
    assert counter(replica, "provisioner_server_gaps_total", judged="unknown") == 1
    why = ("runs a release that keeps no beats" if mate_runs == "the release before"
           else "applies events with no heartbeat")
    assert f"replica r2 {why}, which could have applied them unseen" in caplog.text


@pytest.mark.parametrize("mate_runs", ["the release before", "no heartbeats"])
async def test_messages_read_within_a_cut_no_heartbeat_can_judge_are_not_applied_late(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock, replica: Replica,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, mate_runs: str,
) -> None:
    """A second review: r1 cut off alone, its subscription still carrying (a hop that takes
    the connection), beside r2 that keeps no beats: the gap is judged unknown. Its held batch
    was dropped, and the messages it read within the cut, alice's disconnect and her next
    connect, which r2 applied in time, were applied once the server answered: the session r2
    had begun for her was ended, and another node handed to her. Those read within a gap
    nothing could judge are dropped with it."""
    _short_gaps(monkeypatch)
    mate = make_replica(aredis, api, clock, "r2")
    _service(replica, heartbeat_interval_s=0.1)
    await _booted(mate, "n1", "n2", "n3", "n4")
    await send([mate, replica], "user:connect", {"user_id": "alice"})
    first = await aredis.hget(replica.keys.key("alloc"), "alice")
    await replica.heartbeat()
    cut = {"on": True}
    tries = _cut_off(replica, cut, "every try timed out reading")
    listening = asyncio.create_task(replica.listen())
    beating = asyncio.create_task(_beating_as_an_older_release(aredis, mate)
                                  if mate_runs == "the release before" else _beating([]))
    try:
        with caplog.at_level("WARNING", logger="provisioner.service"):
            await asyncio.wait_for(replica.subscribed.wait(), 5)
            await _publish(aredis, [("user:connect", {"user_id": "bob"})])
            await _until(lambda: len(tries) >= 1)
            await send([mate], "user:connect", {"user_id": "bob"})
            await asyncio.sleep(0.3)  # the cut under way
            await _publish(aredis, [("user:disconnect", {"user_id": "alice"}),
                                    ("user:connect", {"user_id": "alice"})])
            await send([mate], "user:disconnect", {"user_id": "alice"})
            await send([mate], "user:connect", {"user_id": "alice"})
            now = await aredis.hget(replica.keys.key("alloc"), "alice")
            assert now is not None and now != first
            await _until(lambda: sum("alice" in str(data)
                                     for _, data, _ in replica._backlog) == 2)
            await asyncio.sleep(1.5)
            # The hold long again at the answer, as 10 s is against a cut of seconds: alice's
            # messages, read 1.5 s before it, are not dropped as read too long ago
            import provisioner.service as service

            monkeypatch.setattr(service, "UNREACHABLE_HOLD_S", 30.0)
            cut["on"] = False
            await _until(lambda: not replica._backlog and not replica._taken)
            await asyncio.sleep(0.3)
    finally:
        await _stop_beating_and_listening(beating, replica, listening)
    assert counter(replica, "provisioner_server_gaps_total", judged="unknown") == 1, caplog.text
    assert await aredis.hget(replica.keys.key("alloc"), "alice") == now, caplog.text
    assert "could not apply user:disconnect of alice (dropped): read before or within a gap" \
        in caplog.text


async def test_a_cut_across_a_step_of_the_server_s_clock_is_not_taken_for_a_pause(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock, replica: Replica,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A second review: the server's clock stepped 60 s forward (NTP) just before r1 was cut
    off. r1 reads the server's clock by its last heartbeat carried on by its own monotonic
    clock, so the gap it asked about lay 60 s back, among no beats, and r2's beats through
    the cut were not in it: a pause, and alice's disconnect applied late. The server's clock
    moving 60 s more than r1's in the gap says no beat can place it: dropped, as unknown.
    (The step is made by moving r1's reading back 60 s; a beat 60 s back puts the pool's
    heartbeats before the gap.)"""
    mate = await _alice_connected_beside(aredis, api, clock, replica, monkeypatch)
    server_ms = await _server_clock_stepped_past(replica)
    await aredis.zadd(replica.keys.key("beats"), {f"r1@{server_ms}": server_ms})
    node = await _alice_back_while_cut_off(aredis, replica, mate, _beating([mate]),
                                           "every try timed out reading", caplog)
    assert await aredis.hget(replica.keys.key("alloc"), "alice") == node, caplog.text
    assert counter(replica, "provisioner_server_gaps_total", judged="unknown") == 1
    assert "the server's clock moved 6" in caplog.text, caplog.text


@pytest.mark.parametrize("gap_s", [6.0, 12.0])
async def test_a_gap_no_heartbeat_can_judge_drops_what_was_read_within_it_or_long_before(
    replica: Replica, gap_s: float,
) -> None:
    """The messages a gap judged unknown drops, by when they were read: within the gap (in a
    cut, copies of what the others applied while this replica could not), and, for a gap
    longer than UNREACHABLE_HOLD_S, those read that long before the answer (late past any hold
    for a server that cannot be reached, as before gaps were judged; a third review: dropped
    after a blip too, a listener behind lost its backlog); not those read just before the gap,
    nor at its edges, where a paused server's messages come (sent as it stopped, and as it
    came back: after the answered question's sending less GAP_ASK_MAX_S). Here the gap began
    `gap_s` before the answer (no heartbeat yet: judged unknown at once)."""
    import provisioner.service as service

    answered = time.monotonic()
    gap_at = answered - gap_s
    read = {"long before": answered - service.UNREACHABLE_HOLD_S - 1, "just before": gap_at - 1,
            "at its start": gap_at + service.GAP_READ_EDGE_S / 2, "within": gap_at + 1,
            "at its end": answered - service.GAP_ASK_MAX_S + 0.2, "after": answered + 1}
    # in the backlog, as they would be (a span no message still waits in is forgotten)
    replica._backlog.extend((b"user:connect", b"{}", at) for at in sorted(read.values()))
    dropped = await replica._past_a_gap(gap_at, answered + 300, 1)
    assert dropped is not None
    assert counter(replica, "provisioner_server_gaps_total", judged="unknown") == 1
    long_gap = gap_s > service.UNREACHABLE_HOLD_S  # and so its start over 10 s before too
    assert {when: replica._dropped_read(at) for when, at in read.items()} == {
        "long before": long_gap, "just before": long_gap, "at its start": long_gap,
        "within": True, "at its end": False, "after": False}


@contextlib.asynccontextmanager
async def _r1_behind_a_hop(aredis: aioredis.Redis, redis_url: str, api: FakeNodeApi,
                           clock: ManualClock, both_ways: bool = False,
                           ) -> AsyncIterator[tuple[_HoldingHop, Replica, Replica]]:
    """r1 on a client through a `_HoldingHop` (giving up after 0.3 s), r2 on `aredis`, both
    beating every 0.1 s, with three nodes booted; the hop and r1's client closed at the end."""
    from urllib.parse import urlparse

    parts = urlparse(redis_url)
    hop = _HoldingHop(parts.hostname or "127.0.0.1", parts.port or 6379, both_ways=both_ways)
    port = await hop.start()
    via = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}{parts.path or '/0'}",
                                  socket_timeout=0.3, socket_connect_timeout=0.3)
    try:
        r1 = make_replica(via, api, clock, "r1")
        mate = make_replica(aredis, api, clock, "r2")
        for each in (r1, mate):
            _service(each, heartbeat_interval_s=0.1)
        await _booted(mate, "n1", "n2", "n3")
        yield hop, r1, mate
    finally:
        await via.aclose()
        assert hop.server is not None
        hop.server.close()


class _HoldingHop:
    """A TCP hop in front of the server (a second review's). While `cut`, what the client
    sends is held, not lost, as TCP resends what a socket sent until the path heals, even
    after the client closed it (Linux resends an orphaned socket's data for about 100 s), and
    new connections are refused, as dropped SYNs fail a connect. Healed, the held bytes go on
    to the server, which runs them."""

    def __init__(self, host: str, port: int, both_ways: bool = False) -> None:
        # both_ways: what the server sends is held too (a partition: its subscriptions'
        # messages come once it heals, as TCP resends them)
        self.host, self.port, self.cut, self.both_ways = host, port, False, both_ways
        self._healed = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def heal(self) -> None:
        self.cut = False
        self._healed.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.close()
            return
        up_r, up_w = await asyncio.open_connection(self.host, self.port)

        async def down() -> None:
            with contextlib.suppress(Exception):
                while data := await up_r.read(65536):
                    if self.cut and self.both_ways:
                        await self._healed.wait()
                    writer.write(data)
                    await writer.drain()

        pump = asyncio.create_task(down())
        try:
            while data := await reader.read(65536):
                if self.cut:
                    await self._healed.wait()  # held till the path heals
                up_w.write(data)
                await up_w.drain()
            await asyncio.sleep(0.2)  # the server runs what came, then the close
        finally:
            pump.cancel()
            up_w.close()
            writer.close()


async def test_a_try_the_network_delivers_as_a_cut_heals_is_not_applied(
    aredis: aioredis.Redis, redis_url: str, api: FakeNodeApi, clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A second review: r1 cut off by a partition that drops packets, while r2 applied alice's
    disconnect and her next connect and beat. r1's first try of her disconnect, sent on the
    connection it had, timed out (0.3 s here) and was closed, but the network held it; the
    path healed 1.5 s on, it reached the server and ran, ending her new session, though r1
    judged the gap a cut and dropped the batch (the release before had it too). Each try now
    says until when its replica waits for it, and the pool refuses it later."""
    _short_gaps(monkeypatch)
    async with _r1_behind_a_hop(aredis, redis_url, api, clock) as (hop, r1, mate):
        await send([mate, r1], "user:connect", {"user_id": "alice"})
        await r1.heartbeat()
        beating = asyncio.create_task(_beating([mate]))
        try:
            with caplog.at_level("WARNING", logger="provisioner.service"):
                hop.cut = True
                held = asyncio.create_task(r1.handle(*wire("user:disconnect",
                                                           {"user_id": "alice"})))
                await asyncio.sleep(0.05)
                await send([mate], "user:disconnect", {"user_id": "alice"})
                await send([mate], "user:connect", {"user_id": "alice"})
                node = await aredis.hget(mate.keys.key("alloc"), "alice")
                assert node is not None
                await asyncio.sleep(1.5)
                hop.heal()
                await asyncio.wait({held}, timeout=10)
                assert held.done(), "r1's batch still held 10 s after the cut healed"
                await asyncio.sleep(0.5)
        finally:
            await _cancelled(beating)
    assert await aredis.hget(mate.keys.key("alloc"), "alice") == node, caplog.text
    assert counter(r1, "provisioner_server_gaps_total", judged="served") == 1


@pytest.mark.xfail(strict=True, reason="the known hole (docs/improvements.md): a subscription "
                   "that outlives a cut brings late copies no gap judges; a fix tried in "
                   "session 75 was reverted after a review proved it lost connects")
async def test_a_subscription_that_outlives_a_cut_brings_no_late_copy_to_apply(
    aredis: aioredis.Redis, redis_url: str, api: FakeNodeApi, clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A helper's drill (session 74): r1 cut off both ways by a partition that holds the bytes
    (TCP resends them), its subscription outliving the cut, while r2 applied alice's
    disconnect and her next connect, and beat. r1 reads nothing in the cut, so it holds no
    batch and judges no gap; healed, its subscription brings both messages late, and the
    disconnect ends her new session, the connect handing her another node (n3 where she held
    n2). Expected to fail until that is mended: strict, so a change that mends it says so."""
    _short_gaps(monkeypatch)
    async with _r1_behind_a_hop(aredis, redis_url, api, clock, both_ways=True) as (
            hop, r1, mate):
        listening = asyncio.create_task(r1.listen())
        beating = asyncio.create_task(_beating([mate]))
        r1_beating = asyncio.create_task(r1._every(0.1, r1.heartbeat, "heartbeat"))
        try:
            await asyncio.wait_for(r1.subscribed.wait(), 5)
            await r1.heartbeat()

            async def both(channel: str) -> None:  # r2 applies it, and r1 reads it
                await send([mate], channel, {"user_id": "alice"})
                await aredis.publish(channel, json.dumps({"user_id": "alice"}))

            await both("user:connect")
            await _until(lambda: counter(r1, "provisioner_events_total",
                                         channel="user:connect") == 1
                         and not r1._backlog and not r1._taken)
            with caplog.at_level("WARNING", logger="provisioner.service"):
                hop.cut = True
                await asyncio.sleep(0.6)  # r1's heartbeats time out (0.3 s)
                await both("user:disconnect")
                await both("user:connect")
                node = await aredis.hget(mate.keys.key("alloc"), "alice")
                assert node is not None
                await asyncio.sleep(0.6)  # the gap past UNREACHABLE_HOLD_S (0.5 s here)
                hop.heal()
                await asyncio.sleep(2.0)  # r1 reads the late copies, and applies or drops them
        finally:
            await _cancelled(beating)
            await _cancelled(r1_beating)
            r1.stopping.set()
            await asyncio.wait({listening}, timeout=5)
            await _cancelled(listening)
    # her session, as r2 began it: r1's late copies neither ended it nor began another
    assert await aredis.hget(mate.keys.key("alloc"), "alice") == node, caplog.text


class _SlowListApi(FakeNodeApi):
    """A Node API whose list of nodes takes `list_s` (a cloud API's list: seconds)."""

    def __init__(self, list_s: float) -> None:
        super().__init__()
        self.list_s = list_s

    async def list_nodes(self) -> list[Any] | None:
        await asyncio.sleep(self.list_s)
        return await super().list_nodes()


class _Repointed:
    """A TCP hop to whichever server `port` names now: a restart on a port of its own, where
    one on the same port could find it taken meanwhile by another test's process (the tests
    run side by side). A connection that cannot reach the server is closed at once, as a
    refused connect fails, and one whose server went is closed with it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            writer.close()
            return

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()

        pumps = [asyncio.create_task(pump(reader, up_writer)),
                 asyncio.create_task(pump(up_reader, writer))]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
        up_writer.close()
        writer.close()


@pytest.mark.engine  # starts the engine under test itself, to restart it
@pytest.mark.parametrize(("interval_s", "list_s", "hold_s"),
                         [(2.0, 2.0, 0.5), (5.0, 4.0, 0.5), (2.0, 2.0, 10.0)],
                         ids=["heartbeat 2s", "heartbeat 5s", "every setting production's"])
async def test_a_restart_drops_no_connect_published_after_it(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        interval_s: float, list_s: float, hold_s: float) -> None:
    """A review of a fix tried in session 75 (the heartbeat judging the gaps it could not reach
    the server in, and the listener's messages read since waiting for its verdict), reverted:
    the server restarted (no persistence: the pool's state and its beats lost) after a gap
    past UNREACHABLE_HOLD_S; the heartbeat got through, waited for its take-back, then judged
    'unknown' (no beat before the gap), or 'served' from its own beat with heartbeats 5 s
    apart, and bob's connect, published to the restarted server after the listener subscribed
    again, was dropped: on every replica alike. Kept for any next try at that hole."""
    import os

    import provisioner.service as service
    from provisioner.redis_server import start_server

    monkeypatch.setattr(service, "UNREACHABLE_HOLD_S", hold_s)
    # the listener's retry lands soon after the server is back (its backoff is 1 s at most)
    monkeypatch.setattr(service, "SUBSCRIBE_BACKOFF_MAX_S", 0.2)
    binary = os.environ.get("PROVISIONER_TEST_REDIS_BINARY")
    server = start_server(binary)
    hop = _Repointed(server.port)
    url = f"redis://127.0.0.1:{await hop.start()}/0"
    client = aioredis.Redis.from_url(url, socket_timeout=0.3, socket_connect_timeout=0.3)
    replica = Replica(client, ServiceConfig("redis://x", "http://api", pool="restarted",
                                            replica_id="r1", heartbeat_interval_s=interval_s),
                      PoolConfig(min_ready=0, scaling_policy="heuristic"), _SlowListApi(list_s),
                      metrics=Metrics())
    listening = asyncio.create_task(replica.listen())
    beating = asyncio.create_task(replica._every(interval_s, replica.heartbeat, "heartbeat"))
    reader: aioredis.Redis | None = None
    waiting: list[Any] = []
    try:
        await asyncio.wait_for(replica.subscribed.wait(), 5)
        await _until(lambda: replica._server_clock is not None)
        with caplog.at_level("WARNING", logger="provisioner.service"):
            server.stop()  # a restart: every connection refused until it is back
            await _until(lambda: counter(replica, "provisioner_errors_total",
                                         where="heartbeat") >= 1, 8)  # a turn failed
            await asyncio.sleep(hold_s + 0.3)  # past UNREACHABLE_HOLD_S
            server = start_server(binary)  # empty: no persistence
            hop.port = server.port
            reader = aioredis.Redis.from_url(url)
            # the heartbeat got through (the state lost: its take-back waits for the list),
            # and the listener subscribed again: bob connects
            await _until(lambda: replica._taking_back and replica.subscribed.is_set(), 5)
            assert await reader.publish("user:connect", json.dumps({"user_id": "bob"})) == 1
            await asyncio.sleep(list_s + 1.0)  # the take-back, and the applier
    finally:
        replica.stopping.set()
        await _cancelled(beating)
        await asyncio.wait({listening}, timeout=5)
        await _cancelled(listening)
        await client.aclose()
        if reader is not None:
            waiting = await reader.zrange(replica.keys.key("waiting"), 0, -1)
            await reader.aclose()
        server.stop()
        assert hop.server is not None
        hop.server.close()
    assert waiting == [b"bob"], caplog.text


async def test_heartbeats_answered_late_by_a_slow_server_lose_no_connect(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """The same review: a slow server (latency past the client's timeout for a while) runs
    every call, late, so the replicas' heartbeats time out at the client though each ran and
    was kept in `beats`. The fix tried took each timeout for a cut, held what its listener
    read, and judge_gap found beats in the gap (the replicas' own, from the heartbeats that
    timed out) and said served on every replica: bob's connect, read by both, was dropped by
    both. Kept for any next try: a timeout is no proof of a cut."""
    from redis.exceptions import TimeoutError as RedisTimeoutError

    _short_gaps(monkeypatch)
    r1 = make_replica(aredis, api, clock, "r1")
    r2 = make_replica(aredis, api, clock, "r2")
    slow = {"on": False}
    turns = []
    for each in (r1, r2):
        _service(each, heartbeat_interval_s=0.1)

        async def late(ran: Any = each.heartbeat) -> None:
            await ran()  # it runs on the server...
            if slow["on"]:  # ...and its reply comes after the client's timeout
                raise RedisTimeoutError("Timeout reading from the server")

        turns.append(late)
    tasks = [asyncio.create_task(each.listen()) for each in (r1, r2)]
    tasks += [asyncio.create_task(each._every(0.1, turn, "heartbeat"))
              for each, turn in zip((r1, r2), turns, strict=True)]
    try:
        for each in (r1, r2):
            await asyncio.wait_for(each.subscribed.wait(), 5)
        await asyncio.sleep(0.3)
        with caplog.at_level("WARNING", logger="provisioner.service"):
            slow["on"] = True
            await asyncio.sleep(0.4)
            await aredis.publish("user:connect", json.dumps({"user_id": "bob"}))
            await asyncio.sleep(0.4)  # the slowness past UNREACHABLE_HOLD_S (0.5 s here)
            slow["on"] = False
            await asyncio.sleep(1.0)
    finally:
        for each in (r1, r2):
            each.stopping.set()
        for task in tasks:
            await asyncio.wait({task}, timeout=5)
            await _cancelled(task)
    assert await aredis.zrange(r1.keys.key("waiting"), 0, -1) == ["bob"], caplog.text


async def test_a_try_refused_as_late_while_its_replica_waits_is_made_again_in_time(
    aredis: aioredis.Redis, replica: Replica, caplog: pytest.LogCaptureFixture,
) -> None:
    """A try's deadline is set by the replica's reading of the server's clock; the server's
    clock stepped forward past it since the last heartbeat, so the pool refuses a try the
    replica still waits for. It is not dropped: the replica reads the clock again, and the
    next try goes through. (The step is made by moving the replica's reading back 60 s.)"""
    await _booted(replica, "n1")
    await _server_clock_stepped_past(replica)
    with caplog.at_level("WARNING", logger="provisioner.service"):
        await replica.handle(*wire("user:connect", {"user_id": "ana"}))
    assert await aredis.hget(replica.keys.key("alloc"), "ana") == "n1", caplog.text
    assert "the server's clock moved from this replica's reading of it" in caplog.text
    assert counter(replica, "provisioner_errors_total", where="event") == 0


async def test_a_try_refused_as_late_before_a_call_that_ran_is_made_again_not_dropped(
    aredis: aioredis.Redis, replica: Replica, clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A third review: a try refused as late (the server's clock stepped past the replica's
    reading of it) with an activity after it in its batch, which ran (no deadline), was taken
    for a call refused before one that ran, and dropped: ana never got a node. It never ran,
    so it is made again, with the activity after it, which changes nothing the second time.
    (The step is made by moving the replica's reading back 60 s.)"""
    await _booted(replica, "n1")
    await _server_clock_stepped_past(replica)
    with caplog.at_level("WARNING", logger="provisioner.service"):
        await replica.handle_many([
            wire("user:connect", {"user_id": "ana"}),
            wire("user:activity", {"user_id": "bob", "timestamp": clock.now_ms() // 1000})])
    assert await aredis.hget(replica.keys.key("alloc"), "ana") == "n1", caplog.text
    assert counter(replica, "provisioner_errors_total", where="event") == 0


async def test_a_question_the_network_held_does_not_end_the_span_dropped_long_before_the_heal(
    replica: Replica,
) -> None:
    """A fourth review: a cut judged unknown, its answered question held by the network and
    answered as the cut healed, 3 s after it was sent (within the client's 5 s). The span
    dropped ended 1 s before the question's sending, and a copy read in the cut 0.5 s before
    it, 3.5 s before the heal, was applied late. It ends at the answer less the end edge, if
    that is later."""
    await replica.heartbeat()
    await asyncio.sleep(2.7)  # the cut begins after this replica's last beat
    judge_gap = replica.scripts.judge_gap

    async def held_by_the_network(*args: int) -> Any:
        await asyncio.sleep(3.0)
        return await judge_gap(*args)

    replica.scripts.judge_gap = held_by_the_network  # type: ignore[method-assign]
    now = time.monotonic()
    within = now - 0.5  # read in the cut: a copy of what the others applied meanwhile
    replica._backlog.append((b"user:connect", b"{}", within))
    assert await replica._past_a_gap(now - 2.0, now + 300, 1) is not None
    assert counter(replica, "provisioner_server_gaps_total", judged="unknown") == 1
    assert replica._dropped_read(within), replica._drop_reads


async def test_a_batch_held_through_a_gap_in_which_the_server_served_no_one_is_applied(
    aredis: aioredis.Redis, replica: Replica, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The twin of the cut: r1 cannot reach the server for 1.5 s, and neither can anyone (no
    replica beats meanwhile, though r1 beat before). Its batch, bob's connect, is applied once
    the server answers, and the messages read behind it after (here past UNREACHABLE_HOLD_S's
    0.5 s)."""
    _short_gaps(monkeypatch)
    _service(replica, heartbeat_interval_s=0.1)
    await _booted(replica, "n1", "n2")
    await replica.heartbeat()
    cut = {"on": True}
    tries = _cut_off(replica, cut, "every try timed out reading")
    held = asyncio.create_task(replica.handle(*wire("user:connect", {"user_id": "bob"})))
    await asyncio.sleep(1.5)
    assert not held.done() and len(tries) > 1
    cut["on"] = False
    await asyncio.wait_for(held, 5)
    assert await aredis.hget(replica.keys.key("alloc"), "bob") is not None
    assert counter(replica, "provisioner_server_gaps_total", judged="pause") == 1
    await replica.handle(*wire("user:connect", {"user_id": "cleo"}))
    assert await aredis.hget(replica.keys.key("alloc"), "cleo") is not None


@pytest.mark.parametrize("beats", [False, True], ids=["no heartbeats", "heartbeats"])
async def test_the_messages_read_before_a_cut_off_replica_got_back_are_dropped_behind_its_batch(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock, replica: Replica,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, beats: bool,
) -> None:
    """The batch held through a gap in which the server served the others is dropped, and
    so is every message read before the replica got back: its first try would go through and
    apply it late (before, each was tried once past its own UNREACHABLE_HOLD_S, and dropped
    only while the cut lasted). Here zed's connect, read behind alice's held disconnect, is
    not applied by r1 once it gets back; a message read after is. With no heartbeats to judge
    by, each batch is held and dropped on its own, as before gaps were judged."""
    _short_gaps(monkeypatch)
    mate = make_replica(aredis, api, clock, "r2")
    for each in (replica, mate):
        _service(each, heartbeat_interval_s=0.1)
    await _booted(mate, "n1", "n2", "n3")
    await send([mate, replica], "user:connect", {"user_id": "alice"})
    if beats:
        await replica.heartbeat()
    cut = {"on": True}
    tries = _cut_off(replica, cut)
    listening = asyncio.create_task(replica.listen())
    beating = asyncio.create_task(_beating([mate] if beats else []))
    try:
        with caplog.at_level("WARNING", logger="provisioner.service"):
            await asyncio.wait_for(replica.subscribed.wait(), 5)
            await _publish(aredis, [("user:disconnect", {"user_id": "alice"})])
            await _until(lambda: len(tries) >= 1)
            await _publish(aredis, [("user:connect", {"user_id": "zed"})])
            await _until(lambda: any("zed" in str(data) for _, data, _ in replica._backlog))
            await asyncio.sleep(1.5)
            cut["on"] = False
            await _until(lambda: not replica._backlog and not replica._taken)
            await _publish(aredis, [("user:connect", {"user_id": "yuki"})])
            await _until(lambda: counter(replica, "provisioner_connects_total") >= 1)
    finally:
        await _stop_beating_and_listening(beating, replica, listening)
    assert await aredis.hget(replica.keys.key("alloc"), "zed") is None
    assert await aredis.hget(replica.keys.key("alloc"), "yuki") is not None
    # with no heartbeats zed's batch is judged on its own, tried while the cut lasts
    assert ("could not apply user:connect of zed (dropped): read before or within a gap"
            in caplog.text) is beats, caplog.text


async def test_no_message_is_applied_later_than_the_event_hold_after_it_was_read(
    aredis: aioredis.Redis, replica: Replica, caplog: pytest.LogCaptureFixture,
) -> None:
    """--event-hold bounds how long a batch the server refuses is tried again, from the
    batch's first try: the messages read behind it waited in the backlog uncounted, and each
    batch taken from it got a hold of its own. So under a refusal that outlasts the hold,
    every batch but the few the hold ran out on is applied as late as the refusal lasts (an
    hour's, with the defaults: 12 batches of 200 dropped, the rest of a full backlog applied
    an hour late, past the hour the setting's own range calls misleading). Here the hold is
    0.5 s, and dave's connect, read at once behind 400 activities, was applied over 1.5 s
    after it was read."""
    _service(replica, event_hold_s=0.5)
    async with _refusing_writes(aredis, replica) as listening:
        await _held_connect(aredis, replica, "erin")
        read = time.monotonic()
        with caplog.at_level("WARNING", logger="provisioner.service"):
            await _publish(aredis, [*_activities(400), ("user:connect", {"user_id": "dave"})])
            await _until(lambda: len(replica._backlog) >= 200)
            # till dave's batch, the last, is tried: past its own hold of 0.5 s, but 1.5 s
            # after dave's connect was read
            await _until(lambda: not replica._backlog)
            await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)
    applied = await aredis.hget(replica.keys.key("waiting_since"), "dave")
    replica.stopping.set()
    await listening
    assert applied is None, (
        f"dave's connect, read {time.monotonic() - read:.1f}s ago, was applied with an "
        "event hold of 0.5s")
    assert "could not apply user:connect of dave (dropped)" in caplog.text, caplog.text



async def test_a_message_read_late_into_a_batch_is_held_from_its_own_reading(
    aredis: aioredis.Redis, replica: Replica,
) -> None:
    """A batch the applier takes from the backlog may hold messages read far apart, and its
    hold ran from its first message's reading: with --event-hold 2 s, bob's connect, read
    1.2 s after xavier's, was taken with it once erin's batch before them was dropped, and
    dropped with it at xavier's deadline, held some 0.6 s of its 2: the server took writes
    again 1 s after bob's connect was read, and bob never got a node."""
    _service(replica, event_hold_s=2.0)
    async with _refusing_writes(aredis, replica) as listening:
        await _held_connect(aredis, replica, "erin")
        started = time.monotonic()
        await _publish(aredis, [("user:connect", {"user_id": "xavier"})])
        await asyncio.sleep(1.2 - (time.monotonic() - started))
        assert replica._taken, "erin's batch still held"
        await _publish(aredis, [("user:connect", {"user_id": "bob"})])
        bob_read = time.monotonic()
        await asyncio.sleep(1.0)
    refused_for = time.monotonic() - bob_read
    await _until(lambda: counter(replica, "provisioner_event_backlog") == 0)
    await asyncio.sleep(0.2)
    replica.stopping.set()
    await listening
    assert refused_for < 1.5
    assert await aredis.hget(replica.keys.key("waiting_since"), "xavier") is None
    assert await aredis.hget(replica.keys.key("waiting_since"), "bob") is not None, (
        f"bob's connect, refused {refused_for:.2f}s after it was read, was dropped with an "
        "event hold of 2s")

async def test_a_question_asked_while_the_server_cannot_be_reached_is_held_no_longer_than_a_batch(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock, replica: Replica,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch the server cannot be reached for is tried UNREACHABLE_HOLD_S at most, whatever
    --event-hold: a replica cut off alone applies late what the others applied in time. The
    question about a call whose reply was lost (`_ask_again_refused`) was asked till the
    batch's --event-hold (300 s) while the server could not be reached, holding the applier
    with it: carol's disconnect, read behind that batch, waited it out and was applied once
    the server was reached again, 1.5 s on (UNREACHABLE_HOLD_S 0.5 s here), ending the
    session r2 had begun for her since."""
    import provisioner.service as service

    monkeypatch.setattr(service, "UNREACHABLE_HOLD_S", 0.5)
    mate = make_replica(aredis, api, clock, "r2")
    await _booted(mate, "n1", "n2", "n3")
    for user in ("alice", "carol"):
        await send([mate, replica], "user:connect", {"user_id": user})
    oom = OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
    run_many = replica.scripts.run_many
    sent: list[int] = []
    cut = {"on": False}

    async def partitioned(calls: list[Any]) -> list[Any]:
        sent.append(len(calls))
        if len(sent) == 1:  # alice's disconnect and bob's connect run; the reply is lost
            await run_many(calls)
            await aredis.publish("user:disconnect", json.dumps({"user_id": "carol"}))
            raise RedisTimeoutError("Timeout reading from socket")
        if len(sent) == 2:  # made again: alice's refused for now, bob's answered
            cut["on"] = True
            return [oom] + await run_many(calls[1:])
        if cut["on"]:
            raise RedisConnectionError("Error 110 connecting to redis:6379. Connection timed out.")
        return await run_many(calls)

    replica.scripts.run_many = partitioned  # type: ignore[method-assign]
    listening = asyncio.create_task(replica.listen())
    try:
        await asyncio.wait_for(replica.subscribed.wait(), 5)
        await _publish(aredis, [("user:disconnect", {"user_id": "alice"}),
                                ("user:connect", {"user_id": "bob"})])
        await _until(lambda: cut["on"])
        await _until(lambda: any("carol" in str(data) for _, data, _ in replica._backlog)
                     or len(sent) > 3)
        # r2 applies carol's disconnect in time, and her next connect
        await send([mate], "user:disconnect", {"user_id": "carol"})
        await send([mate], "user:connect", {"user_id": "carol"})
        node = await aredis.hget(replica.keys.key("alloc"), "carol")
        assert node is not None
        await asyncio.sleep(1.5)
        cut["on"] = False
        await _until(lambda: not replica._backlog and not replica._taken)
        await asyncio.sleep(0.2)
    finally:
        replica.stopping.set()
        await listening
    assert sent[0] == 2, sent
    assert await aredis.hget(replica.keys.key("alloc"), "carol") == node, (
        "carol's session, begun after her disconnect, was ended by r1's copy of it, applied "
        "1.5 s late behind a question held while the server could not be reached")


async def test_a_listener_cancelled_at_its_stop_counts_the_batch_cut_off_mid_call(
    aredis: aioredis.Redis, replica: Replica, caplog: pytest.LogCaptureFixture,
) -> None:
    """Stopping, the listener applies what it read; run's grace cancels it if a call is left
    unanswered (a stall, CLIENT PAUSE WRITE). It said "stopped with 3 messages read and not
    applied": the 5 in the batch cut off mid-call, gail's connect among them, were taken out
    of the backlog and counted nowhere, whether they were applied unknown and unsaid."""
    stuck = _never_answered(replica)
    listening = asyncio.create_task(replica.listen())
    try:
        await asyncio.wait_for(replica.subscribed.wait(), 5)
        await _publish(aredis, [("user:connect", {"user_id": "gail"}), *_activities(4)])
        await asyncio.wait_for(stuck.wait(), 5)
        assert len(replica._taken) == 5
        await _publish(aredis, _activities(3))
        await _until(lambda: len(replica._backlog) == 3)
        with caplog.at_level("WARNING", logger="provisioner.service"):
            replica.stopping.set()
            await asyncio.sleep(0.7)  # the reading ends; the applier still waits
            listening.cancel()  # run's grace
            await asyncio.gather(listening, return_exceptions=True)
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
    assert "stopped with 3 messages read and not applied (dropped)" in caplog.text, caplog.text
    assert "stopped with 5 more in a batch cut off mid-call" in caplog.text, caplog.text


async def test_a_replica_stopped_while_the_server_cannot_be_reached_ends_and_says_what_it_read(
    aredis: aioredis.Redis, replica: Replica, caplog: pytest.LogCaptureFixture,
) -> None:
    """Stopped while the server refuses its writes, the listener ends at once and says how
    many messages it read and did not apply. Stopped while it cannot reach the server
    (refused connections: a server down), it tried every batch of its backlog once, each
    refused at connect, and logged each connect in it as "may have been applied by a try
    whose reply was lost ... check before repairing it": 1,000 lines here for 1,000 messages
    (up to --event-backlog, 100,000), each asking an operator to check a connect that never
    reached the server."""
    run_many = replica.scripts.run_many
    tries: list[int] = []
    down = asyncio.Event()

    async def refused(calls: list[Any]) -> list[Any]:
        tries.append(len(calls))
        if down.is_set():
            raise RedisConnectionError("Error 111 connecting to redis:6379. Connection refused.")
        return await run_many(calls)

    replica.scripts.run_many = refused  # type: ignore[method-assign]
    gate = asyncio.Event()
    handle_many = replica.handle_many

    async def held(messages: Any, read_at: float | None = None) -> Any:
        await gate.wait()
        return await handle_many(messages, read_at)

    replica.handle_many = held  # type: ignore[method-assign]
    listening = asyncio.create_task(replica.listen())
    await asyncio.wait_for(replica.subscribed.wait(), 5)
    await _publish(aredis, [("user:connect", {"user_id": f"c{k}"}) for k in range(1000)])
    # The applier holds its first batch at the gate; the rest read behind it.
    await _until(lambda: bool(replica._taken)
                 and len(replica._backlog) + len(replica._taken) == 1000)
    taken = len(replica._taken)
    down.set()
    with caplog.at_level("WARNING", logger="provisioner.service"):
        replica.stopping.set()
        gate.set()
        await asyncio.wait_for(listening, 10)
    assert len(tries) == 1, tries
    assert caplog.text.count("may have been applied") <= taken, caplog.text.count(
        "may have been applied")
    assert f"stopped with {1000 - taken} messages read and not applied" in caplog.text


async def test_the_retry_warning_says_how_long_a_batch_the_server_cannot_be_reached_for_is_held(
    replica: Replica, caplog: pytest.LogCaptureFixture,
) -> None:
    """A batch the server cannot be reached for is held UNREACHABLE_HOLD_S (10 s) at most;
    the warning said "trying again for up to 300s" (--event-hold's), 30 times too long."""
    run_many = replica.scripts.run_many
    cut = {"on": True}

    async def partitioned(calls: list[Any]) -> list[Any]:
        if cut["on"]:
            raise RedisConnectionError("Error 110 connecting to redis:6379. Connection timed out.")
        return await run_many(calls)

    replica.scripts.run_many = partitioned  # type: ignore[method-assign]
    asyncio.get_running_loop().call_later(0.3, lambda: cut.update(on=False))
    with caplog.at_level("WARNING", logger="provisioner.service"):
        await replica.handle_many([wire("user:connect", {"user_id": "kim"})])
    assert "trying again for up to 10s" in caplog.text, caplog.text


# --- the listener's lag ---------------------------------------------------------------------


async def _until(condition: Any, seconds: float = 5.0, why: Any = None) -> None:
    """Wait for `condition()`; past `seconds`, fail, with `why()` if given (what to look at)."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time" + (f": {why()}" if why else ""))


async def _readyz(replica: Replica) -> tuple[int, dict[str, Any]]:
    from aiohttp.test_utils import TestClient, TestServer

    async with TestClient(TestServer(http_app(replica))) as client:
        response = await client.get("/readyz")
        return response.status, await response.json()


async def _the_one_problem(replica: Replica) -> str:
    """What /readyz answers unready for: a 503 with one problem, that problem."""
    status, body = await _readyz(replica)
    assert status == 503, body
    [problem] = body["problems"]
    return str(problem)


async def test_readyz_names_a_server_that_does_not_answer(replica: Replica) -> None:
    # A stalled server (SIGSTOP) gave "redis: ", a TimeoutError's empty text.
    class Stalled:
        async def ping(self) -> bool:
            await asyncio.sleep(5)
            return True

    replica.subscribed.set()
    replica.redis = Stalled()  # type: ignore[assignment]
    status, body = await _readyz(replica)
    assert status == 503 and "redis: no answer to PING within 1s" in body["problems"], body


async def test_readyz_fails_while_the_server_refuses_the_replicas_writes(
    aredis: aioredis.Redis, replica: Replica,
) -> None:
    """A server past its maxmemory answers PING and refuses every write: the replica said
    ready while its events were tried again and then dropped (the chaos review of
    2026-12-04). Unready from the first refusal, of an event or a tick, to the next write
    that goes through."""
    replica.subscribed.set()
    assert (await _readyz(replica))[0] == 200
    await aredis.config_set("maxmemory", 1)
    try:
        applying = asyncio.create_task(
            replica.handle_many([wire("user:connect", {"user_id": "u1"})]))
        await _until(lambda: counter(replica, "provisioner_errors_total",
                                     where="event_retry") >= 1)
        problem = await _the_one_problem(replica)
        assert problem.startswith("redis takes no writes for now: command not allowed when "
                                  "used memory > 'maxmemory'"), problem
        # What writes nothing does not say writes go through (a review: a batch of malformed
        # messages, a tick while the pool is taken back after a loss, made it ready again).
        await replica.handle_many([wire("user:connect", "not json")])
        replica._taking_back_since = replica.clock.now_ms()
        await replica.tick()
        replica._taking_back_since = None
        assert (await _readyz(replica))[0] == 503
    finally:
        await aredis.config_set("maxmemory", 0)
    assert isinstance((await applying)[0], AllocateResult)
    assert (await _readyz(replica))[0] == 200

    # The ticker's writes the same way.
    await aredis.config_set("maxmemory", 1)
    ticking = asyncio.create_task(replica._every(0.05, replica.tick, "tick"))
    try:
        await _until(lambda: counter(replica, "provisioner_errors_total", where="tick") >= 1)
        assert (await _readyz(replica))[0] == 503
        await aredis.config_set("maxmemory", 0)
        await _until(lambda: replica.writes_refused() is None)
        assert (await _readyz(replica))[0] == 200
    finally:
        await aredis.config_set("maxmemory", 0)
        replica.stopping.set()
        await ticking


async def test_a_replica_whose_writes_go_unanswered_is_unready(replica: Replica) -> None:
    """CLIENT PAUSE WRITE: the server answers reads, PING among them, and leaves writes
    unanswered; every tick and heartbeat timed out, and /readyz said ready all along (a
    review's drill). A write timed out counts as refused until one goes through."""
    replica.subscribed.set()
    real_tick, timeouts = replica.tick, {"left": 2}

    async def tick() -> None:
        if timeouts["left"] > 0:
            timeouts["left"] -= 1
            raise RedisTimeoutError("Timeout reading from 127.0.0.1:6379")
        await real_tick()

    ticking = asyncio.create_task(replica._every(0.05, tick, "tick"))
    try:
        await _until(lambda: counter(replica, "provisioner_errors_total", where="tick") >= 1)
        problem = await _the_one_problem(replica)
        assert problem.startswith("redis takes no writes for now: no answer to its tick "
                                  "(Timeout reading from"), problem
        await _until(lambda: replica.writes_refused() is None)  # a tick went through
        assert (await _readyz(replica))[0] == 200
    finally:
        replica.stopping.set()
        await ticking
    # reconciliation's timeout may be a read's: it says nothing of the writes
    replica.stopping.clear()

    async def reconcile() -> None:
        raise RedisTimeoutError("Timeout reading from 127.0.0.1:6379")

    reconciling = asyncio.create_task(replica._every(0.05, reconcile, "reconcile"))
    await _until(lambda: counter(replica, "provisioner_errors_total", where="reconcile") >= 1)
    replica.stopping.set()
    await reconciling
    assert replica.writes_refused() is None


async def test_a_replica_whose_heartbeats_go_unanswered_is_unready_until_one_goes_through(
    replica: Replica,
) -> None:
    """The heartbeat writes too (its script) every turn: timed out, it is a write left
    unanswered as a tick's is, and the next heartbeat that goes through makes it ready."""
    replica.subscribed.set()
    real_heartbeat, paused = replica.heartbeat, asyncio.Event()
    paused.set()

    async def heartbeat() -> None:
        if paused.is_set():
            raise RedisTimeoutError("Timeout reading from 127.0.0.1:6379")
        await real_heartbeat()

    beating = asyncio.create_task(replica._every(0.05, heartbeat, "heartbeat"))
    try:
        await _until(lambda: counter(replica, "provisioner_errors_total",
                                     where="heartbeat") >= 1)
        problem = await _the_one_problem(replica)
        assert problem.startswith("redis takes no writes for now: no answer to its heartbeat "
                                  "(Timeout reading from"), problem
        paused.clear()
        await _until(lambda: replica.writes_refused() is None)  # a heartbeat went through
        assert (await _readyz(replica))[0] == 200
    finally:
        replica.stopping.set()
        await beating


async def test_a_settings_key_of_another_type_is_named_when_the_settings_are_published(
    aredis: aioredis.Redis, replica: Replica,
) -> None:
    """The server's WRONGTYPE names no key: the replica's error names the pool's settings key
    and what to do; any other error of the server's passes as it came."""
    await aredis.set(replica.keys.config, "edited by hand")
    with pytest.raises(ResponseError, match=r"^WRONGTYPE .*: pool key .* holds another type "
                       r"than a hash .*delete it") as raised:
        await replica.publish_config()
    assert replica.keys.config in str(raised.value)
    await aredis.delete(replica.keys.config)
    await replica.publish_config()
    assert await aredis.hget(replica.keys.config, "min_ready") == str(replica.pool.min_ready)


async def test_a_pool_key_of_another_type_refuses_transitions_whole_and_says_so(
    aredis: aioredis.Redis, replica: Replica, clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A review's drill: the stats hash SET to a string by hand for 12 s; two disconnects in
    that time took their users' allocations and never freed the nodes (Redis undoes nothing
    a script wrote before it failed), and /readyz stayed ready. Now the disconnect is refused
    whole, at once (it will not mend itself in seconds), the replica is unready naming the
    key, and once the key is repaired the user is released as ever."""
    replica.subscribed.set()
    await replica.handle_many([wire("node:status", {"node_id": "n1", "status": "booting"}),
                               wire("node:status", {"node_id": "n1", "status": "ready"}),
                               wire("user:connect", {"user_id": "u1"})])
    assert await aredis.hget(replica.keys.key("alloc"), "u1") == "n1"
    stats = replica.keys.key("stats")
    kept = await aredis.dump(stats)
    await aredis.delete(stats)
    await aredis.set(stats, "by hand")
    with caplog.at_level(logging.WARNING):
        await replica.handle_many([
            wire("user:activity", {"user_id": "b1", "timestamp": T0 // 1000}),
            wire("user:disconnect", {"user_id": "u1"}),
            wire("user:disconnect", {"user_id": "u0"})])
    # Each lost disconnect named, for `provisioner release`: the rate limit of the activity
    # refused with them hid all but the first.
    assert "could not apply user:disconnect of u1 (dropped)" in caplog.text
    assert "could not apply user:disconnect of u0 (dropped)" in caplog.text
    assert counter(replica, "provisioner_errors_total", where="event_retry") == 0
    assert await aredis.hget(replica.keys.key("alloc"), "u1") == "n1"  # nothing half-done
    problem = await _the_one_problem(replica)
    assert problem.startswith("every transition is refused until an operator repairs the key: "
                              f"WRONGTYPE pool key {stats} holds a string, not a hash"), problem
    # Its heartbeat is refused too: one that went through made it ready again (a review).
    with pytest.raises(ResponseError):
        await replica.heartbeat()
    assert (await _readyz(replica))[0] == 503
    await aredis.delete(stats)
    await aredis.restore(stats, 0, kept)
    clock.advance(1000)
    await replica.handle_many([wire("user:disconnect", {"user_id": "u1"})])
    assert await aredis.hget(replica.keys.key("alloc"), "u1") is None
    assert (await _readyz(replica))[0] == 200
    assert await check_invariants(aredis, POOL) == []


async def test_the_listener_reports_how_far_it_is_behind_the_events(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = ServiceConfig("redis://x", "http://api", pool=POOL, replica_id="r1",
                            max_event_lag_s=0.3)
    replica = Replica(aredis, service, FLOOR_ONLY, api, clock=clock, metrics=Metrics())
    handle_many = replica.handle_many
    stall = asyncio.Event()

    async def slow(messages: Any, read_at: float | None = None) -> Any:
        if stall.is_set():
            await asyncio.sleep(0.8)
        return await handle_many(messages, read_at)

    replica.handle_many = slow  # type: ignore[method-assign]
    listening = asyncio.create_task(replica.listen())
    try:
        await asyncio.wait_for(replica.subscribed.wait(), 5)
        # Keeping up: the probe comes back, and is not taken for an event.
        await replica.probe_lag()
        await _until(lambda: not replica._probes_out)
        keeping_up = counter(replica, "provisioner_event_lag_seconds")
        assert 0 <= keeping_up < 0.3 and replica.event_lag_s() == keeping_up
        assert counter(replica, "provisioner_events_total", channel="other") == 0
        assert (await _readyz(replica))[0] == 200

        # A message that takes 0.8 s to apply: a probe published behind it waits for it.
        stall.set()
        await aredis.publish("user:activity", json.dumps({"user_id": "u1",
                                                          "timestamp": T0 // 1000}))
        await replica.probe_lag()
        await asyncio.sleep(0.4)
        assert replica.event_lag_s() >= 0.4  # still out: its age counts
        status, body = await _readyz(replica)
        assert status == 503 and any("behind" in p for p in body["problems"]), body
        await _until(lambda: not replica._probes_out)
        assert counter(replica, "provisioner_event_lag_seconds") >= 0.8
        assert "behind the event stream" in caplog.text

        # Caught up: the next probe's lag is the gauge again, and the replica is ready.
        stall.clear()
        await replica.probe_lag()
        await _until(lambda: not replica._probes_out)
        assert counter(replica, "provisioner_event_lag_seconds") < 0.3
        assert (await _readyz(replica))[0] == 200
    finally:
        replica.stopping.set()
        await listening
    assert int(await aredis.hget(replica.keys.key("stats"), "activities") or 0) == 1


@pytest.mark.parametrize("heartbeats", [True, False])
async def test_a_stalled_loop_is_counted_and_taken_for_the_listener_s_lag(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture, heartbeats: bool,
) -> None:
    """Found by a review: a replica paused for 100 s (`docker pause`) applied the events
    published meanwhile 100 s late, and its lag read 0.05 s: its probes, sent and timed by the
    paused process once it woke, came back at once. A loop blocked for 1.5 s stands for the
    pause here: nothing in the process runs, as in a paused one. With heartbeats off no probe
    would take the lag back, so the stall is counted and not read as a lag."""
    service = ServiceConfig("redis://x", "http://api", pool=POOL, replica_id="r1",
                            max_event_lag_s=1.0, heartbeat_interval_s=2.0 if heartbeats else 0)
    replica = Replica(aredis, service, FLOOR_ONLY, api, clock=clock, metrics=Metrics())
    tasks = [asyncio.create_task(replica.listen())]
    try:
        tasks.append(asyncio.create_task(replica._watch_the_loop()))
        await asyncio.wait_for(replica.subscribed.wait(), 5)
        await replica.probe_lag()
        await _until(lambda: not replica._probes_out)
        await asyncio.sleep(0.6)  # the watch's turns, none of them late
        assert counter(replica, "provisioner_loop_stalled_seconds_total") == 0
        assert replica.event_lag_s() < 0.3

        time.sleep(1.5)  # noqa: ASYNC251 -- the process paused: nothing in it runs
        await _until(lambda: counter(replica, "provisioner_loop_stalled_seconds_total") > 0)
        assert 1.2 <= counter(replica, "provisioner_loop_stalled_seconds_total") <= 2.5
        assert "event loop did not run for 1." in caplog.text
        status, body = await _readyz(replica)
        if heartbeats:
            assert replica.event_lag_s() >= 1.2
            assert status == 503 and any("behind" in p for p in body["problems"]), body
            # The next probe back is the lag again.
            await replica.probe_lag()
            await _until(lambda: not replica._probes_out)
            assert replica.event_lag_s() < 0.3
            assert (await _readyz(replica))[0] == 200
        else:
            assert replica.event_lag_s() < 0.3 and status == 200, body
    finally:
        replica.stopping.set()
        await asyncio.gather(*tasks)


async def test_what_else_comes_on_the_probe_channel_moves_no_lag(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    replica = make_replica(aredis, api, clock, "r1")
    listening = asyncio.create_task(replica.listen())
    try:
        await asyncio.wait_for(replica.subscribed.wait(), 5)
        await replica.probe_lag()
        await _until(lambda: len(replica._probes_out) == 0)
        # Published on the replica's channel by something else: not probes it sent.
        for junk in ("-inf", "1e300", "nan", "not a probe", repr(time.monotonic() - 3600)):
            await aredis.publish(replica.probe_channel, junk)
        # An event published after them: once it is applied, they have been read.
        await aredis.publish("user:activity", json.dumps({"user_id": "u1",
                                                          "timestamp": T0 // 1000}))
        await _until(lambda: counter(replica, "provisioner_events_total",
                                     channel="user:activity") == 1)
        replica._report_lag()
        assert 0 <= replica.event_lag_s() < 5
        assert 0 <= counter(replica, "provisioner_event_lag_seconds") < 5
        assert (await _readyz(replica))[0] == 200
    finally:
        replica.stopping.set()
        await listening


def test_the_heartbeat_settings_are_checked() -> None:
    bad = ServiceConfig("redis://x", "http://api", heartbeat_interval_s=-1, max_event_lag_s=0)
    assert bad.problems() == [
        "heartbeat interval must be 0 or in [0.1, 20] (0 disables heartbeats)",
        "max event lag must be in (0, 3600]"]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e308])
def test_no_setting_takes_a_value_the_scripts_cannot_count_in(value: float) -> None:
    """nan, inf and overflowing values passed the one-sided checks: an infinite timeout then
    failed every tick (no integer milliseconds), a nan API timeout every Node API call, and a
    pool of 10^14 nodes held the server in an endless script."""
    for name in ("idle_timeout_s", "boot_timeout_s", "create_timeout_s", "delete_timeout_s",
                 "learning_half_life_s", "keep_window_s", "buffer_sd"):
        assert PoolConfig(**{name: value}).problems(), name  # type: ignore[arg-type]
    for name in ("min_ready", "max_nodes"):
        assert PoolConfig(**{name: 10**14}).problems(), name  # type: ignore[arg-type]
    for name in ("api_timeout_s", "reconcile_interval_s", "max_event_lag_s",
                 "heartbeat_interval_s"):
        service = ServiceConfig("redis://x", "http://api", **{name: value})  # type: ignore
        assert service.problems(), name
    assert PoolConfig().problems() == [] and ServiceConfig("redis://x", "http://a").problems() == []


async def test_a_replica_whose_clock_is_off_the_server_s_says_so(
    aredis: aioredis.Redis, api: FakeNodeApi, caplog: pytest.LogCaptureFixture,
) -> None:
    from provisioner.view import read_view

    clock = ManualClock(int(time.time() * 1000) + 10_000)  # ten seconds ahead
    replica = make_replica(aredis, api, clock, "r1")
    with caplog.at_level(logging.WARNING):
        await replica.heartbeat()
    offset = counter(replica, "provisioner_clock_offset_seconds")
    assert 9.5 < offset < 10.5
    assert "clock is 10.0s ahead of the Redis server's" in caplog.text
    clock.advance(1_000)
    await replica.heartbeat()  # says the first one's offset to the pool
    status = await read_view(aredis, POOL, clock.now_ms(), FLOOR_ONLY.window_ms)
    [listed] = status.replicas
    assert listed.clock_offset_s is not None and 9.5 < listed.clock_offset_s < 10.5
    assert "clock 10.0s ahead of the server's" in listed.describe()
    # A clock in step says nothing.
    in_step = make_replica(aredis, api, ManualClock(int(time.time() * 1000)), "r2")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        await in_step.heartbeat()
        in_step.clock.advance(1)
        await in_step.heartbeat()
    assert abs(counter(in_step, "provisioner_clock_offset_seconds")) < 0.5
    assert "clock" not in caplog.text
    status = await read_view(aredis, POOL, in_step.clock.now_ms(), FLOOR_ONLY.window_ms)
    assert "clock" not in next(r for r in status.replicas if r.replica_id == "r2").describe()


async def test_the_pool_s_state_is_dated_by_the_server_s_clock(
    aredis: aioredis.Redis, api: FakeNodeApi,
) -> None:
    """A replica whose clock ran two hours behind the server's began the pool's state, and
    `provisioner status` said it began two hours before it did (and one ahead, that it had not
    begun yet): the epoch was made of the replica's time. It is the server's now."""
    from provisioner.view import read_view

    behind = make_replica(aredis, api, ManualClock(int(time.time() * 1000) - 7_200_000), "r1")
    await behind.heartbeat()
    status = await read_view(aredis, POOL, int(time.time() * 1000), FLOOR_ONLY.window_ms)
    assert status.state_since_ms is not None
    assert abs(status.state_since_ms - time.time() * 1000) < 5_000
    assert status.state_age_s is not None and status.state_age_s < 5


async def test_a_replica_behind_a_live_one_s_clock_by_minutes_decides_nothing_and_says_why(
    aredis: aioredis.Redis, api: FakeNodeApi, caplog: pytest.LogCaptureFixture,
) -> None:
    # One decider while both live (each took the slot from the other before the lease); the
    # one left out says so, naming the clocks.
    ahead = make_replica(aredis, api, ManualClock(T0 + 90_000), "r-ahead",
                         pool=PoolConfig(min_ready=2, scaling_policy="heuristic", conversion=0))
    behind = make_replica(aredis, api, ManualClock(T0), "r-behind",
                          pool=PoolConfig(min_ready=2, scaling_policy="heuristic", conversion=0))
    with caplog.at_level(logging.WARNING):
        await _tick_side_by_side(ahead, behind, turns=5)
    assert counter(ahead, "provisioner_scale_decisions_total") == 5
    assert counter(behind, "provisioner_scale_decisions_total") == 0
    assert len(api.created) == 2  # the floor, once
    assert "held by a replica whose clock is over a minute ahead" in caplog.text
    assert await check_invariants(aredis, POOL) == []


async def test_two_processes_beating_under_one_replica_id_are_told_apart(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each process keeps its mark of the last call it applied under its replica id, so two
    under one id overwrite each other's, and a call made again after a lost reply is no
    longer known for one that ran (a review: nothing told). A process restarted under the id
    of one gone is no twin."""
    first = make_replica(aredis, api, clock, "r1")
    await first.heartbeat()
    await first.heartbeat()
    restarted = make_replica(aredis, api, clock, "r1")  # the first is gone: no twin yet
    with caplog.at_level(logging.WARNING):
        await restarted.heartbeat()
        await restarted.heartbeat()
        assert "another process runs as replica 'r1'" not in caplog.text
        twin = make_replica(aredis, api, clock, "r1")  # the restarted one still runs
        await twin.heartbeat()
        await restarted.heartbeat()
    assert "another process runs as replica 'r1'" in caplog.text
    assert counter(restarted, "provisioner_errors_total", where="replica_id_shared") == 1
    # an entry edited by hand is no sign of a twin
    await aredis.hset(restarted.keys.key("replica_info"), "r1", "not json")
    await restarted.heartbeat()
    assert counter(restarted, "provisioner_errors_total", where="replica_id_shared") == 1


async def test_a_replica_list_of_another_type_is_named_by_the_heartbeat_not_the_twin_look(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """A third review: the twin look's plain read failed first, with Redis's bare WRONGTYPE,
    where every script names the key."""
    replica = make_replica(aredis, api, clock, "r1")
    await replica.heartbeat()
    await aredis.delete(replica.keys.key("replica_info"))
    await aredis.set(replica.keys.key("replica_info"), "edited")
    with pytest.raises(aioredis.ResponseError, match=r"prov:\{[^}]+\}:replica_info"):
        await replica.heartbeat()
    await aredis.delete(replica.keys.key("replica_info"))


async def test_an_older_copy_of_the_state_put_back_is_no_twin(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A second review: a fixed replica id, a copy of the pool taken while process A ran, A
    stopped and B started under the id, then the copy put back: its entry is A's, and B took
    it for a twin. The heartbeat sees the copy for what it is, and says that instead."""
    a = make_replica(aredis, api, clock, "fixed")
    await a.heartbeat()
    await a.heartbeat()
    keys = [key async for key in aredis.scan_iter(f"{a.keys.base}*")]
    copy = {key: await aredis.dump(key) for key in keys}
    await a.scripts.leave("fixed")
    b = make_replica(aredis, api, clock, "fixed")
    for _ in range(3):
        await b.heartbeat()
    for key, value in copy.items():
        await aredis.restore(key, 0, value, replace=True)
    with caplog.at_level(logging.WARNING):
        await b.heartbeat()
    assert "was put back from an older copy" in caplog.text
    assert "another process runs as replica" not in caplog.text
    assert counter(b, "provisioner_errors_total", where="replica_id_shared") == 0


async def test_a_replica_s_heartbeat_lists_it_in_the_pool_status(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    from rich.console import Console

    from provisioner.view import read_view, render_view

    replica = make_replica(aredis, api, clock, "r1")
    await replica.heartbeat()  # not listening yet
    listening = asyncio.create_task(replica.listen())
    try:
        await asyncio.wait_for(replica.subscribed.wait(), 5)
        clock.advance(1_000)
        await replica.heartbeat()
    finally:
        replica.stopping.set()
        await listening
    await heard_ago(aredis, replica.keys, "r1", 500)
    status = await read_view(aredis, POOL, clock.now_ms(), FLOOR_ONLY.window_ms)
    [listed] = status.as_dict()["replicas"]
    assert listed["replica"] == "r1" and listed["subscribed"] is True
    assert 0.5 <= listed["age_s"] < 1.5 and 0 <= listed["lag_s"] < 5
    assert listed["silent"] is False
    # Started at T0 by its own clock, which is months behind the server's: up for the time
    # since, by that clock (the server's now less the offset it last measured), not months.
    assert 0 <= listed["up_s"] < 5
    console = Console(record=True, width=200)
    console.print(render_view(status))
    shown = console.export_text()
    assert "replicas 1: r1 (lag " in shown
    assert re.search(r", up \ds\)", shown)  # beside when the pool's state began
    # Silent for a minute: shown apart.
    await heard_ago(aredis, replica.keys, "r1", 60_000)
    quiet = await read_view(aredis, POOL, clock.now_ms(), FLOOR_ONLY.window_ms)
    console = Console(record=True, width=200)
    console.print(render_view(quiet))
    assert "replicas 0: none heard from; r1 silent for 60s" in console.export_text()


async def test_a_replica_says_which_release_of_the_scripts_it_runs(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """In its heartbeat (for `provisioner status`) and on /metrics (for an alert when the
    replicas of a pool run different releases: an upgrade left half done)."""
    from provisioner.scripts import scripts_fingerprint

    replica = make_replica(aredis, api, clock, "r1")
    fingerprint = scripts_fingerprint()
    assert re.fullmatch(r"[0-9a-f]{12}", fingerprint)
    assert counter(replica, "provisioner_scripts_info", fingerprint=fingerprint) == 1
    await replica.heartbeat()
    [listed] = await replica.scripts.replicas()
    assert listed.scripts == fingerprint and listed.as_dict()["scripts"] == fingerprint
    # and which pool settings it runs, for `status` to tell replicas that run different ones
    assert listed.settings == FLOOR_ONLY.digest() == listed.as_dict()["settings"]
    # and on /metrics, by pool, for an alert when they differ
    assert counter(replica, "provisioner_settings_info", pool=POOL,
                   settings=FLOOR_ONLY.digest()) == 1
    other = make_replica(aredis, api, clock, "r2", PoolConfig(max_nodes=5))
    assert counter(other, "provisioner_settings_info", pool=POOL,
                   settings=PoolConfig(max_nodes=5).digest()) == 1
    assert PoolConfig(max_nodes=5).digest() != FLOOR_ONLY.digest()


async def test_a_replica_finds_another_pool_listening_on_its_server(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Pub/sub is shared by every database of a server, and the wire contract's channels carry
    no pool: two pools on one server each apply the other's events (a review's drill: both
    handed one node to a connect). A replica finds them through the lag probe channels the
    server lists, says so once, and is unready while they listen."""
    from rich.console import Console

    from provisioner.view import read_view, render_view

    settings = aredis.connection_pool.connection_kwargs
    elsewhere = aioredis.Redis(host=settings["host"], port=settings["port"], db=1,
                               decode_responses=True)
    here = make_replica(aredis, api, clock, "r1")
    mate = make_replica(aredis, api, clock, "r2")  # this pool, this database: no conflict
    same_name = make_replica(elsewhere, api, clock, "r1")  # this pool's name, database 1
    other = Replica(aredis, ServiceConfig("redis://x", "http://api", pool="other",
                                          replica_id="o1"), FLOOR_ONLY, api, clock=clock,
                    metrics=Metrics())
    assert here.probe_channel == "provisioner:lag:svc:0:r1"
    assert same_name.probe_channel == "provisioner:lag:svc:1:r1"
    listening = {r: asyncio.create_task(r.listen()) for r in (here, mate)}
    try:
        await asyncio.wait_for(here.subscribed.wait(), 5)
        await asyncio.wait_for(mate.subscribed.wait(), 5)
        await here.heartbeat()
        assert here.other_pools == [] and (await _readyz(here))[0] == 200

        caplog.set_level(logging.WARNING, logger="provisioner.service")
        for replica in (same_name, other):
            listening[replica] = asyncio.create_task(replica.listen())
            await asyncio.wait_for(replica.subscribed.wait(), 5)
        clock.advance(1_000)  # a heartbeat records what it says when its time moved on
        await here.heartbeat()
        assert here.other_pools == ["'other' on database 0", "'svc' on database 1"]
        assert counter(here, "provisioner_other_pools") == 2
        status, body = await _readyz(here)
        assert status == 503 and body["problems"] == [
            "another pool listens on this server, and each applies the other's events: "
            "'other' on database 0, 'svc' on database 1"], body
        await other.heartbeat()
        assert other.other_pools == ["'svc' on database 0", "'svc' on database 1"]
        await here.heartbeat()  # said once, not at every heartbeat
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(
            "another pool listens on this Redis server: 'other' on database 0, 'svc' on "
            "database 1.")]
        assert len(said) == 1 and "run each pool against its own server" in said[0], said
        view = await read_view(aredis, POOL, clock.now_ms(), FLOOR_ONLY.window_ms)
        console = Console(record=True, width=300)
        console.print(render_view(view))
        assert (", another pool on its server: 'other' on database 0, 'svc' on database 1)"
                in console.export_text())
        assert not [p for p in (await _readyz(mate))[1].get("problems", [])
                    if "another pool" in p]  # its heartbeat has not looked yet

        # A replica from before the database was in the channel: its pool's name is enough.
        old_style = aredis.pubsub()
        await old_style.subscribe("provisioner:lag:svc:r9", "provisioner:lag:older:r9",
                                  "provisioner:lag:svc:x:y:z")
        for replica in (same_name, other):
            replica.stopping.set()
            await listening.pop(replica)
        await here.heartbeat()
        assert here.other_pools == ["'older'"]
        await old_style.aclose()  # type: ignore[no-untyped-call, unused-ignore]
        await here.heartbeat()
        assert here.other_pools == [] and counter(here, "provisioner_other_pools") == 0
        assert (await _readyz(here))[0] == 200
        assert any("no other pool listens on this Redis server now (there was 'older')"
                   in r.getMessage() for r in caplog.records)
        # A server that refuses PUBSUB (an ACL, a proxy) costs the check, not the heartbeat.
        async def refused(*_: Any) -> Any:
            raise ResponseError("NOPERM this user has no permissions to run the 'pubsub' "
                                "command")

        here.redis.pubsub_channels = refused  # type: ignore[method-assign]
        clock.advance(1_000)
        await heard_ago(aredis, here.keys, "r1", 30_000)
        await here.heartbeat()
        assert any("could not list the server's channels (NOPERM" in r.getMessage()
                   for r in caplog.records)
        [listed] = [r for r in (await here.scripts.replicas())
                    if r.replica_id == "r1"]
        assert listed.age_s < 1  # heard from just now
    finally:
        for replica, task in listening.items():
            replica.stopping.set()
            await task
        await elsewhere.aclose()


async def test_what_the_look_for_other_pools_meets_never_stops_the_heartbeat(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A review of 2026-12-04: a channel with a 5,000-digit database made int() raise under
    every heartbeat (the replica left `provisioner status`, a traceback each time); a pool
    half upgraded counted twice; a server refusing PUBSUB for good warned every 6 s."""
    import provisioner.logs

    here = make_replica(aredis, api, clock, "r1")
    stranger = aredis.pubsub()
    await stranger.subscribe("provisioner:lag:x:" + "1" * 5000 + ":r",
                             "provisioner:lag:other:0:o1", "provisioner:lag:other:o2")
    try:
        await here.heartbeat()
        assert [r.replica_id for r in await here.scripts.replicas()] == ["r1"]
        assert here.other_pools == ["'other' on database 0"]
        assert counter(here, "provisioner_other_pools") == 1
    finally:
        await stranger.aclose()  # type: ignore[no-untyped-call, unused-ignore]

    async def refused(*_: Any) -> Any:
        raise ResponseError("NOPERM this user has no permissions to run the 'pubsub' command")

    here.redis.pubsub_channels = refused  # type: ignore[method-assign]
    now = [1000.0]
    monkeypatch.setattr(provisioner.logs.time, "monotonic", lambda: now[0])
    caplog.set_level(logging.WARNING, logger="provisioner.service")
    for _ in range(1800):  # an hour of heartbeats, 2 s apart
        clock.advance(2_000)
        await heard_ago(aredis, here.keys, "r1", 2_000)
        await here.heartbeat()
        now[0] += 2.0
    said = [r.getMessage() for r in caplog.records
            if "could not list the server's channels" in r.getMessage()]
    assert len(said) == 1 and "(the last look found 'other' on database 0)" in said[0], said
    [listed] = await here.scripts.replicas()
    assert listed.age_s < 1  # the last heartbeat went through


async def test_a_probe_seen_before_its_publish_returns_is_not_left_out(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    replica = make_replica(aredis, api, clock, "r1")
    publish = replica.redis.publish

    async def slow_reply(*args: Any) -> Any:
        result = await publish(*args)
        await asyncio.sleep(0.3)  # the listener reads the probe meanwhile
        return result

    replica.redis.publish = slow_reply  # type: ignore[method-assign]
    listening = asyncio.create_task(replica.listen())
    try:
        await asyncio.wait_for(replica.subscribed.wait(), 5)
        await replica.probe_lag()
        await asyncio.sleep(0.3)
        assert not replica._probes_out and replica.event_lag_s() < 0.3
    finally:
        replica.stopping.set()
        await listening


# --- any batch of messages ------------------------------------------------------------------

_USERS = ["u0", "u1", "u2", "u3"]
_NODES = ["n0", "n1", "n2"]
_VALID = st.one_of(
    st.tuples(st.just("user:activity"), st.builds(
        lambda u, back: {"user_id": u, "timestamp": T0 // 1000 - back},
        st.sampled_from(_USERS), st.integers(min_value=-2, max_value=200))),
    st.tuples(st.sampled_from(["user:connect", "user:disconnect"]),
              st.builds(lambda u: {"user_id": u}, st.sampled_from(_USERS))),
    st.tuples(st.just("node:status"), st.builds(
        lambda n, s: {"node_id": n, "status": s}, st.sampled_from(_NODES),
        st.sampled_from(["booting", "ready", "terminated"]))),
)
_JUNK = st.tuples(
    st.sampled_from(["user:activity", "user:connect", "user:disconnect", "node:status"]),
    st.one_of(st.text(max_size=30), st.dictionaries(
        st.sampled_from(["user_id", "node_id", "status", "timestamp"]),
        st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=10),
                  st.sampled_from(_USERS + _NODES)), max_size=4)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(st.one_of(_VALID, _VALID, _JUNK), min_size=1, max_size=12),
                        min_size=1, max_size=6),
       ticks=st.lists(st.booleans(), min_size=6, max_size=6))
def test_any_batches_of_messages_keep_every_invariant(
    redis_url: str, batches: list[list[tuple[str, object]]], ticks: list[bool],
) -> None:
    """Whatever comes, valid or not, in any order and grouping: handle_many answers one
    outcome per message, never raises, and the pool's invariants hold after every batch."""

    async def go() -> None:
        client = aioredis.Redis.from_url(redis_url)
        await client.flushall()
        clock = ManualClock(T0)
        replica = make_replica(client, FakeNodeApi(), clock, "r1", PoolConfig(min_ready=1))
        try:
            for batch, tick in zip(batches, ticks, strict=False):
                outcomes = await replica.handle_many([wire(c, p) for c, p in batch])
                assert len(outcomes) == len(batch)
                if tick:
                    await replica.tick()
                    await replica.settle()
                clock.advance(1_000)
                assert await check_invariants(client, POOL) == []
            assert counter(replica, "provisioner_errors_total", where="event") == 0
        finally:
            await client.aclose()

    asyncio.run(go())


@pytest.mark.parametrize(("options", "message"), [
    # each named by its option and env var, as every other setting is
    (["--node-api-url", "http://[::1"],
     "--node-api-url (PROVISIONER_NODE_API_URL) cannot be parsed: Invalid IPv6 URL: "
     "got 'http://[::1'"),
    (["--node-api-url", "http://127.0.0.1:99999"],
     "--node-api-url (PROVISIONER_NODE_API_URL) cannot be parsed: Port out of range"),
    (["--node-api-url", "http://host:port"], "cannot be parsed"),
    (["--node-api-url", "http://:8080"],
     "--node-api-url (PROVISIONER_NODE_API_URL) names no host: got 'http://:8080'"),
    # every call went to /v1?token=***/api/nodes, a DELETE to the API's base (a review); the
    # token is not shown
    (["--node-api-url", "http://api:80/v1?token=s3cret"],
     "--node-api-url (PROVISIONER_NODE_API_URL) has a query or a fragment: the calls are made "
     "at its path + /api/nodes, and would go elsewhere (give the API's base, "
     "scheme://host:port[/prefix]): got 'http://api:80/v1?token=***'"),
    (["--node-api-url", "http://api:80/#frag"], "has a query or a fragment"),
    (["--node-api-url", "http://api:80/?"], "has a query or a fragment"),
    # a client's error that holds braces is said as it is
    (["--node-api-url", "http://:{x}"],
     "cannot be parsed: Port could not be cast to integer value as '{x}': got 'http://:{x}'"),
    (["--redis-url", "redis://127.0.0.1:notaport"],
     "--redis-url (PROVISIONER_REDIS_URL) cannot be parsed"),
    # the client took it as database 0 (a review)
    (["--redis-url", "redis://127.0.0.1:6379/one"],
     "names a database that is not a number: 'one' (redis://HOST:PORT/N): "
     "got 'redis://127.0.0.1:6379/one'"),
    # a traceback from the client's connection (a review)
    (["--redis-url", "redis://127.0.0.1:6379/0?socket_timout=5"],
     "--redis-url (PROVISIONER_REDIS_URL) names an option the Redis client does not take: "
     "'socket_timout'"),
    # the client's own error, alone, and not said to be the URL's (a review)
    (["--redis-url", "redis://127.0.0.1:6379/0?protocol=4"],
     "--redis-url (PROVISIONER_REDIS_URL) cannot be used: protocol must be either 2 or 3: "
     "got 'redis://127.0.0.1:6379/0?protocol=4'"),
    (["--log-level", "bogus"],
     "--log-level (PROVISIONER_LOG_LEVEL) must be one of DEBUG, INFO, WARNING, ERROR: got 'bogus'"),
])
def test_run_refuses_an_address_or_log_level_it_cannot_use(options: list[str],
                                                           message: str) -> None:
    """Each of these stopped `run` with a traceback, or failed every Node API call."""
    from typer.testing import CliRunner

    from provisioner.cli import app

    base = {"--redis-url": "redis://127.0.0.1:1/0", "--node-api-url": "http://127.0.0.1:1"}
    base.update(zip(options[::2], options[1::2], strict=True))
    result = CliRunner().invoke(app, ["run", "--http-port", "0",
                                      *(x for pair in base.items() for x in pair)],
                                env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in " ".join(result.output.split()), \
        result.output


def test_reconcile_refuses_a_node_api_url_it_cannot_use() -> None:
    from typer.testing import CliRunner

    from provisioner.cli import app

    result = CliRunner().invoke(app, ["reconcile", "--redis-url", "redis://127.0.0.1:1/0",
                                      "--node-api-url", "http://[::1"], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "cannot be parsed" in result.output, result.output


def test_the_counters_an_operator_queries_read_zero_before_they_first_count() -> None:
    # `provisioner_terminations_total{reason="boot_timeout"}` read nothing, not 0, until then.
    registry = Metrics().registry
    assert registry.get_sample_value("provisioner_terminations_total",
                                     {"reason": "boot_timeout"}) == 0
    assert registry.get_sample_value("provisioner_errors_total", {"where": "subscribe"}) == 0


async def test_a_replica_decides_nothing_on_a_lost_state_until_it_has_taken_the_nodes_back(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """Between a loss and the heartbeat that sees it, and while the reconciliation after it
    lists the Node API's nodes, the ticks see an empty pool: a decision there boots a new pool
    beside the nodes still running. The replica's ticks pass the epoch it ran on, so they decide
    nothing until its nodes are back."""
    replica = make_replica(aredis, api, clock, "r1", PoolConfig(
        min_ready=2, scaling_policy="heuristic", conversion=0))
    await replica.heartbeat()
    for node in ("a", "b"):
        for status in ("booting", "ready"):
            await send([replica], "node:status", {"node_id": node, "status": status})
    await replica.tick()
    await replica.settle()
    decided = counter(replica, "provisioner_scale_decisions_total")
    assert api.created == [] and decided == 1
    await aredis.flushall()
    clock.advance(1_000)
    await replica.tick()  # before the heartbeat that sees the loss
    await replica.settle()
    assert api.created == []
    # the heartbeat sees it and reconciles; a tick while the Node API's list is on its way
    listing, answer = asyncio.Event(), asyncio.Event()
    api.listed = [ListedNode("a", "ready"), ListedNode("b", "ready")]

    async def slow_list() -> list[ListedNode] | None:
        listing.set()
        await answer.wait()
        return api.listed

    api.list_nodes = slow_list  # type: ignore[method-assign]
    beat = asyncio.create_task(replica.heartbeat())
    await asyncio.wait_for(listing.wait(), 5)
    clock.advance(1_000)
    await replica.tick()
    await replica.settle()
    assert api.created == [] and counter(replica, "provisioner_state_lost_total") == 1
    answer.set()
    await beat
    # the nodes are back: the ticks decide again, on the pool as it is
    clock.advance(1_000)
    await replica.tick()
    await replica.settle()
    assert api.created == []
    assert counter(replica, "provisioner_scale_decisions_total") == decided + 1
    await send([replica], "node:status", {"node_id": "a", "status": "terminated"})
    clock.advance(1_000)
    await replica.tick()
    await replica.settle()
    assert len(api.created) == 1


async def test_a_replica_takes_the_node_apis_nodes_in_before_its_first_decision(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """Every replica restarted on an empty server (or a first start beside nodes left
    running): the pool's state is new, so no replica can see a loss, and a tick before the
    reconciliation boots a pool beside the running nodes."""
    service = ServiceConfig("redis://x", "http://api", pool=POOL, replica_id="r1",
                            reconcile_interval_s=30)
    replica = Replica(aredis, service, PoolConfig(min_ready=2, scaling_policy="heuristic",
                                                  conversion=0), api, clock=clock,
                      metrics=Metrics())
    api.listed = [ListedNode("a", "ready"), ListedNode("b", "ready")]
    task = asyncio.create_task(replica.run())
    try:
        await _until(lambda: counter(replica, "provisioner_scale_decisions_total") > 0)
        await replica.settle()
        assert counter(replica, "provisioner_scale_decisions_total") == 1
        assert api.created == []
        assert set(await aredis.lrange(replica.keys.key("ready"), 0, -1)) == {"a", "b"}
    finally:
        replica.stopping.set()
        await asyncio.wait_for(task, 5)


async def test_after_a_loss_the_ticks_wait_for_the_node_list_a_while_not_for_good(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """A GET /api/nodes that fails a moment after the loss (a 503, a timeout) let the ticks
    boot a pool beside the running nodes; an API that never gives a list (no such endpoint)
    must not stop scaling for good. One that fails for over a minute is waited for 10 (a
    review's drill: an API stalled past the minute, and the pool booted beside its nodes)."""
    replica = make_replica(aredis, api, clock, "r1", PoolConfig(
        min_ready=2, scaling_policy="heuristic", conversion=0))
    await replica.heartbeat()
    await aredis.flushall()
    api.listed, api.has_no_list = None, False  # it fails to list
    for _ in range(3):  # each heartbeat retries; the ticks wait
        clock.advance(2_000)
        await replica.heartbeat()
        await replica.tick()
        await replica.settle()
    assert api.created == [] and counter(replica, "provisioner_state_lost_total") == 1
    api.listed = [ListedNode("a", "ready"), ListedNode("b", "ready")]  # it answers: taken back
    clock.advance(2_000)
    await replica.heartbeat()
    await replica.tick()
    await replica.settle()
    assert api.created == [] and await aredis.llen(replica.keys.key("ready")) == 2

    async def lost_with_no_list_for(patience_ms: int, losses: int) -> None:
        """A loss; the ticks wait `patience_ms` from the heartbeat that saw it, then decide."""
        await aredis.flushall()
        api.listed = None
        api.created.clear()
        clock.advance(2_000)
        await replica.heartbeat()
        for waited_ms in (patience_ms - 1_000, 1_000):
            clock.advance(waited_ms)
            await replica.heartbeat()
            await replica.tick()
            await replica.settle()
            if waited_ms != 1_000:
                assert api.created == []
        assert len(api.created) == 2
        assert counter(replica, "provisioner_state_lost_total") == losses

    # a second loss, and a Node API failing to list for ten minutes: the ticks wait it out
    await lost_with_no_list_for(600_000, 2)
    # a third, and a Node API with no list at all: the ticks decide again after a minute
    api.has_no_list = True
    await lost_with_no_list_for(60_000, 3)


async def test_a_replica_started_during_the_take_back_holds_as_the_others_do(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """Only a replica that saw the loss held its ticks: one restarted during the hold (a
    crash, a rolling upgrade) saw no loss, took its first turn at reconciliation, listless,
    for a look, and booted beside the nodes (a review). A first turn on a state begun less
    than the patience ago reconciles itself and holds the same way, until the patience runs
    out from the state's beginning; on a state begun long ago it looks as before."""
    cfg = PoolConfig(min_ready=2, scaling_policy="heuristic", conversion=0)
    r1 = make_replica(aredis, api, clock, "r1", cfg)
    await r1.heartbeat()
    await aredis.flushall()  # the loss; the Node API still runs the nodes but fails to list
    api.listed, api.has_no_list = None, False
    clock.advance(2_000)
    await r1.heartbeat()
    assert r1._taking_back
    # said by the heartbeat that saw the loss, not the next (a review: one heartbeat late)
    [seen] = [r for r in await r1.scripts.replicas() if r.replica_id == "r1"]
    assert seen.taking_back
    await aredis.set(r1.keys.reconcile_lock, "r1", px=30_000)  # r1's turn, for the interval
    r2 = make_replica(aredis, api, clock, "r2", cfg)  # started now, beside r1
    await r2.heartbeat()
    await r2._reconcile_if_due()
    await r2.tick()
    await r2.settle()
    assert r2._taking_back and api.created == []
    await r2.heartbeat()  # and says so to `provisioner status` (a review: nothing showed it)
    [seen] = [r for r in await r2.scripts.replicas()
              if r.replica_id == "r2"]
    assert seen.taking_back and "no decision until the Node API lists" in seen.describe()
    # the API answers: each takes the nodes back at its next heartbeat, and none boots
    api.listed = [ListedNode("a", "ready"), ListedNode("b", "ready")]
    for replica in (r1, r2):
        clock.advance(2_000)
        await replica.heartbeat()
        await replica.tick()
        await replica.settle()
        assert not replica._taking_back
    assert api.created == [] and await aredis.llen(r1.keys.key("ready")) == 2
    # on a state begun long ago, a first turn holds nothing: the state was not lost
    await aredis.set(r1.keys.key("epoch"), "1-long-ago")
    api.listed = None
    r3 = make_replica(aredis, api, clock, "r3", cfg)
    await r3._reconcile_if_due()
    assert r3._looked.is_set() and not r3._taking_back


async def test_the_take_back_hold_on_a_first_turn_fails_safe_and_ends_on_time(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A review of the hold: a first turn that raised before it knew the state's age (a
    server still loading) held nothing and booted beside the nodes; a hold whose heartbeat
    failed before its retry (its settings refused) lasted for good, though reconciliations
    had the list; an epoch edited to garbage made every start a young state's."""
    cfg = PoolConfig(min_ready=2, scaling_policy="heuristic", conversion=0)
    api.listed, api.has_no_list = None, False
    r1 = make_replica(aredis, api, clock, "r1", cfg)
    real_get = aredis.get
    loading = {"left": 1}

    async def get(key: str) -> Any:
        if loading["left"]:
            loading["left"] -= 1
            raise BusyLoadingError("Redis is loading the dataset in memory")
        return await real_get(key)

    monkeypatch.setattr(aredis, "get", get)
    with pytest.raises(BusyLoadingError):
        await r1._reconcile_if_due()
    await r1.tick()
    await r1.settle()
    assert r1._taking_back and api.created == []
    # the heartbeats fail before their retry; a reconciliation with the list ends the hold
    api.listed = [ListedNode("a", "ready"), ListedNode("b", "ready")]
    await aredis.delete(r1.keys.reconcile_lock)
    r1._looked.set()
    await r1._reconcile_if_due()
    assert not r1._taking_back and api.created == []
    # and with no list at all, the ticks end it once the patience has passed
    api.listed = None
    r1._taking_back_since = clock.now_ms()
    clock.advance(599_000)
    await r1.tick()
    assert r1._taking_back and api.created == []
    clock.advance(1_000)
    await r1.tick()
    await r1.settle()
    assert not r1._taking_back and counter(r1, "provisioner_scale_decisions_total") == 1
    # an epoch that is no time, or one ahead of the server's, is not a young state's
    for edited in ("garbage", "99999999999999-x"):
        await aredis.set(r1.keys.key("epoch"), edited)
        other = make_replica(aredis, api, clock, f"r-{edited[:3]}", cfg)
        await aredis.set(other.keys.reconcile_lock, "r1", px=30_000)
        await other._reconcile_if_due()
        assert not other._taking_back, edited


async def _state_began_ago(replica: Replica, ago_ms: int) -> None:
    """The pool's epoch set to say its state began `ago_ms` before the server's now."""
    seconds, micros = await replica.redis.time()
    began = int(seconds) * 1000 + int(micros) // 1000 - ago_ms
    await replica.redis.set(replica.keys.key("epoch"), f"{began}-edited")


async def test_a_replica_started_minutes_into_a_take_back_holds_until_ten_from_its_beginning(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """A Node API failing to list holds a young state's ticks for ten minutes, timed from the
    state's beginning, not from the first turn: a replica started two minutes into it holds
    (not the minute of an API with no list), and for the eight minutes left, not ten more."""
    cfg = PoolConfig(min_ready=2, scaling_policy="heuristic", conversion=0)
    api.listed, api.has_no_list = None, False
    replica = make_replica(aredis, api, clock, "r2", cfg)
    await _state_began_ago(replica, 120_000)
    await replica._reconcile_if_due()
    await replica.tick()
    await replica.settle()
    assert replica._taking_back and api.created == []
    clock.advance(470_000)  # 590 s from the state's beginning
    await replica.tick()
    await replica.settle()
    assert replica._taking_back and api.created == []
    clock.advance(10_000)  # 600 s
    await replica.tick()
    await replica.settle()
    assert not replica._taking_back and len(api.created) == 2


async def test_a_first_turn_on_a_young_state_takes_the_nodes_back_whoever_holds_the_lock(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """The lock of another replica's turn does not keep a first turn on a young state from its
    own look: the nodes are taken back at once, and the ticks decide on them."""
    cfg = PoolConfig(min_ready=2, scaling_policy="heuristic", conversion=0)
    api.listed, api.has_no_list = [ListedNode("a", "ready"), ListedNode("b", "ready")], False
    r1 = make_replica(aredis, api, clock, "r1", cfg)
    await r1.heartbeat()  # a state begun now
    await aredis.set(r1.keys.reconcile_lock, "r1", px=30_000)
    r2 = make_replica(aredis, api, clock, "r2", cfg)
    await r2._reconcile_if_due()
    assert not r2._taking_back
    assert set(await aredis.lrange(r2.keys.key("ready"), 0, -1)) == {"a", "b"}
    await r2.tick()
    await r2.settle()
    assert api.created == [] and counter(r2, "provisioner_scale_decisions_total") == 1


async def test_a_first_turn_on_a_state_no_heartbeat_has_begun_yet_holds(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """An empty server (every replica restarted on it) has no epoch yet: the newest state of
    all, whose first turn with a Node API failing to list holds the ticks."""
    cfg = PoolConfig(min_ready=2, scaling_policy="heuristic", conversion=0)
    api.listed, api.has_no_list = None, False
    replica = make_replica(aredis, api, clock, "r1", cfg)
    assert await aredis.get(replica.keys.key("epoch")) is None
    await replica._reconcile_if_due()
    await replica.tick()
    await replica.settle()
    assert replica._taking_back and api.created == []


@pytest.mark.parametrize("heartbeat_s, has_no_list", [(2.0, True), (0.0, False)])
async def test_a_first_turn_holds_nothing_where_no_node_list_or_heartbeat_could_end_it(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock, heartbeat_s: float,
    has_no_list: bool,
) -> None:
    """A young state's first turn holds the ticks only while a list may come: not for a Node
    API with none (404, 405), nor with heartbeats off (no epoch dates the state, and no
    heartbeat asks for the list again)."""
    service = ServiceConfig("redis://x", "http://api", pool=POOL, replica_id="r1",
                            heartbeat_interval_s=heartbeat_s)
    api.listed, api.has_no_list = None, has_no_list
    replica = Replica(aredis, service, PoolConfig(min_ready=2, scaling_policy="heuristic",
                                                  conversion=0), api, clock=clock,
                      metrics=Metrics())
    if heartbeat_s:
        await replica.heartbeat()  # a state begun now
    await replica._reconcile_if_due()
    await replica.tick()
    await replica.settle()
    assert not replica._taking_back and len(api.created) == 2


async def test_the_heartbeat_that_outlasts_the_patience_ends_the_hold_and_says_it_once(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While it holds, a tick says the take-back, not the lost epoch it already saw; the
    heartbeat whose retry finds the patience over ends the hold itself, before any tick."""
    replica = make_replica(aredis, api, clock, "r1")
    await replica.heartbeat()
    await aredis.flushall()
    api.listed, api.has_no_list = None, False
    clock.advance(2_000)
    with caplog.at_level(logging.WARNING):
        await replica.heartbeat()
        await replica.tick()
    assert replica._taking_back
    assert "takes the Node API's nodes back" in caplog.text
    assert "is not the one this replica ran on" not in caplog.text
    caplog.clear()
    clock.advance(600_000)
    with caplog.at_level(logging.WARNING):
        await replica.heartbeat()
    assert not replica._taking_back
    assert caplog.text.count("no node list from the Node API in 600s") == 1, caplog.text
    # and `provisioner status` no longer says it holds, from that heartbeat on
    [seen] = [r for r in await replica.scripts.replicas() if r.replica_id == "r1"]
    assert not seen.taking_back

async def test_a_replica_taking_the_nodes_back_keeps_beating_while_the_node_list_hangs(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """A review: the take-back after a loss awaited the Node API's list inside the heartbeat,
    up to the API's timeout times its attempts (about 30 s), so a replica whose API hung read
    as silent in `provisioner status` exactly while its state was lost, and its lag probes and
    clock offset stalled with it. The list is asked in a task of its own: the heartbeats keep
    their interval, still saying the hold, and the list that comes ends it."""
    service = ServiceConfig("redis://x", "http://api", pool=POOL, replica_id="r1",
                            heartbeat_interval_s=0.5)
    replica = Replica(aredis, service, FLOOR_ONLY, api, clock=clock, metrics=Metrics())
    replica.subscribed.set()
    await replica.heartbeat()
    await aredis.flushall()
    listing, answer = asyncio.Event(), asyncio.Event()
    asked = {"lists": 0}

    async def hung_list() -> list[ListedNode] | None:
        asked["lists"] += 1
        listing.set()
        await answer.wait()
        return [ListedNode("a", "ready")]

    api.list_nodes = hung_list  # type: ignore[method-assign]
    beating = asyncio.create_task(replica._every(0.5, replica.heartbeat, "heartbeat"))
    try:
        await asyncio.wait_for(listing.wait(), 5)
        await asyncio.sleep(10.5)  # past the silence threshold: 3 heartbeats, 10 s at least
        [seen] = [r for r in await replica.scripts.replicas() if r.replica_id == "r1"]
        assert not beating.done()
        assert not seen.silent and seen.age_s < 2, seen.describe()
        assert seen.taking_back and replica._taking_back
        assert asked["lists"] == 1  # one take-back at a time, not one a heartbeat
        answer.set()
        await _until(lambda: not replica._taking_back)
        assert await aredis.lrange(replica.keys.key("ready"), 0, -1) == ["a"]
        for _ in range(300):  # the next heartbeat says the hold is over
            [seen] = [r for r in await replica.scripts.replicas() if r.replica_id == "r1"]
            if not seen.taking_back:
                break
            await asyncio.sleep(0.01)
        assert not seen.taking_back
    finally:
        answer.set()
        replica.stopping.set()
        await asyncio.wait_for(beating, 5)
        if replica._take_back_task is not None:
            await asyncio.wait_for(replica._take_back_task, 5)


async def test_a_take_back_waiting_for_the_node_list_is_cancelled_after_the_grace(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The take-back runs beside the heartbeat loop: a stop still ends it, after what is left
    of the grace, before run() returns (no task left running with no owner)."""
    service = ServiceConfig("redis://x", "http://api", pool=POOL, replica_id="r1",
                            heartbeat_interval_s=0.2, reconcile_interval_s=0,
                            shutdown_grace_s=0.5)
    replica = Replica(aredis, service, FLOOR_ONLY, api, clock=clock, metrics=Metrics())
    listing = asyncio.Event()

    async def hangs() -> None:
        listing.set()
        await asyncio.sleep(60)  # a GET /api/nodes that takes the API timeout

    api.list_nodes = hangs  # type: ignore[method-assign]
    task = asyncio.create_task(replica.run())
    try:
        await _until(lambda: bool(replica._heartbeats[0]))
        await aredis.flushall()
        await asyncio.wait_for(listing.wait(), 5)
    finally:
        loop = asyncio.get_running_loop()
        started = loop.time()
        replica.stopping.set()
        with caplog.at_level(logging.WARNING):
            await asyncio.wait_for(task, 5)
    assert loop.time() - started < 3
    take_back = replica._take_back_task
    assert take_back is not None and take_back.cancelled()
    assert "stopping: take-back cancelled after 0.5s" in caplog.text


async def test_a_take_back_that_fails_after_its_heartbeat_is_counted_and_tried_again(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A take-back whose heartbeat stopped waiting for it fails on its own: counted as the
    heartbeat's error and logged, as it was when the heartbeat awaited it, and the next
    heartbeat tries again."""
    service = ServiceConfig("redis://x", "http://api", pool=POOL, replica_id="r1",
                            heartbeat_interval_s=0.1)
    replica = Replica(aredis, service, FLOOR_ONLY, api, clock=clock, metrics=Metrics())
    await replica.heartbeat()
    await aredis.flushall()
    answer = asyncio.Event()

    async def fails_late() -> list[ListedNode] | None:
        await answer.wait()
        raise RuntimeError("a bug in the list")

    api.list_nodes = fails_late  # type: ignore[method-assign]
    await replica.heartbeat()  # sees the loss; its take-back outlasts its interval
    take_back = replica._take_back_task
    assert take_back is not None and not take_back.done() and replica._taking_back
    with caplog.at_level(logging.ERROR):
        answer.set()
        await take_back
    assert counter(replica, "provisioner_errors_total", where="heartbeat") == 1
    assert "heartbeat failed" in caplog.text and "a bug in the list" in caplog.text
    api.list_nodes = FakeNodeApi.list_nodes.__get__(api)  # type: ignore[method-assign]
    api.listed = [ListedNode("a", "ready")]
    await replica.heartbeat()
    again = replica._take_back_task
    assert again is not None and again is not take_back
    await again  # (within the heartbeat's 0.1 s, unless the machine is slow)
    assert not replica._taking_back
    await replica.heartbeat()
    [seen] = [r for r in await replica.scripts.replicas() if r.replica_id == "r1"]
    assert not seen.taking_back


async def test_reconcile_counts_the_waits_served_by_a_node_adopted_or_freed(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """A node reconciliation adopts serves the oldest waiting user, and so does one freed
    when an allocated node vanished and its user went back to the queue: each counted as a
    served wait, as a listener's would be (a review: neither was)."""
    cfg = PoolConfig(min_ready=0, scaling_policy="heuristic", conversion=0)
    replica = make_replica(aredis, api, clock, "r1", cfg)
    await send([replica], "user:connect", {"user_id": "u1"})  # a miss
    clock.advance(30_000)
    api.listed = [ListedNode("adopted", "ready")]
    counts = await replica.reconcile()
    assert counts is not None and counts["adopted"] == 1
    assert await aredis.hgetall(replica.keys.key("alloc")) == {"u1": "adopted"}
    assert counter(replica, "provisioner_allocations_total", kind="after_wait") == 1
    await send([replica], "node:status", {"node_id": "spare", "status": "ready"})
    clock.advance(600_000)
    api.listed = [ListedNode("spare", "ready")]  # u1's node vanished: u1 waits, then spare
    counts = await replica.reconcile()
    assert counts is not None and counts["vanished"] == 1
    assert await aredis.hgetall(replica.keys.key("alloc")) == {"u1": "spare"}
    assert counter(replica, "provisioner_allocations_total", kind="after_wait") == 2


async def test_reconcile_ends_the_free_nodes_before_it_requeues_a_user_onto_one(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """A restarted Node API (the mock forgets its nodes) lists none of the pool's: ended one
    at a time in their order, an allocated node's user went back to the head of the queue and
    was handed the next ready node the same pass ended 2 ms later ("user ... served by node
    node-8cb220-4 after 0.0s", then "node node-8cb220-4 is not listed ...": an operator's
    drill), a `user:allocated` for a node that was gone. The free nodes end first."""
    cfg = PoolConfig(min_ready=0, scaling_policy="heuristic", conversion=0)
    replica = make_replica(aredis, api, clock, "r1", cfg)
    await send([replica], "node:status", {"node_id": "held", "status": "ready"})
    await send([replica], "user:connect", {"user_id": "u1"})  # a hit: u1 on "held"
    clock.advance(1_000)
    await send([replica], "node:status", {"node_id": "gone-ready", "status": "ready"})
    clock.advance(1_000)
    await send([replica], "node:status", {"node_id": "alive", "status": "ready"})
    clock.advance(600_000)
    api.listed = [ListedNode("alive", "ready")]
    counts = await replica.reconcile()
    assert counts is not None and counts["vanished"] == 2
    assert await aredis.hgetall(replica.keys.key("alloc")) == {"u1": "alive"}
    # served once, by the node that lives: never handed the one ended in the same pass
    assert counter(replica, "provisioner_allocations_total", kind="after_wait") == 1
    assert await check_invariants(aredis, POOL) == []


@contextlib.asynccontextmanager
async def _first_metrics_behind_a_silent_api(redis_url: str, aredis: aioredis.Redis,
                                             pool: str) -> AsyncIterator[Any]:
    """serve() for `pool` against a Node API that never answers, so its first tick waits for
    the first reconciliation up to the API's timeout; yields the first answer of its /metrics,
    which comes meanwhile. Stops it and drops the pool's keys after."""

    from provisioner.service import serve

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the replica gives up on it
        writer.close()

    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    api_port = silent.sockets[0].getsockname()[1]
    service = ServiceConfig(redis_url, f"http://127.0.0.1:{api_port}", pool=pool,
                            api_timeout_s=5)
    stop = asyncio.Event()
    serving, _, answer = await answering(
        lambda port: serve(dataclasses.replace(service, http_port=port), FLOOR_ONLY, stop),
        "/metrics")
    try:
        yield answer
    finally:
        stop.set()
        await asyncio.wait_for(serving, 15)
        silent.close()
        await aredis.delete(*[key async for key in aredis.scan_iter(f"prov:{{{pool}}}:*")])


async def test_the_pool_s_gauges_are_read_before_metrics_answer(
        redis_url: str, aredis: aioredis.Redis) -> None:
    """A replica's first tick waits for its first reconciliation (a slow Node API's list, up to
    its timeout); /metrics answered meanwhile with the pool's gauges at 0, and a scrape of
    `provisioner_values_repaired` 0 before the pool's 3 read as a rise: a restarted replica
    fired ProvisionerStateRepaired with nothing repaired (a review)."""
    await aredis.hset(PoolKeys("gauged").key("stats"), "values_repaired", 3)
    async with _first_metrics_behind_a_silent_api(redis_url, aredis, "gauged") as answer:
        assert re.findall(r"^provisioner_values_repaired .*$", answer.text, re.M) == [
            "provisioner_values_repaired 3.0"]


async def test_reconcile_deletes_again_a_node_the_pool_ended_that_the_api_still_runs(
    replica: Replica, api: FakeNodeApi, aredis: aioredis.Redis,
) -> None:
    """A node whose `terminated` the pool applied while the Node API still runs it (a DELETE
    lost, a status sent in error): it is counted and its DELETE sent again, or it runs on,
    paid for and in no pool."""
    for status in ("ready", "terminated"):
        await send([replica], "node:status", {"node_id": "n1", "status": status})
    assert await aredis.hget(replica.keys.node("n1"), "state") == "terminated"
    api.listed = [ListedNode("n1", "ready")]
    counts = await replica.reconcile()
    await replica.drain(5.0)
    assert counts is not None and counts["redeleted"] == 1 and counts["adopted"] == 0
    assert api.deleted == ["n1"]


async def test_a_run_of_activity_refused_whole_counts_each_event_and_the_rest_still_answer(
    aredis: aioredis.Redis, replica: Replica, caplog: pytest.LogCaptureFixture,
) -> None:
    """Activity events in a row go in one call; refused whole (a pool key broken by hand), its
    error is each of its events', and the events after it keep their own outcomes: handle_many
    never raises, and a disconnect behind the run is named for an operator."""
    await aredis.delete(replica.keys.key("stats"))
    await aredis.set(replica.keys.key("stats"), "by hand")
    with caplog.at_level(logging.WARNING):
        outcomes = await replica.handle_many([
            wire("user:activity", {"user_id": "a1", "timestamp": T0 // 1000}),
            wire("user:activity", {"user_id": "a2", "timestamp": T0 // 1000}),
            wire("user:activity", {"user_id": "a3", "timestamp": T0 // 1000}),
            wire("user:disconnect", {"user_id": "u1"})])
    assert outcomes == [None, None, None, None]
    assert counter(replica, "provisioner_errors_total", where="event") == 4
    assert "could not apply user:disconnect of u1 (dropped)" in caplog.text


async def test_a_state_put_back_from_a_copy_one_heartbeat_old_is_seen_as_a_loss(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """The copy was taken just before this replica's last heartbeat: its next heartbeat counts
    as many as the last one did (not fewer), and that is already an older copy."""
    replica = make_replica(aredis, api, clock, "r1")
    await replica.heartbeat()
    copy = {key: await aredis.dump(key) for key in await aredis.keys("*")}
    await replica.heartbeat()
    await aredis.flushall()
    for key, value in copy.items():
        await aredis.restore(key, 0, value)
    api.listed = []
    await replica.heartbeat()
    assert counter(replica, "provisioner_state_lost_total") == 1
    await replica.heartbeat()  # counting on from the copy: no second loss
    assert counter(replica, "provisioner_state_lost_total") == 1


async def test_a_listener_behind_less_than_twice_the_max_event_lag_is_not_taken_for_silent(
    redis_url: str, aredis: aioredis.Redis,
) -> None:
    """The silence allowed is the larger of twice --max-event-lag (here 3 s) and five
    heartbeats (1 s): a listener 2 s behind, its probe on the way, is live, and the connect
    published behind the probe reaches it on that subscription."""
    async with _listening_behind(redis_url, 2.0, max_lag_s=1.5) as replica:
        await replica.probe_lag()
        await aredis.publish("user:connect", json.dumps({"user_id": "hank"}))
        await _until(lambda: counter(replica, "provisioner_connects_total") == 1)
        assert counter(replica, "provisioner_errors_total", where="subscribe") == 0


async def test_a_delete_the_node_api_answers_ends_the_hold_on_creates(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """Any answer of the Node API, a DELETE's too, says it is up again: the next tick creates
    all it wants, not one probe."""
    replica = make_replica(aredis, api, clock, "r1",
                           dataclasses.replace(FLOOR_ONLY, min_ready=3, boot_timeout_s=60))
    await send([replica], "node:status", {"node_id": "stuck", "status": "booting"})
    api.create_outcomes.extend([CreateResult(CreateOutcome.FAILED, detail="down",
                                             api_down=True)] * 2)
    await replica.tick()
    await replica.settle()
    assert counter(replica, "provisioner_creates_held") == 1 and not api.created
    api.create_outcomes.append(CreateResult(CreateOutcome.FAILED, detail="down",
                                            api_down=True))
    answer_delete = api.delete

    async def answered_after_the_probe(node_id: str) -> DeleteOutcome:
        await asyncio.sleep(0.05)
        return await answer_delete(node_id)

    api.delete = answered_after_the_probe  # type: ignore[method-assign]
    clock.advance(61_000)  # the hold is over, and the booting node is stuck: reaped
    await replica.tick()  # one probe, unanswered; then the stuck node's DELETE is answered
    await replica.settle()
    assert api.deleted == ["stuck"] and not api.create_outcomes
    clock.advance(1_000)
    await replica.tick()
    await replica.settle()
    assert len(api.created) == 3  # all that the tick wants, not a probe


async def test_a_replica_whose_gauges_cannot_be_read_at_start_serves_all_the_same(
        redis_url: str, aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    """serve() reads the pool's gauges before /metrics answers; a read Redis refuses (a pool
    key of another type, edited by hand) is a warning, and /metrics answers all the same (the
    first tick reads them again)."""
    await aredis.set(PoolKeys("ungauged").key("stats"), "edited")
    with caplog.at_level(logging.WARNING, logger="provisioner.service"):
        async with _first_metrics_behind_a_silent_api(redis_url, aredis, "ungauged") as answer:
            assert answer.status_code == 200
            assert re.findall(r"^provisioner_values_repaired .*$", answer.text, re.M) == [
                "provisioner_values_repaired 0.0"]
    said = [rec.getMessage() for rec in caplog.records
            if "could not read the pool's gauges before serving /metrics" in rec.getMessage()]
    assert len(said) == 1 and "WRONGTYPE" in said[0], said


@pytest.mark.parametrize(("outcome", "deadline_ms"), [(DeleteOutcome.SENT, 45_000),
                                                      (DeleteOutcome.FAILED, 10_000)])
async def test_a_delete_answered_waits_its_terminated_for_delete_timeout_and_a_failed_one_10s(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    outcome: DeleteOutcome, deadline_ms: int,
) -> None:
    """A DELETE the API took (202) is given --delete-timeout for the node's `terminated`; one
    that failed is sent again DELETE_RETRY_MS (10 s) later: the termination's deadline, after
    which the next tick's winner sends it again."""
    replica = make_replica(aredis, api, clock, "r1",
                           PoolConfig(min_ready=0, idle_timeout_s=60, delete_timeout_s=45,
                                      scaling_policy="heuristic"))
    await send([replica], "node:status", {"node_id": "n1", "status": "ready"})
    clock.advance(61_000)
    api.delete_outcome = outcome
    await replica.tick()
    await replica.settle()
    assert api.deleted == ["n1"]
    sent = clock.now_ms()
    assert await aredis.zscore(replica.keys.key("terminating"), "n1") == sent + deadline_ms
    clock.advance(deadline_ms - 1_000)
    await replica.tick()
    await replica.settle()
    assert api.deleted == ["n1"]
    clock.advance(1_000)
    await replica.tick()
    await replica.settle()
    assert api.deleted == ["n1", "n1"]


async def test_a_reconciliation_that_only_left_young_nodes_for_later_repaired_nothing(
    replica: Replica, api: FakeNodeApi, aredis: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A node created within the grace that the API does not list yet is counted as left for
    later, and no repair is said for it: nothing was changed."""
    await send([replica], "node:status", {"node_id": "young", "status": "booting"})
    api.listed = []
    replica._looked.set()  # a turn after the first: the lock's
    with caplog.at_level(logging.WARNING):
        await replica._reconcile_if_due()
    assert await aredis.hget(replica.keys.node("young"), "state") == "booting"
    assert "repaired the pool" not in caplog.text, caplog.text
    # the same with a repair beside it: said
    api.listed = [ListedNode("stray", "ready")]
    await aredis.delete(replica.keys.reconcile_lock)
    with caplog.at_level(logging.WARNING):
        await replica._reconcile_if_due()
    assert "repaired the pool" in caplog.text and "'adopted': 1" in caplog.text, caplog.text


async def test_reconcile_judges_an_unlisted_node_missing_once_the_create_s_grace_is_over(
    replica: Replica, api: FakeNodeApi, clock: ManualClock, aredis: aioredis.Redis,
) -> None:
    """The grace is --create-timeout from its creation (60 s): a node created exactly that long
    ago is judged, one a millisecond younger is not; a creation stamped exactly that far ahead
    is still a create in flight, one a millisecond further a clock's error."""
    base = clock.now_ms()
    for node, at in (("edge", base), ("younger", base + 1), ("ahead", base + 120_000),
                     ("too-far-ahead", base + 120_001)):
        stamping = make_replica(aredis, api, ManualClock(at), "r-stamp")
        await send([stamping], "node:status", {"node_id": node, "status": "booting"})
    clock.advance(60_000)
    api.listed = []
    counts = await replica.reconcile()
    assert counts is not None and counts["vanished"] == 2
    ended = {node for node in ("edge", "younger", "ahead", "too-far-ahead")
             if await aredis.hget(replica.keys.node(node), "state") == "terminated"}
    assert ended == {"edge", "too-far-ahead"}


async def test_reconcile_hands_no_user_a_young_node_whose_ready_came_before_its_list(
    replica: Replica, api: FakeNodeApi, clock: ManualClock, aredis: aioredis.Redis,
) -> None:
    """A drill restarted the Node API with its nodes forgotten: reconciliation ended the old
    nodes and put their users at the head of the queue, and handed them at once the nodes
    younger than the create timeout, which it had left for later although the API had said
    they were ready: dead too, taken back a reconciliation (30 s) later. A node the pool heard
    `ready` for before the list was asked for is no create on its way to the list."""
    await send([replica], "node:status", {"node_id": "old", "status": "ready"})
    await send([replica], "user:connect", {"user_id": "u1"})
    assert await aredis.hgetall(replica.keys.key("alloc")) == {"u1": "old"}
    clock.advance(120_000)
    await send([replica], "node:status", {"node_id": "young-ready", "status": "ready"})
    await send([replica], "node:status", {"node_id": "young-boot", "status": "booting"})
    clock.advance(5_000)
    api.listed = []  # the Node API restarted and forgot every node
    counts = await replica.reconcile()
    assert counts is not None and counts["vanished"] == 2 and counts[LEFT_FOR_LATER] == 1
    assert await aredis.hget(replica.keys.node("young-ready"), "state") == "terminated"
    assert await aredis.hget(replica.keys.node("young-boot"), "state") == "booting"
    # u1 waits for a live node instead of being handed a dead one
    assert await aredis.hgetall(replica.keys.key("alloc")) == {}
    assert await check_invariants(aredis, POOL) == []


async def test_reconcile_does_not_judge_a_node_made_after_its_list_by_that_list(
    replica: Replica, api: FakeNodeApi, clock: ManualClock, aredis: aioredis.Redis,
) -> None:
    """A replica paused after the Node API's list came (a GC, a frozen VM: a review's drill
    stopped one for 71 s) judged the nodes booted meanwhile by it, ended 8 healthy ones and
    deleted them at the API. A node created since the list was asked for is left for later;
    one that was in the pool before it, and is not listed, is still ended."""
    await send([replica], "node:status", {"node_id": "old", "status": "ready"})
    clock.advance(60_000)
    other = make_replica(aredis, api, ManualClock(clock.now_ms() + 71_000), "r2")

    async def paused_after_answering() -> list[ListedNode]:
        clock.advance(71_000)  # the pause, after the API answered
        await send([other], "node:status", {"node_id": "booted-meanwhile", "status": "ready"})
        return []

    api.list_nodes = paused_after_answering  # type: ignore[method-assign]
    counts = await replica.reconcile()
    assert counts is not None and counts["vanished"] == 1 and counts[LEFT_FOR_LATER] == 1
    assert await aredis.hget(replica.keys.node("booted-meanwhile"), "state") == "ready"
    assert await aredis.hget(replica.keys.node("old"), "state") == "terminated"
    assert api.deleted == []


async def test_the_creating_gauge_does_not_count_a_node_whose_status_came_before_its_post(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """A create in flight whose node's `booting` came first (unclaimed) is one node, booting,
    not one booting and one creating: creating is pending less unclaimed."""
    replica = make_replica(aredis, api, clock, "r1")
    answer = asyncio.Event()
    create = api.create

    async def held() -> CreateResult:
        await answer.wait()
        return await create()

    api.create = held  # type: ignore[method-assign]
    await replica.tick()
    await replica.refresh_gauges(clock.now_ms())
    assert replica.metrics.registry.get_sample_value(
        "provisioner_nodes", {"state": "creating"}) == 1
    await send([replica], "node:status", {"node_id": "node-1", "status": "booting"})
    await replica.refresh_gauges(clock.now_ms())
    assert replica.metrics.registry.get_sample_value(
        "provisioner_nodes", {"state": "creating"}) == 0
    assert replica.metrics.registry.get_sample_value(
        "provisioner_nodes", {"state": "booting"}) == 1
    answer.set()
    await replica.settle()


async def test_a_replica_with_reconciliation_off_decides_without_waiting_for_one(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """The first decision waits for the replica's first turn at reconciliation; with
    --reconcile-interval 0 there is none, and the ticks must not wait for it for good."""
    service = ServiceConfig("redis://x", "http://api", pool=POOL, replica_id="r1",
                            reconcile_interval_s=0, heartbeat_interval_s=0)
    replica = Replica(aredis, service, FLOOR_ONLY, api, clock=clock, metrics=Metrics())
    task = asyncio.create_task(replica.run())
    try:
        await _until(lambda: counter(replica, "provisioner_scale_decisions_total") > 0)
        await replica.settle()
        assert counter(replica, "provisioner_scale_decisions_total") >= 1
        assert api.created == ["node-1"]
    finally:
        replica.stopping.set()
        await asyncio.wait_for(task, 5)


async def test_a_replica_stopping_is_not_ready(
    replica: Replica,
) -> None:
    """/readyz fails from the stop on, subscribed or not: traffic goes to the other replicas
    while it finishes its work."""
    replica.subscribed.set()
    assert replica.ready()
    replica.stopping.set()
    assert not replica.ready()


async def test_readyz_fails_until_the_listener_is_subscribed(replica: Replica) -> None:
    """Before its SUBSCRIBE is confirmed, and after its subscription is lost, a replica applies
    no connect and no node:status: /readyz must say so, or traffic goes to a replica that drops
    its events. Every other test of /readyz sets `subscribed` first."""
    status, body = await _readyz(replica)
    assert status == 503 and body["problems"] == ["not subscribed"], body
    replica.subscribed.set()
    assert (await _readyz(replica))[0] == 200
    replica.subscribed.clear()  # the listener lost its subscription and takes it again
    status, body = await _readyz(replica)
    assert status == 503 and body["problems"] == ["not subscribed"], body


async def test_readyz_names_a_server_that_refuses_the_connection(
    api: FakeNodeApi, clock: ManualClock,
) -> None:
    """A server gone (its port closed) is a redis-py ConnectionError, not an OSError: /readyz
    answers 503 naming it, not a 500 with a traceback an operator's probe reads as a crash."""
    from provisioner.redis_server import free_port

    gone = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    replica = make_replica(gone, api, clock, "r1")
    replica.subscribed.set()
    try:
        status, body = await _readyz(replica)
    finally:
        await gone.aclose()
    assert status == 503, body
    [problem] = body["problems"]
    assert problem.startswith("redis: Error ") and "connecting to 127.0.0.1:" in problem, problem


async def test_a_loop_whose_turn_hits_a_bug_logs_it_and_runs_on(
    replica: Replica, caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in one turn of a loop (a tick, a reconciliation) costs that turn alone: counted in
    provisioner_errors_total, logged with its traceback, and the loop runs again. A loop that
    died with it would leave the pool with no decision, no create and no reap, while /readyz,
    which looks at the listener, still said ready."""
    turns = {"n": 0}

    async def work() -> None:
        turns["n"] += 1
        if turns["n"] == 1:
            raise KeyError("a bug")

    with caplog.at_level(logging.ERROR):
        looping = asyncio.create_task(replica._every(0.01, work, "tick"))
        try:
            await _until(lambda: turns["n"] >= 3)
        finally:
            replica.stopping.set()
            await asyncio.wait_for(looping, 5)
    assert counter(replica, "provisioner_errors_total", where="tick") == 1
    [said] = [r for r in caplog.records if r.getMessage() == "tick failed"]
    assert said.exc_info is not None and said.exc_info[0] is KeyError
    assert replica.writes_refused() is None  # a bug says nothing of the server's writes


async def test_a_bug_in_the_look_for_other_pools_costs_the_look_not_the_heartbeat(
    aredis: aioredis.Redis, replica: Replica, caplog: pytest.LogCaptureFixture,
) -> None:
    """The heartbeat lists the replica for `provisioner status` and finds a lost state: a bug
    in its look for other pools is counted and logged, and the heartbeat is still sent. The
    server gone is not a bug: it fails the heartbeat, whose own call would fail the same."""
    async def broken() -> None:
        raise AttributeError("a bug")

    replica.look_for_other_pools = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR):
        await replica.heartbeat()
    assert counter(replica, "provisioner_errors_total", where="other_pools") == 1
    assert await aredis.zscore(replica.keys.key("replicas"), "r1") is not None
    assert any(r.exc_info and "could not look for other pools" in r.getMessage()
               for r in caplog.records), caplog.records

    async def gone() -> None:
        raise RedisConnectionError("Connection closed by server.")

    await aredis.delete(replica.keys.key("replicas"))
    replica.look_for_other_pools = gone  # type: ignore[method-assign]
    with pytest.raises(RedisConnectionError):
        await replica.heartbeat()
    assert counter(replica, "provisioner_errors_total", where="other_pools") == 1
    assert await aredis.zscore(replica.keys.key("replicas"), "r1") is None


async def test_a_node_action_whose_outcome_the_server_refuses_makes_the_replica_unready(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The Node API made the node and the server, past its maxmemory, refused the script that
    records it: the replica must be unready (its writes refused), as for a refused event or
    tick, not ready with a warning alone, until a write goes through."""
    replica = make_replica(aredis, api, clock, "r1", dataclasses.replace(FLOOR_ONLY, min_ready=1))
    replica.subscribed.set()
    with caplog.at_level(logging.WARNING):
        await _tick_with_register_node_raising(
            replica, OutOfMemoryError("command not allowed when used memory > 'maxmemory'."))
    assert api.created == ["node-1"]
    assert counter(replica, "provisioner_errors_total", where="action") == 1
    assert not any(r.exc_info for r in caplog.records)  # an outage, not a bug
    problem = await _the_one_problem(replica)
    assert problem.startswith("redis takes no writes for now: command not allowed when used "
                              "memory > 'maxmemory'"), problem


@pytest.mark.parametrize("beats_since_the_copy, another_replica", [
    (3, False), (0, False), (0, True)])
async def test_a_copy_put_back_while_the_heartbeat_ends_its_hold_is_still_seen_as_a_loss(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture, beats_since_the_copy: int, another_replica: bool,
) -> None:
    """Reviews of 1b78e02 and d953f1e: an older copy of the pool put back between the
    heartbeat's two calls (the hold began or ended in it; during the reconciliation's list
    call, a failover to a replica that had not caught up) went unseen: with the second call's
    count kept, it counts on from the copy's; with a mark one above the first's, a copy one
    heartbeat old passed it, and so did any, once another replica beat in between (the count
    is the pool's). The second call's count no higher than the first's is the proof: said at
    once."""
    replica = make_replica(aredis, api, clock, "r1")
    await replica.heartbeat()
    await aredis.flushall()  # a loss; the Node API fails to list: the hold begins
    api.listed, api.has_no_list = None, False
    clock.advance(2_000)
    await replica.heartbeat()
    assert replica._taking_back
    other = make_replica(aredis, FakeNodeApi(), clock, "r2")
    if another_replica:
        await other.heartbeat()  # r2 joins on the new epoch
    keys = [key async for key in aredis.scan_iter(f"{replica.keys.base}*")]
    copy = {key: await aredis.dump(key) for key in keys}  # the older copy
    for _ in range(beats_since_the_copy):  # 0: a copy of the state before this heartbeat
        clock.advance(2_000)
        await replica.heartbeat()
    assert replica._taking_back

    class PutBackWhileListing(FakeNodeApi):
        async def list_nodes(self) -> list[ListedNode] | None:
            for key, value in copy.items():
                await aredis.restore(key, 0, value, replace=True)
            return []

    listing = PutBackWhileListing()
    listing.has_no_list = False
    replica.node_api = listing
    clock.advance(2_000)
    with caplog.at_level(logging.ERROR, logger="provisioner.service"):
        # its first call counts on; the copy comes back; the hold ends, and begins again: the
        # second call's count went back, which is the put-back's proof
        await replica.heartbeat()
    assert counter(replica, "provisioner_state_lost_total") == 2, caplog.text
    assert "was put back from an older copy" in caplog.text
    assert replica._taking_back
    replica.node_api = api
    api.listed = []
    if another_replica:
        await other.heartbeat()  # r2's beat, in its interval
    clock.advance(2_000)
    await replica.heartbeat()  # taken back again; the loss not counted twice
    assert not replica._taking_back
    assert counter(replica, "provisioner_state_lost_total") == 2


async def test_a_replica_says_when_its_server_may_evict_the_pool_s_keys(
    aredis: aioredis.Redis, replica: Replica, caplog: pytest.LogCaptureFixture,
) -> None:
    """A server with a maxmemory and a policy other than noeviction deletes keys in silence
    once full (any of the pool's under allkeys-*): the pool's state corrupt, and no replica
    would know. Each heartbeat reads INFO memory; the replica says it once, exports it, and
    `provisioner status` names it. No maxmemory, or noeviction, and it cannot evict."""
    before = {name: (await aredis.config_get(name))[name]
              for name in ("maxmemory", "maxmemory-policy")}
    try:
        await replica.heartbeat()
        assert counter(replica, "provisioner_server_may_evict") == 0
        await aredis.config_set("maxmemory-policy", "allkeys-lru")  # no maxmemory: no eviction
        await replica.heartbeat()
        assert counter(replica, "provisioner_server_may_evict") == 0
        await aredis.config_set("maxmemory", str(1 << 30))
        with caplog.at_level(logging.WARNING, logger="provisioner.service"):
            await replica.heartbeat()
            await replica.heartbeat()
        assert counter(replica, "provisioner_server_may_evict") == 1
        said = [r.getMessage() for r in caplog.records if "may delete" in r.getMessage()]
        assert said == ["the Redis server may delete the pool's keys to make room: maxmemory "
                        f"{1 << 30} bytes with maxmemory-policy allkeys-lru. Full, it deletes "
                        "any of the pool's keys in silence, and the pool's state is corrupt; "
                        "set maxmemory-policy noeviction, under which it refuses writes "
                        "instead (README, \"Using it\")"], said
        [seen] = await replica.scripts.replicas()
        assert seen.server_evicts == "allkeys-lru"
        assert "its server may evict the pool's keys (maxmemory-policy allkeys-lru)" in (
            seen.describe())
        await aredis.config_set("maxmemory-policy", "noeviction")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="provisioner.service"):
            await replica.heartbeat()
        assert counter(replica, "provisioner_server_may_evict") == 0
        assert "can no longer evict the pool's keys" in caplog.text
        [seen] = await replica.scripts.replicas()
        assert seen.server_evicts == "" and "evict" not in seen.describe()
    finally:
        for name, value in before.items():
            await aredis.config_set(name, value)


async def test_a_server_that_refuses_info_leaves_eviction_unknown_and_the_heartbeat_going(
    aredis: aioredis.Redis, replica: Replica, caplog: pytest.LogCaptureFixture,
) -> None:
    """An ACL without INFO, or a proxy: the eviction policy cannot be read, which the replica
    says (once an hour) and exports as -1; the heartbeat goes on."""
    async def refused(*_: Any, **__: Any) -> Any:
        raise ResponseError("NOPERM this user has no permissions to run the 'info' command")

    replica.redis.info = refused  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="provisioner.service"):
        await replica.heartbeat()
        await replica.heartbeat()
    assert counter(replica, "provisioner_server_may_evict") == -1
    assert caplog.text.count("could not read the server's INFO memory (NOPERM") == 1
    assert await aredis.zscore(replica.keys.key("replicas"), "r1") is not None


async def test_an_info_that_times_out_once_costs_the_heartbeat_and_readiness(
    aredis: aioredis.Redis, replica: Replica,
) -> None:
    """Review of 3aab8da: INFO memory is a read, before the heartbeat's write. One that times
    out (the writes answered) fails the whole heartbeat: its entry is not written, and the
    heartbeat loop takes the timeout for a write left unanswered (/readyz 503, "no answer to
    its heartbeat"). The eviction look should cost only the look, as a bug in
    look_for_other_pools does."""
    real_info, timeouts = replica.redis.info, {"left": 1}

    async def info(*args: Any, **kwargs: Any) -> Any:
        if timeouts["left"] > 0:
            timeouts["left"] -= 1
            raise RedisTimeoutError("Timeout reading from 127.0.0.1:6379")
        return await real_info(*args, **kwargs)

    replica.redis.info = info  # type: ignore[method-assign]
    replica.subscribed.set()
    beating = asyncio.create_task(replica._every(60, replica.heartbeat, "heartbeat"))
    try:
        await _until(lambda: timeouts["left"] == 0)
        await asyncio.sleep(0.2)
        written = await aredis.zscore(replica.keys.key("replicas"), "r1")
        refused = replica.writes_refused()
    finally:
        replica.stopping.set()
        await beating
    failed = counter(replica, "provisioner_errors_total", where="heartbeat")
    assert (failed, refused, written is not None) == (0, None, True), (failed, refused, written)


async def test_an_info_memory_without_the_policy_leaves_eviction_unknown(
    aredis: aioredis.Redis, replica: Replica,
) -> None:
    """Review of 3aab8da: a server or proxy whose INFO memory answers without
    `maxmemory_policy` / `maxmemory` (another engine, a proxy that filters INFO) is read as
    one that cannot evict (0, "should be 0"), where nothing was learnt: -1, as a refused INFO."""
    async def info(*_: Any, **__: Any) -> Any:
        return {"used_memory": 1_000_000}

    replica.redis.info = info  # type: ignore[method-assign]
    await replica.heartbeat()
    assert counter(replica, "provisioner_server_may_evict") == -1


def test_a_hand_written_eviction_policy_is_read_only_as_a_string() -> None:
    """The replica's entry is JSON anyone may edit: a policy that is no string is none (as
    `taking_back` is read only when true), and a long one is cut."""
    from provisioner.scripts import ReplicaSeen

    for written in (123, {"a": 1}, True, None, ["allkeys-lru"]):
        assert ReplicaSeen.of("r1", 0, {"server_evicts": written}).server_evicts == "", written
    assert ReplicaSeen.of("r1", 0, {"server_evicts": "x" * 99}).server_evicts == "x" * 40


async def test_a_hold_a_tick_ended_during_the_heartbeats_take_back_is_not_said_held(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A tick that ends the take-back's hold on its patience while the heartbeat's
    reconciliation waits for the Node API: the heartbeat said "no scaling decision until it
    has one" of a replica deciding again (with `_taking_back_since` None, `_take_back_over`
    says False)."""
    replica = make_replica(aredis, api, clock, "r1", PoolConfig(
        min_ready=2, scaling_policy="heuristic", conversion=0))
    await replica.heartbeat()
    await aredis.flushall()
    api.listed, api.has_no_list = None, False
    clock.advance(2_000)
    await replica.heartbeat()  # sees the loss: holds
    assert replica._taking_back
    clock.advance(600_000)  # the patience has passed; the next tick ends the hold
    real_list = api.list_nodes

    async def list_while_a_tick_runs() -> Any:
        api.list_nodes = real_list  # type: ignore[method-assign]
        await replica.tick()  # a tick in the reconciliation's wait
        return await real_list()

    api.list_nodes = list_while_a_tick_runs  # type: ignore[method-assign]
    warned: list[str] = []
    real_warning = replica._trouble.warning

    def warning(key: str, message: str, *args: object) -> bool:
        warned.append(key)
        return real_warning(key, message, *args)

    replica._trouble.warning = warning  # type: ignore[method-assign]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        await replica.heartbeat()
    await replica.settle()
    assert not replica._taking_back
    said = [r.getMessage() for r in caplog.records]
    assert sum("no node list from the Node API in" in s for s in said) == 1, said
    assert "take-back" not in warned, warned  # "no scaling decision until it has one"


async def test_a_burst_of_creates_under_a_paused_server_waits_for_its_connections(
    redis_url: str, aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """Found after a review of the mock: the client's default pool refuses a command while
    its 100 connections are in use ("Too many connections"), so 400 creates whose answers came
    while the server was paused for a second failed to record the nodes they had made, each
    left to its reservation's deadline and to adoption. The replica's client waits for one."""
    client = redis_client(redis_url)  # `aredis` flushed the server; this one's pool blocks
    pauser = aioredis.Redis.from_url(redis_url)
    api.delay = 0.2  # the answers come during the pause
    replica = make_replica(client, api, clock, "r1",
                           PoolConfig(min_ready=400, max_nodes=1000, max_batch=400))
    try:
        await replica.tick()
        await pauser.execute_command("CLIENT", "PAUSE", "1000", "ALL")
        await replica.settle()
        assert len(api.created) == 400
        counts = (await replica.scripts.snapshot(clock.now_ms(), 120_000)).counts
        assert (counts["booting"], counts.get("creating", 0)) == (400, 0), counts
        assert counter(replica, "provisioner_errors_total", where="action") == 0
    finally:
        await client.aclose()
        await pauser.aclose()


async def test_a_replica_s_client_waits_for_a_connection_rather_than_failing(
        redis_url: str, aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve` builds its client with `redis_client`, whose pool blocks (the test above): the
    client's default refused the 101st command at once."""
    from redis.asyncio import BlockingConnectionPool

    import provisioner.service as service_module

    made: list[aioredis.Redis] = []

    def recorded(url: str, **options: Any) -> aioredis.Redis:
        made.append(redis_client(url, **options))
        return made[-1]

    monkeypatch.setattr(service_module, "redis_client", recorded)
    service = ServiceConfig(redis_url, "http://127.0.0.1:9", pool="blocking",
                            http_host="127.0.0.1", reconcile_interval_s=0)
    stop = asyncio.Event()
    serving, _, _ = await answering(
        lambda port: service_module.serve(dataclasses.replace(service, http_port=port),
                                          FLOOR_ONLY, stop), "/healthz", "127.0.0.1")
    try:
        assert len(made) == 1
        assert isinstance(made[0].connection_pool, BlockingConnectionPool)
    finally:
        stop.set()
        await asyncio.wait_for(serving, 30)
        await aredis.delete(*[key async for key in aredis.scan_iter("prov:{blocking}:*")])


async def test_a_create_stuck_for_good_holds_the_probes_no_longer_than_its_deadline(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    # A refused create whose recording is never answered (a Redis reply lost, no socket
    # timeout): the probes wait for it no longer than its reservation's deadline.
    replica = make_replica(aredis, api, clock, "r1", dataclasses.replace(FLOOR_ONLY, min_ready=3))
    answer: CreateResult | None = CreateResult(CreateOutcome.FAILED, detail="HTTP 401",
                                               refused=True)
    calls = 0

    async def create() -> CreateResult:
        nonlocal calls
        calls += 1
        return answer or CreateResult(CreateOutcome.CREATED, f"node-{calls}")

    api.create = create  # type: ignore[method-assign]
    real_cancel = replica.scripts.cancel_create
    never = asyncio.Event()
    stuck: list[str] = []

    async def cancel_create(reservation: str, *args: Any) -> Any:
        if not stuck:
            stuck.append(reservation)
            await never.wait()
        return await real_cancel(reservation, *args)

    replica.scripts.cancel_create = cancel_create  # type: ignore[method-assign]

    async def ticks(n: int) -> None:
        for _ in range(n):
            clock.advance(1_000)
            await replica.tick()
            await asyncio.sleep(0.01)

    await replica.tick()
    for _ in range(200):
        if stuck and calls == 3:
            break
        await asyncio.sleep(0.01)
    assert calls == 3  # the floor; the first one's answer is never recorded
    answer = None  # the API takes creates again
    await ticks(120)
    assert calls == 3 + 3  # creates made again once the stuck create's deadline has passed
    never.set()
    await replica.settle()


async def test_the_listener_outlives_an_error_it_does_not_expect(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An error of the listener's other than RedisError or OSError (a bug, a library's error
    of another kind) ended the listener for the life of the process: never subscribed again,
    nothing logged, and run()'s gather(return_exceptions=True) swallowed it at the stop."""
    replica = make_replica(aredis, api, clock, "r1")
    real = replica._read_batch
    reads = 0

    async def first_read_fails(pubsub: Any) -> list[tuple[bytes, bytes]]:
        nonlocal reads
        reads += 1
        if reads == 1:
            raise RuntimeError("a bug in the listener")
        return await real(pubsub)

    replica._read_batch = first_read_fails  # type: ignore[method-assign]
    caplog.set_level(logging.WARNING, logger="provisioner.service")
    task = asyncio.create_task(replica.run())
    applied = False
    try:
        for _ in range(300):  # the listener subscribes again within a second
            await asyncio.sleep(0.01)
            if reads > 1 and replica.subscribed.is_set():
                break
        await aredis.publish("user:connect", json.dumps({"user_id": "u1"}))
        for _ in range(200):
            if await aredis.hexists(replica.keys.key("waiting_since"), "u1"):
                applied = True
                break
            await asyncio.sleep(0.01)
    finally:
        replica.stopping.set()
        await asyncio.wait_for(task, 10)
    assert applied, (f"the listener never came back (reads {reads}, subscribed "
                     f"{replica.subscribed.is_set()})")
    assert any(r.exc_info and "a bug in the listener" in str(r.exc_info[1])
               for r in caplog.records), "the listener's error was never logged"
    assert counter(replica, "provisioner_errors_total", where="subscribe") >= 1


async def test_a_cancelled_serve_leaves_no_replica_running(
    redis_url: str, aredis: aioredis.Redis,
) -> None:
    """serve() cancelled (an embedding's wait_for, a supervisor's cancel) closed its clients
    and returned while replica.run() and its loops ran on, with no owner: still subscribed,
    applying events and deciding ticks (its creates failing on the closed Node API client)."""
    from provisioner.service import serve

    loops = {"replica", "listen", "tick", "loop-watch", "heartbeat", "reconcile"}
    service = ServiceConfig(redis_url, "http://127.0.0.1:9", pool="cancelled", http_port=0,
                            replica_id="cancelled-r1", reconcile_interval_s=0)
    probe = "provisioner:lag:cancelled:0:cancelled-r1"
    serving = asyncio.create_task(serve(service, FLOOR_ONLY, asyncio.Event()))
    try:
        for _ in range(500):
            if dict(await aredis.pubsub_numsub(probe)).get(probe):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("never subscribed")
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        await asyncio.sleep(1.0)
        left = sorted(t.get_name() for t in asyncio.all_tasks()
                      if t.get_name() in loops and not t.done())
        subscribed = dict(await aredis.pubsub_numsub(probe)).get(probe)
        assert not left and not subscribed, (
            f"serve returned, and these run on: {left}; subscribed {subscribed}")
    finally:
        for t in asyncio.all_tasks():
            if t.get_name() in loops:
                t.cancel()
        await asyncio.sleep(0.1)
        await aredis.delete(*[key async for key in aredis.scan_iter("prov:{cancelled}:*")]
                            or ["-"])


async def test_a_reconciliation_begun_before_a_loss_does_not_end_the_take_back(
    aredis: aioredis.Redis, api: FakeNodeApi, clock: ManualClock,
) -> None:
    """A reconciliation pass reads the pool's nodes after its list, then applies what it
    found. A loss the heartbeat sees while the pass applies (the pool's keys gone, the
    connection kept) holds the ticks; the pass then ended with the list it had, and ended the
    hold ("the nodes are back, whoever held") though the nodes it knew from the old state were
    never taken into the new one: the next tick booted a pool beside them, past max_nodes."""
    replica = make_replica(aredis, api, clock, "r1", PoolConfig(
        min_ready=3, max_nodes=3, scaling_policy="heuristic", conversion=0))
    await replica.heartbeat()
    api.listed = [ListedNode("a", "ready"), ListedNode("b", "ready")]
    await replica.reconcile()  # a and b in the pool
    api.listed = [ListedNode("a", "ready"), ListedNode("b", "ready"), ListedNode("c", "ready")]
    gate, at_gate = asyncio.Event(), asyncio.Event()
    real = replica.scripts.apply_node_status

    async def gated(*args: Any, **kwargs: Any) -> Any:
        at_gate.set()
        await gate.wait()
        return await real(*args, **kwargs)

    replica.scripts.apply_node_status = gated  # type: ignore[method-assign]
    replica._looked.set()  # not a first turn: the lock decides, and it is free
    passing = asyncio.create_task(replica._reconcile_if_due())
    await asyncio.wait_for(at_gate.wait(), 5)  # the pass read {a, b}, and adopts c
    replica.scripts.apply_node_status = real  # type: ignore[method-assign]
    await aredis.flushall()  # the state is lost
    api.listed, api.has_no_list = None, False  # and the Node API fails to list for a while
    clock.advance(2_000)
    await replica.heartbeat()  # sees the loss: the ticks are held
    assert replica._taking_back
    gate.set()
    await passing
    held = replica._taking_back
    clock.advance(1_000)
    await replica.tick()
    await replica.settle()
    assert held and api.created == [], (
        f"held {held}; booted {api.created} beside a, b and c (max_nodes 3)")


async def test_a_create_named_with_an_id_no_url_can_hold_raises_no_traceback(
    aredis: aioredis.Redis, clock: ManualClock, caplog: pytest.LogCaptureFixture,
) -> None:
    import httpx

    from provisioner.nodeapi import HttpNodeApi

    deletes = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "DELETE":
            deletes.append(request.url.path)
            return httpx.Response(202)
        return httpx.Response(202, json={"id": "ü" * 11_000})

    api = HttpNodeApi("http://api", attempts=1, metrics=Metrics(),
                      transport=httpx.MockTransport(handler))
    replica = make_replica(aredis, api, clock, "r1")
    with caplog.at_level("ERROR"):
        await replica.tick()
        await replica.drain(5.0)
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
    assert tracebacks == [], tracebacks
    assert counter(replica, "provisioner_errors_total", where="action") == 0


async def test_a_node_whose_delete_is_answered_410_leaves_the_pool(
    aredis: aioredis.Redis, clock: ManualClock,
) -> None:
    """A 410 is the node gone, as a 404: it was kept `terminating`, counted against max_nodes,
    and its DELETE sent again every 10 s."""
    import httpx

    from provisioner.nodeapi import HttpNodeApi

    deletes = []

    def handler(request: httpx.Request) -> httpx.Response:
        deletes.append(request.url.path)
        return httpx.Response(410)

    api = HttpNodeApi("http://api", attempts=1, metrics=Metrics(),
                      transport=httpx.MockTransport(handler))
    replica = make_replica(aredis, api, clock, "r1",
                           PoolConfig(min_ready=0, idle_timeout_s=60, scaling_policy="heuristic"))
    await send([replica], "node:status", {"node_id": "n1", "status": "ready"})
    clock.advance(61_000)
    await replica.tick()
    await replica.settle()
    for _ in range(3):
        clock.advance(10_000)
        await replica.tick()
        await replica.settle()
    assert deletes == ["/api/nodes/n1"]
    assert await aredis.zscore(replica.keys.key("terminating"), "n1") is None
    assert await aredis.hget(replica.keys.node("n1"), "state") == "terminated"


async def test_a_node_the_api_names_with_an_integer_is_heard_of_by_that_integer(
    aredis: aioredis.Redis, clock: ManualClock,
) -> None:
    """The client takes an id the API writes as an integer ({"id": 17}: node "17"); the
    listener refused the same API's `node:status` {"node_id": 17}, a wrong type: the node was
    never ready (a user waited beside it until the boot timeout reaped it)."""
    import httpx

    from provisioner.nodeapi import HttpNodeApi

    api = HttpNodeApi("http://api", attempts=1, metrics=Metrics(), transport=httpx.MockTransport(
        lambda request: httpx.Response(202, json={"id": 17})))
    replica = make_replica(aredis, api, clock, "r1")
    await replica.tick()  # the floor: one create
    await replica.drain(5.0)
    assert await aredis.hget(replica.keys.node("17"), "state") == "booting"
    await send([replica], "node:status", {"node_id": 17, "status": "ready"})
    assert await aredis.hget(replica.keys.node("17"), "state") == "ready"


@contextlib.asynccontextmanager
async def _listening_through(redis_url: str, pipe: Any,
                             **client: Any) -> AsyncIterator[Replica]:
    """A probing replica listening through a TCP proxy before the server, each connection's
    two directions copied by `pipe(reader, writer, client_w, upstream)` (`client_w`: the
    replica's end, to close); `client`: the replica's client's options."""
    target = urlparse(redis_url)
    tasks: list[asyncio.Future[Any]] = []

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(target.hostname, target.port)
        tasks.append(asyncio.gather(pipe(client_r, server_w, client_w, True),
                                    pipe(server_r, client_w, client_w, False)))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with _replica_through(server, tasks, **client) as replica:
        yield replica


async def test_a_subscription_whose_confirmation_never_comes_is_taken_again(
    redis_url: str, aredis: aioredis.Redis,
) -> None:
    """The path dies between the SUBSCRIBE and its confirmation (a partition, a middlebox
    dropping the flow): the server has the SUBSCRIBE, nothing comes back. The listener must
    not wait for that confirmation for good: it subscribes again, becomes subscribed, and
    applies what comes after."""
    swallowed: list[asyncio.StreamWriter] = []  # the replica's end of the connection held

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   client_w: asyncio.StreamWriter, upstream: bool) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if upstream and b"SUBSCRIBE" in data.upper() and not swallowed:
                    swallowed.append(client_w)  # the first subscriber's replies never come
                elif not upstream and client_w in swallowed:
                    await asyncio.Event().wait()  # held: a silent path
                writer.write(data)
                await writer.drain()

    async with _listening_through(redis_url, pipe) as replica:
        async def heartbeats() -> None:  # the heartbeats' probes, every 0.2 s
            while True:
                with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError,
                                         asyncio.TimeoutError):
                    await asyncio.wait_for(replica.probe_lag(), 0.5)
                await asyncio.sleep(0.2)

        probing = asyncio.create_task(heartbeats())
        try:
            await _heard_after_subscribing_again(
                replica, aredis, lambda: f"SUBSCRIBE swallowed {bool(swallowed)}, probes out "
                f"{len(replica._probes_out)}", 12)
        finally:
            probing.cancel()
            await asyncio.gather(probing, return_exceptions=True)


def _ending_subscribes_while(broken: asyncio.Event) -> Any:
    """A proxy's pipe (`_listening_through`) that, while `broken` is set, ends a connection as
    its SUBSCRIBE goes by, before any confirmation comes back."""
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   client_w: asyncio.StreamWriter, upstream: bool) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if upstream and broken.is_set() and b"SUBSCRIBE" in data.upper():
                    client_w.close()
                    return
                writer.write(data)
                await writer.drain()
            writer.close()  # the other side ended
    return pipe


async def test_the_gap_counts_the_tries_whose_subscription_was_never_confirmed(
    redis_url: str, aredis: aioredis.Redis,
) -> None:
    """A subscription lost, then tries whose connection ends after the SUBSCRIBE and before its
    confirmation (for ~2 s): the replica was deaf all that while, and the gap says so."""
    broken = asyncio.Event()
    async with _listening_through(redis_url, _ending_subscribes_while(broken)) as replica:
        await asyncio.wait_for(replica.subscribed.wait(), 5)
        broken.set()
        await aredis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await _until(lambda: counter(replica, "provisioner_errors_total",
                                     where="subscribe") >= 3)
        await asyncio.sleep(2 - (0.2 + 0.4))
        lost_for = time.monotonic()
        broken.clear()
        await asyncio.wait_for(replica.subscribed.wait(), 5)
        await _until(lambda: counter(replica, "provisioner_unsubscribed_seconds_total") > 0)
        gap = counter(replica, "provisioner_unsubscribed_seconds_total")
        assert gap > 1.5, f"deaf ~2s+, counted {gap:.2f}s (cleared {lost_for})"


async def test_a_replica_stopped_before_it_subscribed_again_counts_and_says_its_gap(
    redis_url: str, aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture,
) -> None:
    """A subscription lost, then tries that never come to a confirmation, then a stop: the
    replica was deaf from the loss to the stop, and its gap and its log say so (before, a gap
    was counted only once subscribed again, so this one went unsaid)."""
    broken = asyncio.Event()
    with caplog.at_level("WARNING", logger="provisioner.service"):
        async with _listening_through(redis_url, _ending_subscribes_while(broken)) as replica:
            await asyncio.wait_for(replica.subscribed.wait(), 5)
            broken.set()
            await aredis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            lost = time.monotonic()
            await _until(lambda: counter(replica, "provisioner_errors_total",
                                         where="subscribe") >= 2)
            await asyncio.sleep(1.5 - (time.monotonic() - lost))
            assert counter(replica, "provisioner_unsubscribed_seconds_total") == 0
        gap = counter(replica, "provisioner_unsubscribed_seconds_total")
    assert gap >= 1.4, f"deaf 1.5 s and more before the stop, counted {gap:.2f}s"
    assert re.search(r"stopped \d+\.\ds after the subscription was lost, not subscribed again",
                     caplog.text)


@pytest.mark.parametrize("parser", ["hiredis", "python"])
async def test_a_subscription_whose_confirmation_is_cut_off_midway_is_taken_again(
    redis_url: str, aredis: aioredis.Redis, parser: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """The path dies inside the server's confirmation of the SUBSCRIBE: the first channels'
    confirmations come, then part of the last one, then nothing (a connection dead inside a
    message, as `test_a_connection_that_dies_inside_a_message_is_taken_for_dead` has it for a
    subscribed listener). The bytes of the message cut off stay unparsed for good, so a check
    that waits for no bytes waiting never fires: the listener must subscribe again all the same,
    not stay deaf and unready. With either of redis-py's parsers: the pure-Python one's
    check of its buffers sees the bytes of a message cut off."""
    cut: list[asyncio.StreamWriter] = []  # the replica's end whose confirmation is cut off

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   client_w: asyncio.StreamWriter, upstream: bool) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if upstream and b"SUBSCRIBE" in data.upper() and not cut:
                    cut.append(client_w)
                elif not upstream and client_w in cut:
                    writer.write(data[:-3])  # the last confirmation cut off, 3 bytes short
                    await writer.drain()
                    await asyncio.Event().wait()  # held: a silent path
                writer.write(data)
                await writer.drain()

    with caplog.at_level("WARNING", logger="provisioner.service"):
        async with _listening_through(redis_url, pipe,
                                      parser_class=_parser_class(parser)) as replica:
            await _heard_after_subscribing_again(
                replica, aredis, lambda: f"confirmation cut {bool(cut)}", 15)
    # Said as what it is: no probe goes out before the confirmation, so none was missed.
    assert "is still unconfirmed (no probe goes out before it is)" in caplog.text


async def _heard_after_subscribing_again(replica: Replica, aredis: aioredis.Redis,
                                         what: Callable[[], str], within_s: float) -> None:
    """Connects published once `replica` says it is subscribed, until it applies one (within
    `within_s`; `what` says what the path did, if not); and it got there by subscribing
    again."""
    started, sent = time.monotonic(), 0
    while counter(replica, "provisioner_connects_total") == 0:
        assert time.monotonic() - started < within_s, (
            f"never heard: {what()}, subscribed {replica.subscribed.is_set()}, confirmed "
            f"{replica._confirmed}, errors "
            f"{counter(replica, 'provisioner_errors_total', where='subscribe')}")
        if replica.subscribed.is_set():
            sent += 1
            await aredis.publish("user:connect", json.dumps({"user_id": f"late{sent}"}))
        await asyncio.sleep(0.5)
    assert counter(replica, "provisioner_errors_total", where="subscribe") >= 1
