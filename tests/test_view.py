"""The invariant checker reports what held at one instant, never a torn read.

CI once failed because `check_invariants` read the node records after the structures, while a
replica applied a node's `terminated` status in between: the pool was consistent at every
instant, the read was not. These tests race a writer that moves a node atomically between two
states against the checker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import WatchError
from typer.testing import CliRunner, Result

from provisioner import view
from provisioner.cli import app
from provisioner.config import PoolConfig
from provisioner.keys import PoolKeys
from provisioner.scripts import Scripts, commands_refused
from provisioner.view import check_invariants
from tests.helpers import T0, heard_ago

POOL = "view"
KEYS = PoolKeys(POOL)


async def _flip(client: aioredis.Redis, node: str, to_ready: bool) -> None:
    """One atomic transition booting <-> ready, as a script would make it."""
    async with client.pipeline(transaction=True) as pipe:
        if to_ready:
            pipe.zrem(KEYS.key("booting"), node)
            pipe.rpush(KEYS.key("ready"), node)
            pipe.hset(KEYS.node(node), "state", "ready")
        else:
            pipe.lrem(KEYS.key("ready"), 0, node)
            pipe.zadd(KEYS.key("booting"), {node: 1})
            pipe.hset(KEYS.node(node), "state", "booting")
        await pipe.execute()


async def _seed(client: aioredis.Redis, nodes: list[str]) -> None:
    for node in nodes:
        await client.zadd(KEYS.key("nodes"), {node: 1})
        await client.zadd(KEYS.key("booting"), {node: 1})
        await client.hset(KEYS.node(node), mapping={"id": node, "state": "booting"})


async def test_a_pool_changing_under_the_checker_is_never_reported_torn(
    redis_url: str, aredis: aioredis.Redis,
) -> None:
    nodes = [f"n{i}" for i in range(8)]
    await _seed(aredis, nodes)
    writer = aioredis.Redis.from_url(redis_url, decode_responses=True)
    stop = asyncio.Event()
    flips = 0

    async def churn() -> None:
        nonlocal flips
        while not stop.is_set():
            for node in nodes:
                await _flip(writer, node, to_ready=flips % 2 == 0)
            flips += 1
            await asyncio.sleep(0.005)  # a busy pool, not a livelock: reads can complete

    task = asyncio.create_task(churn())
    reports: list[list[str]] = []
    try:
        # at least 60 checks, and on until the writer has moved the nodes often enough: a fast
        # checker may finish 60 before a slow writer's tenth pass
        while (len(reports) < 60 or flips <= 10) and len(reports) < 10_000:
            reports.append(await check_invariants(aredis, POOL, attempts=200))
    finally:
        stop.set()
        await task
        await writer.aclose()
    assert flips > 10, "the writer must have moved the nodes while the checker read"
    assert all(report == [] for report in reports), [r for r in reports if r][:3]


async def test_a_real_inconsistency_is_reported(aredis: aioredis.Redis) -> None:
    await _seed(aredis, ["n1", "n2"])
    await aredis.hset(KEYS.node("n2"), "state", "terminated")
    await aredis.rpush(KEYS.key("ready"), "n1")
    problems = await check_invariants(aredis, POOL)
    assert "node n2 record says terminated, structures say booting" in problems
    assert any("both booting and ready" in p for p in problems)


async def test_a_stray_id_is_named_alone_not_beside_every_node(aredis: aioredis.Redis) -> None:
    # One bogus id in the ready list printed every live node twice, 50 of them each time.
    await _seed(aredis, [f"n{i}" for i in range(50)])
    await aredis.rpush(KEYS.key("ready"), "bogus-node2", "bogus-node2")
    problems = await check_invariants(aredis, POOL)
    assert "live nodes apart: in any state's structure, not the nodes set: ['bogus-node2']" \
        in problems
    assert "ready list has duplicates: ['bogus-node2']" in problems
    assert all("n49" not in p for p in problems)


async def _ready(client: aioredis.Redis, node: str) -> None:
    await client.zadd(KEYS.key("nodes"), {node: 1})
    await client.rpush(KEYS.key("ready"), node)
    await client.hset(KEYS.node(node), mapping={"id": node, "state": "ready"})


async def _held(client: aioredis.Redis, user: str, node: str, named: str = "") -> None:
    """`user` holds `node` (its record naming `named`, the user by default)."""
    await client.zadd(KEYS.key("nodes"), {node: 1})
    await client.hset(KEYS.key("alloc"), user, node)
    await client.zadd(KEYS.key("sessions"), {user: 1})
    await client.hset(KEYS.node(node), mapping={"id": node, "state": "allocated",
                                                "user": named or user})


async def _waits(client: aioredis.Redis, user: str, queue: bool = True,
                 since: bool = True) -> None:
    if queue:
        await client.zadd(KEYS.key("waiting"), {user: 1})
    if since:
        await client.hset(KEYS.key("waiting_since"), user, 1)


async def _waits_on_ready(c: aioredis.Redis) -> None:
    await _ready(c, "n1")
    await _waits(c, "u1")


async def _queued_twice(c: aioredis.Redis) -> None:  # the legacy list queue, as a hand left it
    await c.rpush(KEYS.key("waiting"), "u1", "u1")
    await _waits(c, "u1", queue=False)


async def _queue_without_since(c: aioredis.Redis) -> None:
    await _waits(c, "u1", since=False)


async def _since_without_queue(c: aioredis.Redis) -> None:
    await _waits(c, "u2", queue=False)


async def _waits_and_holds(c: aioredis.Redis) -> None:
    await _held(c, "u1", "n1")
    await _waits(c, "u1")


async def _two_holders(c: aioredis.Redis) -> None:
    await _held(c, "u1", "n1")
    await _held(c, "u2", "n1", named="u1")


async def _session_without_alloc(c: aioredis.Redis) -> None:
    await c.zadd(KEYS.key("sessions"), {"ghost": 1})


async def _alloc_without_session(c: aioredis.Redis) -> None:
    await _held(c, "u1", "n1")
    await c.zrem(KEYS.key("sessions"), "u1")


async def _record_names_another(c: aioredis.Redis) -> None:
    await _held(c, "u1", "n1", named="u2")


async def _ready_without_record(c: aioredis.Redis) -> None:
    await c.zadd(KEYS.key("nodes"), {"n1": 1})
    await c.rpush(KEYS.key("ready"), "n1")


async def _live_in_no_structure(c: aioredis.Redis) -> None:
    await c.zadd(KEYS.key("nodes"), {"n5": 1})  # no record either: no state to disagree with


@pytest.mark.parametrize(("broken", "said"), [
    (_waits_on_ready, "users wait (1) while nodes are ready (1)"),
    (_queued_twice, "waiting queue has duplicates: ['u1']"),
    (_queue_without_since, "waiting users apart: in the waiting queue, not waiting_since: ['u1']"),
    (_since_without_queue, "waiting users apart: in waiting_since, not the waiting queue: ['u2']"),
    (_waits_and_holds, "user u1 both waits and holds n1"),
    (_two_holders, "node n1 held by u1 and u2"),
    (_session_without_alloc, "sessions apart: in sessions, not alloc: ['ghost']"),
    (_alloc_without_session, "sessions apart: in alloc, not sessions: ['u1']"),
    (_record_names_another, "node n1 names user u2 who does not hold it"),
    (_ready_without_record, "node n1 record says None, structures say ready"),
    (_live_in_no_structure, "live nodes apart: in the nodes set, not any state's structure: "
                            "['n5']"),
])
async def test_each_invariant_broken_alone_is_reported(
        aredis: aioredis.Redis, broken: Callable[[aioredis.Redis], Awaitable[None]],
        said: str) -> None:
    """A review's mutation test: `check` could stop testing any one of these and no test
    noticed (each held only in pools the scripts kept consistent)."""
    await broken(aredis)
    problems = await check_invariants(aredis, POOL)
    assert any(p.startswith(said) for p in problems), problems


@pytest.mark.parametrize("name", ["config", "epoch", "stats", "nodes", "replicas", "active",
                                  "alloc"])
async def test_a_pool_exists_by_any_one_of_its_keys(aredis: aioredis.Redis, name: str) -> None:
    assert not await view.pool_exists(aredis, POOL)
    await aredis.set(KEYS.config if name == "config" else KEYS.key(name), "1")
    assert await view.pool_exists(aredis, POOL)


def test_the_state_s_age_is_by_the_server_s_clock_not_the_cli_s() -> None:
    shown = view.PoolView(POOL, 100_000, cast(Any, None), [], [], epoch="40000-abc",
                          server_ms=50_000)
    assert shown.state_age_s == 10.0


async def test_a_pool_that_never_holds_still_gets_an_answer(
    aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = 0

    async def always_changed(*_: object) -> list[str]:
        nonlocal calls
        calls += 1
        raise WatchError

    monkeypatch.setattr(view, "_check_once", always_changed)
    problems = await view.check_invariants(aredis, POOL, attempts=3)
    assert calls == 3
    assert problems == ["the pool changed during each of 3 reads; no consistent view to check"]


def test_the_nodes_command_says_which_nodes_are_boot_time_samples(redis_url: str) -> None:
    keys = PoolKeys("nodes-cli")

    async def record() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        scripts = Scripts(client, keys)
        for node in ("n1", "n2"):  # by the hash of the id, n2 is a sample and n1 is not
            await scripts.apply_node_status(T0, node, "booting")
        await client.aclose()

    asyncio.run(record())
    result = CliRunner().invoke(app, ["nodes", "--redis-url", redis_url, "--pool", "nodes-cli"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "boot sample" in result.output
    rows = {line.split()[1]: line.split()[-2] for line in result.output.splitlines()
            if re.match(r"\W*n[12] ", line)}
    assert rows == {"n1": "no", "n2": "yes"}
    # As JSON, its times are numbers and the mark a boolean (they were strings).
    listed = json.loads(CliRunner().invoke(app, ["nodes", "--redis-url", redis_url, "--pool",
                                                 "nodes-cli", "--json"]).output)
    assert {n["id"]: (n["created_ms"], n["boot_sample"]) for n in listed} == {
        "n1": (T0, False), "n2": (T0, True)}
    # the create count the pool had reached when it first saw the node, a count (a review)
    assert {type(n["creates_seen"]) for n in listed} == {int}


def test_the_nodes_command_shows_whole_ids_on_a_narrow_terminal(redis_url: str) -> None:
    # At 80 columns every id read "node-898f6…": the rows could not be told apart.
    keys = PoolKeys("narrow-cli")

    async def record() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        for node in ("node-898f6a0c-1", "node-898f6a0c-2"):
            await Scripts(client, keys).apply_node_status(T0, node, "ready")
        await client.aclose()

    asyncio.run(record())
    result = CliRunner().invoke(app, ["nodes", "--redis-url", redis_url, "--pool", "narrow-cli"],
                                env={"COLUMNS": "80"})
    assert "node-898f6a0c-1" in result.output and "node-898f6a0c-2" in result.output


def test_the_nodes_and_users_tables_count_what_their_limit_leaves_out(redis_url: str) -> None:
    # A review's drill: `nodes --limit 3` on a pool of 50 nodes was titled "nodes of pool
    # default (3)", and `users --limit 2` "waiting users (2)" with 35 waiting: the title
    # counted the rows shown, not the pool's, and said nothing of the others.
    keys = PoolKeys("limit-cli")
    now = int(time.time() * 1000)

    async def record() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        scripts = Scripts(client, keys)
        for node in ("n1", "n2", "n3"):
            await scripts.apply_node_status(now - 60_000, node, "ready")
        for user in ("u1", "u2", "u3", "u4", "u5"):  # three sessions, two waiting
            await scripts.allocate(now - 1_000, user)
        await client.aclose()

    asyncio.run(record())

    def shown(*args: str) -> str:  # a title wraps to its table's width: read as one line
        result = CliRunner().invoke(app, [*args, "--redis-url", redis_url, "--pool",
                                          "limit-cli"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    assert "nodes of pool limit-cli (1 of 3: --limit)" in shown("nodes", "--limit", "1")
    users = shown("users", "--limit", "1")
    assert "waiting users of pool limit-cli (1 of 2: --limit)" in users, users
    assert "connected users of pool limit-cli (1 of 3: --limit)" in users, users
    # all shown: the count alone, as before
    assert "nodes of pool limit-cli (3)" in shown("nodes")
    users = shown("users")
    assert "waiting users of pool limit-cli (2)" in users, users
    assert "connected users of pool limit-cli (3)" in users, users
    # --json prints the rows alone on stdout, as before; stderr says --limit cut them (it
    # said nothing: a review of the read side)
    for command, rows in (("nodes", lambda doc: doc), ("users", lambda doc: doc["allocated"])):
        result = CliRunner().invoke(app, [command, "--json", "--limit", "1", "--redis-url",
                                          redis_url, "--pool", "limit-cli"])
        assert result.exit_code == 0, result.output
        assert len(rows(json.loads(result.stdout))) == 1
        said = " ".join(result.stderr.split())
        assert "of 3: --limit left the others out" in said, (command, result.stderr)


def test_the_cli_ages_the_pool_by_the_server_s_clock_not_its_host_s(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: from a host five minutes ahead, `status` read no user active while 108 browsed,
    and every session five minutes longer. The replicas' clocks are measured against the
    server's; the CLI reads the pool by that clock too."""
    keys = PoolKeys("host-ahead")
    now = int(time.time() * 1000)

    async def record() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        scripts = Scripts(client, keys)
        await scripts.apply_node_status(now - 60_000, "n1", "booting")
        await scripts.apply_node_status(now - 60_000, "n1", "ready")
        await scripts.allocate(now - 10_000, "u1")
        await scripts.record_activity(now - 1_000, "u2", now - 1_000, 120_000, 3, 100)
        await client.aclose()

    asyncio.run(record())
    real, real_ns = time.time, time.time_ns
    monkeypatch.setattr(time, "time", lambda: real() + 300)
    monkeypatch.setattr(time, "time_ns", lambda: real_ns() + 300 * 10**9)
    common = ["--redis-url", redis_url, "--pool", "host-ahead"]
    status = json.loads(CliRunner().invoke(app, ["status", *common, "--json"]).output)
    assert status["counts"]["active"] == 1 and 9 < status["longest_session_s"] < 60, status
    users = json.loads(CliRunner().invoke(app, ["users", *common, "--json"]).output)
    assert 9 < users["allocated"][0]["session_s"] < 60, users
    table = CliRunner().invoke(app, ["nodes", *common], env={"COLUMNS": "200"}).output
    assert re.search(r"n1\W+allocated\W+u1\W+[6-9]\ds", table), table


def test_the_miss_rate_is_read_over_the_hits_and_misses(sync_redis: redis.Redis,
                                                          redis_url: str) -> None:
    """A `connects` repaired after a hand edit begins again at 1, and status read a miss rate
    of 200% beside 9 hits and 2 misses (a review's drill)."""
    sync_redis.hset(PoolKeys("rate").key("stats"),
                    mapping={"connects": 1, "hits": 9, "misses": 2})
    common = ["--redis-url", redis_url, "--pool", "rate"]
    status = json.loads(CliRunner().invoke(app, ["status", *common, "--json"]).output)
    assert status["miss_rate"] == round(2 / 11, 4)


def test_users_lists_the_longest_session_first_and_release_ends_one(redis_url: str) -> None:
    keys = PoolKeys("release-cli")
    now = int(time.time() * 1000)

    async def record() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        scripts = Scripts(client, keys)
        for node in ("n1", "n2"):
            await scripts.apply_node_status(now - 3_600_000, node, "booting")
            await scripts.apply_node_status(now - 3_600_000, node, "ready")
        # "lost" connected an hour ago and was never heard from again; "live" ten minutes ago
        # and browses still; "late" waits.
        await scripts.allocate(now - 3_600_000, "lost")
        await scripts.allocate(now - 600_000, "live")
        await scripts.record_activity(now - 5_000, "live", now - 5_000, 120_000, 3, 100)
        await scripts.allocate(now - 1_000, "late")
        await client.aclose()

    asyncio.run(record())
    common = ["--redis-url", redis_url, "--pool", "release-cli"]
    listed = CliRunner().invoke(app, ["users", *common, "--json"])
    assert listed.exit_code == 0, listed.output
    body = json.loads(listed.output)
    assert [u["user_id"] for u in body["allocated"]] == ["lost", "live"]
    lost, live = body["allocated"]
    assert 3590 < lost["session_s"] < 3700 and lost["last_active_s"] is None
    assert 590 < live["session_s"] < 700 and 4 < live["last_active_s"] < 100
    assert [u["user_id"] for u in body["waiting"]] == ["late"]
    table = CliRunner().invoke(app, ["users", *common], env={"COLUMNS": "200"})
    assert re.search(r"lost\W+n1\W+36\d\ds\W+-", table.output), table.output
    status = json.loads(CliRunner().invoke(app, ["status", *common, "--json"]).output)
    assert 3590 < status["longest_session_s"] < 3700 and status["operator_releases"] == 0
    assert 0.9 < status["longest_wait_s"] < 100
    shown = CliRunner().invoke(app, ["status", *common], env={"COLUMNS": "200"}).output
    assert "longest session 1h 0m" in shown and "released by an operator" not in shown
    assert re.search(r"longest wait \d+s  longest session 1h 0m", shown), shown
    narrow = CliRunner().invoke(app, ["status", *common], env={"COLUMNS": "80"}).output
    assert "longest session 1h 0m" in narrow, narrow  # on one line, not "1h" and "0m" apart

    # Asked and refused: nothing changes.
    refused = CliRunner().invoke(app, ["release", "lost", *common], input="n\n")
    assert refused.exit_code == 2 and "lost: holds node n1 (session 36" in refused.output
    assert "not confirmed: nothing released" in refused.output
    unanswered = CliRunner().invoke(app, ["release", "lost", *common], input="")
    assert unanswered.exit_code == 2 and "not confirmed (no answer)" in unanswered.output
    assert "last active -)" in refused.output
    again = json.loads(CliRunner().invoke(app, ["users", *common, "--json"]).output)
    assert [u["user_id"] for u in again["allocated"]] == ["lost", "live"]

    released = CliRunner().invoke(app, ["release", "lost", "ghost", *common, "--yes",
                                        "--by", "carol"], env={"COLUMNS": "200"})
    assert released.exit_code == 1, released.output  # ghost held nothing
    assert "released lost: node n1 to waiting user late" in released.output
    assert "ghost: held nothing, nothing done" in released.output
    after = json.loads(CliRunner().invoke(app, ["users", *common, "--json"]).output)
    assert {u["user_id"]: u["node_id"] for u in after["allocated"]} == {"late": "n1",
                                                                        "live": "n2"}

    async def logged() -> list[dict[str, str]]:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        entries = await client.xrange(keys.key("decisions"))
        await client.aclose()
        return [fields for _, fields in entries if fields["kind"] == "release"]

    shown = CliRunner().invoke(app, ["status", *common], env={"COLUMNS": "200"}).output
    assert "longest session 10m" in shown and "released by an operator 1" in shown
    [entry] = asyncio.run(logged())
    assert entry["replica"] == "carol" and entry["reason"].startswith(
        "user lost released by carol: node n1 freed after a session of 36")
    nobody = CliRunner().invoke(app, ["release", "ghost", *common, "--yes"])
    assert nobody.exit_code == 1 and "ghost: holds nothing" in nobody.output
    # Without --by, the operator's name comes from PROVISIONER_OPERATOR, else the login name.
    named = CliRunner().invoke(app, ["release", "live", *common, "--yes"],
                               env={"PROVISIONER_OPERATOR": "dave"})
    assert named.exit_code == 0, named.output
    assert asyncio.run(logged())[-1]["replica"] == "dave"


def test_nodes_json_gives_numbers_and_users_lists_an_unknown_start_first(redis_url: str) -> None:
    """A review's mutation test: `delete_attempts` as text, or a session whose start is not
    known listed last, passed every test."""
    keys = PoolKeys("typed-cli")
    now = int(time.time() * 1000)

    asyncio.run(_boot_then_connect(redis_url, "typed-cli", now - 60_000, "n1", "n2"))
    asyncio.run(_boot_then_connect(redis_url, "typed-cli", now - 30_000, user="old"))
    asyncio.run(_boot_then_connect(redis_url, "typed-cli", now - 1_000, user="unknown"))
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        held = client.hget(keys.key("alloc"), "unknown")
        client.hdel(keys.node(str(held)), "allocated_ms")  # a record from before it
        client.hset(keys.node(str(held)), "delete_attempts", "2")
        client.hset(keys.node(str(held)), "boot_unlearned", "1")
    common = ["--redis-url", redis_url, "--pool", "typed-cli"]
    listed = json.loads(CliRunner().invoke(app, ["nodes", *common, "--json"]).output)
    assert [n["delete_attempts"] for n in listed if "delete_attempts" in n] == [2]
    assert [n["boot_unlearned"] for n in listed if "boot_unlearned" in n] == [True]
    users = json.loads(CliRunner().invoke(app, ["users", *common, "--json"]).output)
    assert [(u["user_id"], u["session_s"] is None) for u in users["allocated"]] == [
        ("unknown", True), ("old", False)]


def test_users_says_its_waiting_users_are_listed_as_they_will_be_served(
        redis_url: str) -> None:
    """An operator's walkthrough: users whose nodes died went back to the head of the queue,
    listed first, waiting 50 s, above a user waiting 63 s, under a help that said "Waiting
    users (oldest first)": the table is the queue, in the order it is served."""
    pool, now = "served-order", int(time.time() * 1000)
    asyncio.run(_boot_then_connect(redis_url, pool, now - 60_000, "n1", user="held"))
    asyncio.run(_boot_then_connect(redis_url, pool, now - 30_000, user="waits"))

    async def node_dies() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        await Scripts(client, PoolKeys(pool)).apply_node_status(now - 10_000, "n1", "terminated")
        await client.aclose()

    asyncio.run(node_dies())
    common = ["--redis-url", redis_url, "--pool", pool]
    users = json.loads(CliRunner().invoke(app, ["users", *common, "--json"]).output)
    listed = [(u["user_id"], u["waiting_s"]) for u in users["waiting"]]
    assert [u for u, _ in listed] == ["held", "waits"], listed  # the head of the queue first
    assert listed[0][1] < listed[1][1], listed  # ... though it has waited less
    shown = " ".join(CliRunner().invoke(app, ["users", "--help"], env={"COLUMNS": "200"})
                     .output.split())
    assert "oldest first" not in shown and "in the order they will be served" in shown, shown


def test_status_json_gives_the_miss_rate_as_a_share(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        client.hset(PoolKeys("rate-cli").key("stats"), mapping={
            "connects": 4, "hits": 3, "misses": 1, "served_after_wait": 2,
            "wait_ms_total": 3_000})
    body = CliRunner().invoke(app, ["status", "--redis-url", redis_url, "--pool", "rate-cli",
                                    "--json"])
    assert body.exit_code == 0, body.output
    status = json.loads(body.output)
    assert (status["miss_rate"], status["mean_wait_s"]) == (0.25, 1.5)


def test_status_says_how_many_stuck_boots_raised_the_stuck_line(redis_url: str) -> None:
    """Boots ended as stuck with none ended since they began raise the stuck line (reap_idle):
    a sign the Node API's boots outlast --boot-timeout, which `status` says, and gives in its
    JSON; a pool with none says nothing of it."""
    common = ["--redis-url", redis_url, "--pool", "stuck-cli"]
    with redis.Redis.from_url(redis_url) as client:
        client.hset(PoolKeys("stuck-cli").key("stats"), mapping={"connects": 1, "misses": 1})
        text = CliRunner().invoke(app, ["status", *common], env={"COLUMNS": "200"}).output
        assert "ended as stuck" not in text, text
        client.hset(PoolKeys("stuck-cli").key("stats"), "stuck_line_raised", 3)
    status = json.loads(CliRunner().invoke(app, ["status", *common, "--json"]).output)
    assert status["stuck_line_raised"] == 3
    text = CliRunner().invoke(app, ["status", *common], env={"COLUMNS": "200"}).output
    assert ("boots ended as stuck with none ended since they began 3, each raising the stuck "
            "line by --boot-timeout: do boots outlast it?" in " ".join(text.split())), text


def test_status_gives_no_mean_wait_while_no_one_has_been_served_from_the_queue(
        redis_url: str) -> None:
    """An operator's walkthrough (boots of 90 s, users waiting a minute): `status` read
    "waiting 10, longest wait 58s" and then "mean wait in the queue 0.0s", a mean over no
    user served from the queue, read as nobody waiting long."""
    asyncio.run(_boot_then_connect(redis_url, "no-mean", int(time.time() * 1000), user="u1"))
    common = ["--redis-url", redis_url, "--pool", "no-mean"]
    status = json.loads(CliRunner().invoke(app, ["status", *common, "--json"]).output)
    assert (status["counts"]["waiting"], status["misses"]) == (1, 1), status
    assert status["mean_wait_s"] is None, status
    text = CliRunner().invoke(app, ["status", *common], env={"COLUMNS": "200"}).output
    assert "mean wait in the queue -" in " ".join(text.split()), text


async def _boot_then_connect(redis_url: str, pool: str, now: int, *nodes: str,
                             user: str = "", booting: tuple[str, ...] = ()) -> None:
    """Nodes booted and ready in `pool` (and `booting` ones, not ready yet), then `user` (if
    any) connects, all at `now`."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    scripts = Scripts(client, PoolKeys(pool))
    for node in nodes:
        await scripts.apply_node_status(now, node, "booting")
        await scripts.apply_node_status(now, node, "ready")
    for node in booting:
        await scripts.apply_node_status(now, node, "booting")
    if user:
        await scripts.allocate(now, user)
    await client.aclose()


def test_release_naming_a_user_twice_releases_them_once(redis_url: str) -> None:
    # Found by a review: the second release found the first's work done and said the state had
    # changed since it was shown, exit 1.
    asyncio.run(_boot_then_connect(redis_url, "twice", int(time.time() * 1000), "n1",
                                   user="u1"))
    released = CliRunner().invoke(app, ["release", "u1", "u1", "--yes", "--by", "op",
                                        "--redis-url", redis_url, "--pool", "twice"],
                                  env={"COLUMNS": "200"})
    assert released.exit_code == 0, released.output
    assert released.output.count("released u1") == 1 and "changed" not in released.output


def _answered_after(monkeypatch: pytest.MonkeyPatch, meanwhile: Coroutine[Any, Any, None],
                    *command: str) -> Result:
    """`provisioner COMMAND...`, `meanwhile` run while its prompt waits, then answered yes."""
    import typer

    def answer_after(*args: Any, **kwargs: Any) -> bool:
        asyncio.run(meanwhile)
        return True

    monkeypatch.setattr(typer, "confirm", answer_after)
    return CliRunner().invoke(app, list(command), env={"COLUMNS": "200"})


def _release_answered_after(monkeypatch: pytest.MonkeyPatch, redis_url: str, pool: str,
                            user: str, meanwhile: Coroutine[Any, Any, None]) -> Result:
    """`provisioner release USER`, `meanwhile` run while its prompt waits, then answered yes."""
    return _answered_after(monkeypatch, meanwhile, "release", user, "--redis-url", redis_url,
                           "--pool", pool)


def test_release_ends_nothing_that_changed_while_its_prompt_waited(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prompt showed "waits"; a node came for the user before the operator said yes, and
    the release ended the session that had just begun."""
    now = int(time.time() * 1000)
    asyncio.run(_boot_then_connect(redis_url, "release-race", now, user="eve"))  # eve waits
    # eve is served while the prompt waits
    result = _release_answered_after(monkeypatch, redis_url, "release-race", "eve",
                                     _boot_then_connect(redis_url, "release-race", now, "n9"))
    common = ["--redis-url", redis_url, "--pool", "release-race"]
    assert result.exit_code == 1, result.output
    assert "eve: waits" in result.output
    assert "eve: changed since it was shown (now holds node n9): nothing done" in result.output
    users = json.loads(CliRunner().invoke(app, ["users", *common, "--json"]).output)
    assert [(u["user_id"], u["node_id"]) for u in users["allocated"]] == [("eve", "n9")]


def test_release_ends_no_session_begun_on_the_same_node_while_its_prompt_waited(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a review: bob disconnected and connected again while the prompt waited, and the
    only ready node, his own, was handed back to him; the release checked only the node and
    ended the new session. A session is known by when it began as well."""
    now = int(time.time() * 1000) - 60_000
    asyncio.run(_boot_then_connect(redis_url, "release-aba", now, "n1", user="bob"))

    async def disconnect_then_connect() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        scripts = Scripts(client, PoolKeys("release-aba"))
        await scripts.release(now + 30_000, "bob")
        assert (await scripts.allocate(now + 30_001, "bob")).node_id == "n1"
        await client.aclose()

    result = _release_answered_after(monkeypatch, redis_url, "release-aba", "bob",
                                     disconnect_then_connect())
    common = ["--redis-url", redis_url, "--pool", "release-aba"]
    assert result.exit_code == 1, result.output
    assert "bob: changed since it was shown (now holds node n1): nothing done" in result.output
    users = json.loads(CliRunner().invoke(app, ["users", *common, "--json"]).output)
    assert [(u["user_id"], u["node_id"], round(u["session_s"])) for u in users["allocated"]] \
        == [("bob", "n1", 30)]
    # Shown again, the new session is released.
    again = CliRunner().invoke(app, ["release", "bob", *common, "--yes"], env={"COLUMNS": "200"})
    assert again.exit_code == 0 and "released bob: node n1 back to the ready list" in again.output


def test_release_of_sessions_and_waiting_users_together_gives_no_node_to_a_named_one(
        redis_url: str) -> None:
    """Found by a review, clearing a dead client's users: released in the order named, the
    session's node went to the oldest waiting user, named too, whose own release was then
    refused as changed: exit 1, and the node held by a user the operator had said was gone."""
    now = int(time.time() * 1000) - 60_000
    asyncio.run(_boot_then_connect(redis_url, "release-set", now, "n1", user="gone-a"))
    asyncio.run(_boot_then_connect(redis_url, "release-set", now + 1, user="gone-b"))  # waits
    asyncio.run(_boot_then_connect(redis_url, "release-set", now + 2, user="here"))  # waits
    common = ["--redis-url", redis_url, "--pool", "release-set"]
    result = CliRunner().invoke(app, ["release", "gone-a", "gone-b", "--yes", "--by", "op",
                                      *common], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    # Reported in the order named; the node went to the waiting user not named.
    assert result.output.index("released gone-a: node n1 to waiting user here") \
        < result.output.index("released gone-b: left the waiting queue")
    users = json.loads(CliRunner().invoke(app, ["users", *common, "--json"]).output)
    assert [(u["user_id"], u["node_id"]) for u in users["allocated"]] == [("here", "n1")]
    assert users["waiting"] == []


def test_release_of_a_stale_allocation_says_no_node_was_freed(redis_url: str) -> None:
    """Found by a review: an allocation whose node's record is not the user's (the node was
    declared gone; only a hand edit or an old failure leaves one) is dropped, and nothing
    freed; the command said the node went back to the ready list."""
    keys = PoolKeys("release-stale")
    now = int(time.time() * 1000)

    async def stale() -> list[str]:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        await client.hset(keys.key("alloc"), "carl", "n1")
        await client.zadd(keys.key("sessions"), {"carl": now - 5000})
        await client.hset(keys.node("n1"), mapping={"id": "n1", "state": "terminated"})
        await client.aclose()
        return []

    asyncio.run(stale())
    common = ["--redis-url", redis_url, "--pool", "release-stale"]
    result = CliRunner().invoke(app, ["release", "carl", "--yes", "--by", "op", *common],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "released carl: a stale allocation of node n1 dropped" in result.output
    assert "no node freed" in result.output and "ready list" not in result.output

    async def after() -> tuple[list[str], dict[str, str]]:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        ready = await client.lrange(keys.key("ready"), 0, -1)
        alloc = await client.hgetall(keys.key("alloc"))
        await client.aclose()
        return ready, alloc

    assert asyncio.run(after()) == ([], {})


def _status(redis_url: str, pool: str) -> tuple[str, dict[str, Any]]:
    """`provisioner status` of the pool as text and as JSON, each of which must succeed."""
    common = ["--redis-url", redis_url, "--pool", pool]
    shown = CliRunner().invoke(app, ["status", *common], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    body = CliRunner().invoke(app, ["status", *common, "--json"])
    assert body.exit_code == 0, body.output
    # a warning on stderr may come first: the JSON object is the rest
    return shown.output, json.loads(body.output[body.output.index("{"):])


def test_the_status_view_reads_a_pool_edited_by_hand(redis_url: str) -> None:
    """What the scripts wrote, broken by hand: the operator's view still shows the pool."""
    keys = PoolKeys("edited")

    async def corrupt() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        await client.zadd(keys.key("replicas"), {"r1": T0, "r2": T0})
        await client.hset(keys.key("replica_info"), mapping={"r1": "not json", "r2": "[1, 2]"})
        scripts = Scripts(client, keys)
        for node in ("n1", "n2"):
            await scripts.apply_node_status(T0, node, "booting")
            await scripts.apply_node_status(T0, node, "ready")
        await scripts.allocate(T0, "u1")
        await scripts.allocate(T0, "u2")
        await scripts.allocate(T0, "u3")  # waits
        await client.hset(keys.node("n1"), mapping={"allocated_ms": "soon", "created_ms": "x"})
        await client.hset(keys.node("n2"), "allocated_ms", "inf")
        await client.hset(keys.key("waiting_since"), "u3", "never")
        await client.hset(keys.key("stats"), mapping={"last_numbers": "{broken",
                                                      "connects": "abc", "misses": "1e999"})
        await client.aclose()

    asyncio.run(corrupt())
    common = ["--redis-url", redis_url, "--pool", "edited"]
    shown, status = _status(redis_url, "edited")
    assert "r1 silent for" in shown and "r2 silent for" in shown
    assert status["last_numbers"] == {} and status["connects"] == 0 and status["misses"] == 0
    # what JSON has not, and Python's reader takes, was printed as NaN: not JSON (jq refuses it)
    for numbers in ('{"target": NaN}', '{"spare": 1e999}'):
        sync = redis.Redis.from_url(redis_url)
        sync.hset(PoolKeys("edited").key("stats"), "last_numbers", numbers)
        sync.close()
        output = CliRunner().invoke(app, ["status", *common, "--json"]).output
        assert json.loads(output, parse_constant=pytest.fail)["last_numbers"] == {}, numbers
    for command in ("nodes", "users"):
        for extra in ([], ["--json"]):
            result = CliRunner().invoke(app, [command, *common, *extra], env={"COLUMNS": "200"})
            assert result.exit_code == 0, (command, extra, result.output)
    users = json.loads(CliRunner().invoke(app, ["users", *common, "--json"]).output)
    assert {u["user_id"]: u["session_s"] for u in users["allocated"]} == {"u1": None, "u2": None}


@pytest.mark.parametrize("command", [["status"], ["nodes"], ["users"], ["check"],
                                     ["model", "show"], ["release", "u1", "--yes"],
                                     ["reconcile", "--node-api-url", "http://127.0.0.1:1"]])
def test_a_bad_pool_name_or_redis_url_is_an_error_not_a_traceback(command: list[str]) -> None:
    """An option the Redis client does not know stopped every command with a TypeError's
    traceback, and a database that is not a number was read as database 0, for writes too
    (a review: `model import` wrote into database 0 for redis://host/one)."""
    for options, message in (
            (["--redis-url", "notaurl"], "cannot be parsed"),
            (["--redis-url", "redis://127.0.0.1:notaport"], "cannot be parsed"),
            (["--redis-url", "redis://127.0.0.1:1/0?socket_timout=5"],
             "names an option the Redis client does not take: 'socket_timout'"),
            (["--redis-url", "redis://127.0.0.1:1/one"],
             "names a database that is not a number: 'one'"),
            (["--redis-url", "rediss://127.0.0.1:1/0?ssl_cert_reqs=bogus"],
             "cannot be used: Invalid SSL Certificate Requirements Flag: bogus"),
            (["--redis-url", "redis://127.0.0.1:1", "--pool", "bad name!"],
             "'bad name!'")):
        result = CliRunner().invoke(app, [*command, *options], env={"COLUMNS": "300"})
        shown = " ".join(result.output.split())
        assert result.exit_code == 2 and message in shown, (options, result.output)
        assert not isinstance(result.exception, (ValueError, TypeError))


def test_the_status_view_reads_what_other_writers_left(redis_url: str) -> None:
    """Values no script of ours writes, left by another writer or a hand: a heartbeat score of
    inf, a lag too long for a float, a decision whose time is not a number, a published setting
    that is not one. The views show what they can; `model show` uses the defaults and says so."""
    keys = PoolKeys("others")

    async def corrupt() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        await client.zadd(keys.key("replicas"), {"r1": "inf", "r2": "-inf", "r3": T0})
        await client.hset(keys.key("replica_info"), mapping={
            "r1": json.dumps({"lag_s": int("9" * 400), "interval_s": 1}),
            "r3": '{"lag_s": 1e999, "interval_s": -1e999, "subscribed": true}',
            "r2": "[" * 100_000})  # nested past the decoder's recursion
        await client.hset(keys.key("stats"), "last_numbers", '{"a": ' * 100_000)
        await client.xadd(keys.key("decisions"), {"now": "yesterday", "kind": "scale_up",
                                                  "reason": "hand"})
        await client.xadd(keys.key("decisions"), {"now": "9" * 400, "kind": "scale_up"})
        await client.hset(keys.config, mapping={"activity_window_s": "wide",
                                                "min_ready": "1e999", "max_nodes": "-3"})
        await client.aclose()

    asyncio.run(corrupt())
    common = ["--redis-url", redis_url, "--pool", "others"]
    shown, status = _status(redis_url, "others")
    assert "r1" in shown and "r3" in shown
    assert "published settings" in shown and "activity_window_s" in shown
    assert {r["replica"]: r["lag_s"] for r in status["replicas"]} == {
        "r1": None, "r2": None, "r3": None}
    model = CliRunner().invoke(app, ["model", "show", *common, "--json"])
    assert model.exit_code == 0, model.output


def test_published_settings_are_read_field_by_field() -> None:
    raw = {"min_ready": "3", "idle_timeout_s": "90.5", "buffer_sd": "nan", "scaling_policy": "x",
           "max_nodes": "1e999", "unknown": "1"}
    config, problems = view.config_from_redis(raw)
    assert config == view.PoolConfig(min_ready=3, idle_timeout_s=90.5)
    assert sorted(p.split(" ")[0] for p in problems) == ["buffer_sd", "max_nodes",
                                                          "scaling_policy"]
    assert view.config_from_redis({}) == (None, [])
    # each value fine alone, invalid together: min_ready above max_nodes
    config, problems = view.config_from_redis({"min_ready": "9", "max_nodes": "5"})
    assert config == view.PoolConfig() and problems
    # a count that is not whole is said and left at its default (a mutation test: "2.5" was
    # read as 2 in silence); a whole one written as a float is that count
    config, problems = view.config_from_redis({"min_ready": "2.5", "max_nodes": "30.0"})
    assert config == view.PoolConfig(max_nodes=30)
    assert problems == ["min_ready '2.5' is not a whole number"]


@pytest.mark.parametrize("command", ["nodes", "users"])
@pytest.mark.parametrize("limit", ["0", "-1", "1000000"])
def test_a_row_limit_out_of_range_is_refused(command: str, limit: str) -> None:
    """`--limit 0` listed every row (a range to -1), and a pool may hold 100,000 nodes."""
    result = CliRunner().invoke(app, [command, "--redis-url", "redis://127.0.0.1:1",
                                      "--limit", limit])
    assert result.exit_code == 2 and "Invalid value" in result.output, result.output


def test_markup_in_what_others_wrote_is_shown_as_written(redis_url: str) -> None:
    """An operator's --by or a replica id of "[/bold]" stopped `status` for everyone with a
    MarkupError until eight newer decisions pushed it out; a node record or an error message
    holding markup did the same to `nodes`, `check` and the errors."""
    keys = PoolKeys("markup")

    async def write() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        scripts = Scripts(client, keys)
        await scripts.apply_node_status(T0, "n1", "booting")
        await scripts.apply_node_status(T0, "n1", "ready")
        await scripts.allocate(T0, "u1")
        await scripts.release(T0, "u1", "[/bold] [red", 1000)
        await client.hset(keys.node("n1"), mapping={"origin": "[/i]", "state": "[/x]"})
        await client.aclose()

    asyncio.run(write())
    common = ["--redis-url", redis_url, "--pool", "markup"]
    for command in ("status", "nodes", "check"):
        shown = CliRunner().invoke(app, [command, *common], env={"COLUMNS": "300"})
        assert shown.exit_code in (0, 1) and "Traceback" not in shown.output, shown.output
        assert shown.exception is None or isinstance(shown.exception, SystemExit), shown.output
    assert "[/bold] [red" in CliRunner().invoke(app, ["status", *common],
                                                env={"COLUMNS": "300"}).output
    bad = CliRunner().invoke(app, ["status", "--redis-url", "redis://[/x]"])
    assert bad.exit_code == 2 and "'redis://[/x]' cannot be parsed" in bad.output, bad.output


def _heartbeats(redis_url: str, pool: str, **said: dict[str, Any]) -> None:
    """Each replica's heartbeat to `pool`, saying what `said` gives it."""
    async def beat() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        scripts = Scripts(client, PoolKeys(pool))
        for replica, info in said.items():
            await scripts.heartbeat(replica, info, 600_000)
        await client.aclose()

    asyncio.run(beat())


def test_status_says_when_the_replicas_run_different_pool_settings(redis_url: str) -> None:
    """A drill: two replicas of one pool at --max-nodes 5 and 50, and the one whose tick fired
    first decided with its own, with nothing said. Which runs which settings is said now, and
    nothing while they agree; a replica of a release that says none is not counted."""
    five, fifty = PoolConfig(max_nodes=5).digest(), PoolConfig(max_nodes=50).digest()
    assert five != fifty and PoolConfig(max_nodes=5).digest() == five

    _heartbeats(redis_url, "settings", r1={"settings": five}, r2={"settings": five}, r3={})
    shown, status = _status(redis_url, "settings")
    assert "sets of pool settings" not in shown
    assert {r["replica"]: r["settings"] for r in status["replicas"]} == {
        "r1": five, "r2": five, "r3": None}
    _heartbeats(redis_url, "settings", r4={"settings": fifty})
    shown, _ = _status(redis_url, "settings")
    flat = " ".join(shown.replace("│", " ").split())
    assert (f"2 sets of pool settings run ({min(five, fifty)}: "
            in flat), shown
    assert "r4" in flat.split("sets of pool settings run", 1)[1], shown


def test_status_says_when_the_replicas_run_different_releases_of_the_scripts(
    redis_url: str,
) -> None:
    """An upgrade left half done: which running replica runs which release, and nothing while
    they agree. A replica of a release before the fingerprint says none; a silent one is not
    counted; what a hand wrote that is not a fingerprint reads as none."""
    keys = PoolKeys("releases")
    _heartbeats(redis_url, "releases", r1={"scripts": "aaa"}, r2={"scripts": "aaa"})
    shown, status = _status(redis_url, "releases")
    assert "releases of the scripts" not in shown
    assert {r["replica"]: r["scripts"] for r in status["replicas"]} == {"r1": "aaa", "r2": "aaa"}
    _heartbeats(redis_url, "releases", r3={"scripts": "bbb"}, r4={},
                r5={"scripts": "<b>not hex</b>"})
    shown, status = _status(redis_url, "releases")
    flat = " ".join(shown.replace("│", " ").split())  # the panel's lines joined again
    assert ("4 releases of the scripts run (none said, a release before the fingerprint: r4 / "
            "aaa: r2, r1 / bbb: r3 / unreadable: r5)") in flat, shown
    said = {r["replica"]: r["scripts"] for r in status["replicas"]}
    assert said["r4"] is None and said["r5"] == "unreadable"

    async def silence(*replicas: str) -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        for replica in replicas:
            await heard_ago(client, keys, replica, 60_000)
        await client.aclose()

    asyncio.run(silence("r3", "r4", "r5"))
    shown, _ = _status(redis_url, "releases")
    assert "releases of the scripts" not in shown and "r3 silent for" in shown


def test_check_names_a_key_of_another_type_where_status_was_refused(redis_url: str) -> None:
    """A pool key edited by hand into another type: the replicas refuse every transition and
    say which key, but `check` said "every invariant holds" (the replica list) or stopped on
    Redis's bare WRONGTYPE (the nodes), as `status` did. `check` names each such key, as the
    scripts do, and `status` points to it; the waiting queue's old list is not one."""
    keys = PoolKeys("typed")

    async def edit(**values: str) -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        await client.set(keys.key("epoch"), "1-a")
        for name, value in values.items():
            await client.delete(keys.key(name))
            if value == "list":
                await client.rpush(keys.key(name), "u1")
                await client.hset(keys.key("waiting_since"), "u1", T0)
            else:
                await client.set(keys.key(name), value)
        await client.aclose()

    common = ["--redis-url", redis_url, "--pool", "typed"]
    asyncio.run(edit(waiting="list"))  # as a release before left it: taken as it is
    clean = CliRunner().invoke(app, ["check", *common])
    assert clean.exit_code == 0, clean.output
    asyncio.run(edit(replicas="edited", nodes="edited"))
    checked = CliRunner().invoke(app, ["check", *common], env={"COLUMNS": "300"})
    assert checked.exit_code == 1, checked.output
    said = " ".join(checked.output.split())
    for name, kind in (("replicas", "zset"), ("nodes", "zset")):
        assert f"pool key prov:{{typed}}:{name} holds a string, not a {kind} (an edit by " \
               "hand?)" in said, said
    shown = CliRunner().invoke(app, ["status", *common], env={"COLUMNS": "300"})
    assert shown.exit_code == 2 and "`provisioner check` names it" in shown.output, shown.output


def test_check_names_a_node_record_or_the_settings_of_another_type(redis_url: str) -> None:
    """A review: a node's record of another type stopped `check` with exit 2 and Redis's bare
    WRONGTYPE, beside a hint to run `check`; the settings' hash of another type stopped
    `status`, `model show` and every replica while `check` said every invariant held."""
    pool = "typed-records"
    keys = PoolKeys(pool)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        client.set(keys.key("epoch"), "1-a")
        client.zadd(keys.key("nodes"), {"ghost-1": T0})
        client.set(keys.node("ghost-1"), "junk")
        common = ["--redis-url", redis_url, "--pool", pool]
        checked = CliRunner().invoke(app, ["check", *common], env={"COLUMNS": "300"})
        assert checked.exit_code == 1, checked.output
        assert (f"node record prov:{{{pool}}}:node:ghost-1 holds a string, not a hash (an "
                "edit by hand?)") in " ".join(checked.output.split()), checked.output
        client.delete(keys.node("ghost-1"), keys.key("nodes"))
        client.set(keys.config, "junk")
        checked = CliRunner().invoke(app, ["check", *common], env={"COLUMNS": "300"})
        assert checked.exit_code == 1, checked.output
        assert (f"pool key prov:{{{pool}}}:config holds a string, not a hash (an edit by "
                "hand?): no replica can start") in " ".join(checked.output.split())
    finally:
        client.delete(*client.keys(f"prov:{{{pool}}}:*"))
        client.close()


def test_a_cli_of_another_release_than_the_replicas_says_so(redis_url: str) -> None:
    """An operator's CLI runs its own release's scripts: `status` reads, and `release`,
    `reconcile` and `model import` write, with them. Where no running replica runs that
    release, it says so (once a run), and does its work all the same."""
    from provisioner.scripts import scripts_fingerprint

    keys = PoolKeys("cli-release")
    common = ["--redis-url", redis_url, "--pool", "cli-release"]
    _heartbeats(redis_url, "cli-release", r1={"scripts": scripts_fingerprint()},
                r2={"scripts": "0ddba11"})
    shown = CliRunner().invoke(app, ["status", *common])
    assert shown.exit_code == 0 and "this CLI runs release" not in shown.output
    # no replica runs this CLI's release
    _heartbeats(redis_url, "cli-release", r1={"scripts": "0ddba11"}, r3={})
    shown = CliRunner().invoke(app, ["status", *common], env={"COLUMNS": "300"})
    assert shown.exit_code == 0, shown.output
    assert (f"warning: this CLI runs release {scripts_fingerprint()} of the scripts, and no "
            "running replica of pool cli-release does (they run 0ddba11): what it shows is "
            "read by this CLI's scripts") in " ".join(shown.output.split()), shown.output
    # `model show` and `model export` read with this CLI's model_view.lua and read_model.lua
    # too, and said nothing (a review)
    from provisioner import cli

    for command in (["model", "show"], ["model", "export"]):
        cli._warned.clear()  # once a run: each command is a run of its own
        shown = CliRunner().invoke(app, [*command, *common], env={"COLUMNS": "300"})
        assert "(they run 0ddba11): what it shows is read by this CLI's scripts" in " ".join(
            shown.output.split()), (command, shown.output)
    _heartbeats(redis_url, "cli-release", r1={"scripts": "5ca1ab1e"})
    released = CliRunner().invoke(app, ["release", "nobody", "--yes", *common],
                                  env={"COLUMNS": "300"})
    assert released.exit_code == 1  # held nothing, as without the warning
    assert "(they run 0ddba11, 5ca1ab1e): what this command writes, it writes with this CLI's " \
           "scripts" in " ".join(released.output.split()), released.output

    async def break_the_replica_list() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        await client.delete(keys.key("replicas"))
        await client.set(keys.key("replicas"), "edited by hand")
        await client.aclose()

    # a replica list broken by hand costs the look, not the repair
    asyncio.run(break_the_replica_list())
    released = CliRunner().invoke(app, ["release", "nobody", "--yes", *common])
    assert released.exit_code == 1 and "nobody: holds nothing" in released.output, \
        released.output


def test_status_says_when_the_pools_state_began(redis_url: str) -> None:
    """By the epoch the first heartbeat set, against the server's clock, which stamped it:
    after a loss the state is younger than the run of the replicas that saw it go. An epoch no
    heartbeat wrote shows as none."""
    keys = PoolKeys("epoch")
    began = int(time.time() * 1000) - 7_260_000  # 2 h 1 min ago (the server runs here)

    async def set_epoch(epoch: str) -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        await client.set(keys.key("epoch"), epoch)
        await client.aclose()

    asyncio.run(set_epoch(f"{began}-0123456789ab"))
    shown, status = _status(redis_url, "epoch")
    assert status["epoch"] == f"{began}-0123456789ab" and status["state_since_ms"] == began
    assert 7_260 <= status["state_age_s"] < 7_320
    assert "the pool's state began 2h 1m ago" in shown
    asyncio.run(set_epoch("written-by-hand"))
    shown, status = _status(redis_url, "epoch")
    assert status["state_since_ms"] is None and status["state_age_s"] is None
    assert "state began" not in shown


def test_status_says_a_replace_holds_spare_and_how_long_its_lease_has(redis_url: str) -> None:
    """A pool holding nodes over its target: the last decision's reason says a replace holds
    them; status says so on a line of its own, with the lease left and how to let go, and
    counts them (`spare_held`, `spare_held_ms`). A hold the last batch took down to none is
    still the run's; a value no run wrote is none."""
    keys = PoolKeys("held")
    client = redis.Redis.from_url(redis_url)
    client.hset(keys.key("stats"), "connects", 0)  # a pool status finds
    try:
        shown, status = _status(redis_url, "held")
        assert "replace under way" not in shown
        assert (status["counts"]["spare_held"], status["counts"]["spare_held_ms"]) == (0, 0)
        for extra, said in ((2, r"2 spare node\(s\) held above the keep\s+level"),
                            (0, r"no spare held \(its last batch gone\)")):
            client.set(keys.key("replacing"), f"{extra}:{int(time.time() * 1000) + 30_000}:run1",
                       px=30_000)
            shown, status = _status(redis_url, "held")
            assert status["counts"]["spare_held"] == extra
            assert 25_000 < status["counts"]["spare_held_ms"] <= 30_000
            assert re.search(rf"replace under way: {said}, its lease (2[6-9]|30)s unless\s+"
                             r"renewed", shown), shown
            assert "provisioner replace --cancel" in shown
        # by hand: a lease no run writes, an extra no number holds (inf: a review, status
        # stopped as cjson refused it), a key of another type, and a hold with no lease
        for edit in ("2:x:run1", "9" * 400 + ":1:run1"):
            client.set(keys.key("replacing"), edit, px=30_000)
            shown, status = _status(redis_url, "held")
            assert status["counts"]["spare_held"] == 0 and "replace under way" not in shown, edit
        client.delete(keys.key("replacing"))
        client.hset(keys.key("replacing"), "extra", "2")
        shown, status = _status(redis_url, "held")
        assert status["counts"]["spare_held"] == 0 and "replace under way" not in shown
        client.delete(keys.key("replacing"))
        client.set(keys.key("replacing"), "2:1:run1")  # no PX
        shown, status = _status(redis_url, "held")
        assert (status["counts"]["spare_held"], status["counts"]["spare_held_ms"]) == (2, -1)
        assert re.search(r"2 spare node\(s\) held above the keep level, with no lease "
                         r"\(written by\s+hand", shown), shown
    finally:
        client.close()


def test_status_watch_into_a_pipe_writes_a_reading_a_second(redis_url: str) -> None:
    # Into a pipe it wrote nothing until Ctrl-C, and nothing at all on SIGTERM.
    import queue
    import subprocess
    import sys
    import threading
    import time

    watch = subprocess.Popen([sys.executable, "-m", "provisioner", "status", "--watch", "--json",
                              "--redis-url", redis_url, "--pool", "watched"],
                             stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in watch.stdout or ()],
                     daemon=True).start()
    try:
        first = json.loads(lines.get(timeout=15))  # a failure, not a hang, if none comes
        started = time.monotonic()
        second = json.loads(lines.get(timeout=5))
        assert 0.5 < time.monotonic() - started < 5
        assert first["pool"] == second["pool"] == "watched"
    finally:
        watch.terminate()
        watch.wait(timeout=10)



def test_status_watch_stops_on_sigterm_as_on_ctrl_c(redis_url: str) -> None:
    """A Docker drill: `docker stop` of `status --watch` run in the compose file's cli
    container waited its 10 s and killed it (exit 137), the watch being the container's PID 1,
    which ignores a signal it has no handler for. SIGTERM now ends the watch as Ctrl-C does,
    exit 0 with its readings written, as `replace` and the replicas take it; elsewhere it was
    killed by the signal (exit -15 to its parent)."""
    import queue
    import signal
    import subprocess
    import sys
    import threading

    watch = subprocess.Popen([sys.executable, "-m", "provisioner", "status", "--watch", "--json",
                              "--redis-url", redis_url, "--pool", "stopped"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in watch.stdout or ()],
                     daemon=True).start()
    try:
        assert json.loads(lines.get(timeout=15))["pool"] == "stopped"
        watch.send_signal(signal.SIGTERM)
        assert watch.wait(timeout=10) == 0, watch.stderr.read() if watch.stderr else ""
        assert "Traceback" not in (watch.stderr.read() if watch.stderr else "")
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(timeout=10)


@pytest.mark.engine  # starts the engine under test, once the watch has missed it
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_status_watch_while_redis_is_unreachable_says_so_and_goes_on_until_ctrl_c(
        as_json: bool) -> None:
    """A watch left open on a failover (Redis down a while, then back): each second it says
    on stderr that Redis is unreachable, naming the server, with nothing on stdout (a
    --json stream read by `jq` stays whole), and it shows the pool as soon as the server
    answers again; Ctrl-C ends it, exit 0, with no traceback. Stopped at the first failure,
    the watch an operator left open to follow the failover was gone."""
    import os
    import queue
    import signal
    import subprocess
    import sys
    import threading

    from provisioner.redis_server import free_port, start_server

    port = free_port()
    watch = subprocess.Popen(
        [sys.executable, "-m", "provisioner", "status", "--watch", "--redis-url",
         f"redis://127.0.0.1:{port}/0", "--pool", "watched", *(["--json"] if as_json else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "200"})
    said: queue.Queue[str] = queue.Queue()
    shown: queue.Queue[str] = queue.Queue()
    for stream, lines in ((watch.stderr, said), (watch.stdout, shown)):
        threading.Thread(target=lambda s=stream, q=lines: [q.put(line) for line in s or ()],
                         daemon=True).start()
    server = None
    try:
        for _ in range(2):  # one a second, the watch still going
            line = said.get(timeout=15)
            assert line.startswith("Redis unreachable: Error 111 connecting to "
                                   f"127.0.0.1:{port}."), line
        assert watch.poll() is None and shown.empty()
        server = start_server(os.environ.get("PROVISIONER_TEST_REDIS_BINARY"), port=port)
        first = shown.get(timeout=15)  # the pool, once the server answers
        if as_json:
            assert json.loads(first)["pool"] == "watched", first
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=15) == 0
    finally:
        watch.kill()
        watch.wait(timeout=10)
        if server is not None:
            server.stop()
    rest = "".join(list(said.queue))
    assert "Traceback" not in rest, rest


def _watched_in_a_terminal(url: str, seconds: float) -> tuple[int, str, str]:
    """`status --watch` on a terminal (a pseudo-terminal) until it has shown Redis unreachable
    twice (a redraw a second later) or for `seconds` at most, then Ctrl-C: its exit code, what
    the terminal showed (escape sequences left out) and its stderr."""
    import os
    import pty
    import select
    import signal
    import subprocess
    import sys

    master, slave = pty.openpty()
    watch = subprocess.Popen([sys.executable, "-m", "provisioner", "status", "--watch",
                              "--redis-url", url], stdout=slave, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "COLUMNS": "200", "TERM": "xterm"})
    os.close(slave)
    screen = b""
    try:
        end = time.monotonic() + seconds
        while (time.monotonic() < end and watch.poll() is None
               and screen.count(b"Redis unreachable") < 2):
            if select.select([master], [], [], 0.1)[0]:
                with contextlib.suppress(OSError):
                    screen += os.read(master, 65536)
        if watch.poll() is None:
            watch.send_signal(signal.SIGINT)
        _, err = watch.communicate(timeout=15)
    finally:
        watch.kill()
        os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))
    return watch.returncode, text, err


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:{port}/0",
    # the error's text is no Rich markup: a "[/dir]" in it stopped the watch with a traceback
    "unix:///tmp/no-such[/dir]/redis.sock",
], ids=["refused", "a socket path with brackets"])
def test_status_watch_on_a_terminal_shows_redis_unreachable_in_place(url: str) -> None:
    """On a terminal the watch redraws one screen: Redis out of reach is said there, in
    place of the pool, each second, and Ctrl-C ends it, exit 0, with nothing on stderr. What
    the error says is the server's and the client's text, not markup: the pipe's line is
    written as it is, and so must the terminal's be."""
    from provisioner.redis_server import free_port

    port = free_port()
    code, screen, err = _watched_in_a_terminal(url.format(port=port), 20)
    assert "Traceback" not in err and err == "", err
    assert code == 0, (screen, err)
    assert "Redis unreachable: Error " in screen, screen
    assert (f"127.0.0.1:{port}" if "{port}" in url else "/tmp/no-such[/dir]/redis.sock") in (
        screen), screen


def test_what_another_writer_put_in_an_id_reaches_the_terminal_escaped(redis_url: str) -> None:
    """A node id `n1\\x1b]0;TITLE\\x07\\x1b[2J` set the terminal's title and cleared its
    screen when `nodes` showed it, and so did a user id in `users` and a decision in `status`
    (a review): Rich escapes its markup, not a terminal's escape sequences."""
    keys = PoolKeys("hostile")
    node, user = "n1\x1b]0;TITLE\x07\x1b[2J\u202e", "u1\x1b[31mRED\x9b31m"

    async def write() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        scripts = Scripts(client, keys)
        await scripts.apply_node_status(T0, node, "booting")
        await scripts.apply_node_status(T0, node, "ready")
        await scripts.allocate(T0, user)
        await client.xadd(keys.key("decisions"), {"now": str(T0), "kind": "scale_up",
                                                  "reason": "r\x1b[2Jx", "replica": "r1"})
        await client.aclose()

    asyncio.run(write())
    common = ["--redis-url", redis_url, "--pool", "hostile"]
    for command in (["nodes"], ["users"], ["status"]):
        result = CliRunner().invoke(app, [*command, *common], env={"COLUMNS": "300"})
        assert result.exit_code == 0, (command, result.output)
        assert "\x1b" not in result.output and "\u202e" not in result.output, \
            (command, repr(result.output))
        assert "\x9b" not in result.output, (command, repr(result.output))
    for command in (["nodes"], ["users"]):
        shown = CliRunner().invoke(app, [*command, *common], env={"COLUMNS": "300"}).output
        assert "\\x1b[31mRED\\x9b31m" in shown, repr(shown)
        assert "\\x1b]0;TITLE\\x07\\x1b[2J\\u202e" in shown, repr(shown)
    # escaped before the layout: the table's lines are as wide as each other (escaped after
    # it, the cells came out wider than their columns)
    shown = CliRunner().invoke(app, ["nodes", *common], env={"COLUMNS": "300"}).output
    rows = [line for line in shown.splitlines() if line[:1] in "┏┃┡│└"]
    assert len(rows) == 5 and len({len(line) for line in rows}) == 1, shown


def _aged(said: str, seconds: int, shown: str | list[str]) -> bool:
    """Whether `said`, with an age of `seconds` or a few more, is in `shown` (a line of its
    lines, or part of its text): the command reads the clock a moment after the test set the
    ages (31s under a loaded machine)."""
    return any(said.format(age) in shown for age in range(seconds, seconds + 6))


def test_drain_takes_nodes_out_of_the_pool_each_as_its_state_allows(redis_url: str) -> None:
    """A ready node and a booting one terminate now (a replica's next reap sends their
    DELETEs); a node in a session goes when the session ends, or now with --now, its user
    back at the head of the queue; an unknown node is said, and exits 1. Each drain is in
    the decisions log under --by, and `nodes` shows the one marked."""
    pool = "drain-cli"
    keys = PoolKeys(pool)
    now = int(time.time() * 1000)
    asyncio.run(_boot_then_connect(redis_url, pool, now - 60_000, "n1", "n2", "n3",
                                   booting=("n4",)))
    for user in ("u1", "u2"):  # n1, n2
        asyncio.run(_boot_then_connect(redis_url, pool, now - 30_000, user=user))
    common = ["--redis-url", redis_url, "--pool", pool]
    refused = CliRunner().invoke(app, ["drain", "n3", *common], input="n\n")
    assert refused.exit_code == 2 and _aged("n3: ready (idle for {}s)", 60, refused.output)
    assert "not confirmed: nothing drained" in refused.output
    unanswered = CliRunner().invoke(app, ["drain", "n3", *common], input="")
    assert unanswered.exit_code == 2 and ("not confirmed (no answer): nothing drained; --yes "
                                          "drains without asking") in unanswered.output
    bad = CliRunner().invoke(app, ["drain", "n 3", *common])
    assert bad.exit_code == 2 and "not a node id" in bad.output

    done = CliRunner().invoke(app, ["drain", "n1", "n3", "n4", "ghost", *common, "--yes",
                                    "--by", "alice"], env={"COLUMNS": "200"})
    assert done.exit_code == 1, done.output  # ghost
    lines = done.output.splitlines()
    assert _aged("n1: in the session of user u1 (for {}s)", 30, lines)
    assert _aged("n4: booting (booting for {}s)", 60, lines)
    assert "ghost: unknown to the pool" in lines
    assert ("drained n1: terminated when the session of user u1 ends" in lines)
    assert ("drained n3: terminating (it was ready); a replica sends its DELETE at its next "
            "tick") in lines
    assert "drained n4: terminating (it was booting); a replica sends its DELETE at its next "\
        "tick" in lines
    assert ("no replica of pool drain-cli has sent a heartbeat in the last minute: the DELETEs "
            "go out at the next tick of one") in done.output

    nodes = json.loads(CliRunner().invoke(app, ["nodes", *common, "--json"]).output)
    by_id = {n["id"]: n for n in nodes}
    assert by_id["n1"]["state"] == "allocated" and by_id["n1"]["drain_by"] == "alice"
    assert isinstance(by_id["n1"]["drain_asked_ms"], int)
    assert (by_id["n3"]["state"], by_id["n3"]["term_reason"]) == ("terminating", "drained")
    table = CliRunner().invoke(app, ["nodes", *common], env={"COLUMNS": "200"}).output
    assert re.search(r"n1\W+allocated, drained\W+u1", table), table

    at_once = CliRunner().invoke(app, ["drain", "n2", *common, "--yes", "--now", "--by", "bob"],
                                 env={"COLUMNS": "200"})
    assert at_once.exit_code == 0, at_once.output
    assert ("drained n2: terminating (it was allocated); user u2 back at the head of the "
            "queue; a replica sends its DELETE at its next tick") in at_once.output
    users = json.loads(CliRunner().invoke(app, ["users", *common, "--json"]).output)
    assert [u["user_id"] for u in users["waiting"]] == ["u2"]
    again = CliRunner().invoke(app, ["drain", "n3", *common, "--yes"])
    assert again.exit_code == 1 and "n3: terminating: nothing to drain" in again.output
    marked = CliRunner().invoke(app, ["drain", "n1", *common, "--yes"], env={"COLUMNS": "200"})
    assert marked.exit_code == 1 and ("n1: drained already, terminated when the session of "
                                      "user u1 ends; nothing done (--now ends it now)") in (
        marked.output), marked.output

    # Taken back and drained again: --cancel says what it did, and refuses what it cannot.
    cancelled = CliRunner().invoke(app, ["drain", "n1", "n3", *common, "--cancel", "--yes",
                                         "--by", "carol"], env={"COLUMNS": "200"})
    assert cancelled.exit_code == 1, cancelled.output  # n3 is terminating
    assert ("taken back n1: back to the pool when the session of user u1 ends"
            in cancelled.output), cancelled.output
    assert "n3: terminating: nothing to take back" in cancelled.output
    both = CliRunner().invoke(app, ["drain", "n1", *common, "--cancel", "--now", "--yes"])
    assert both.exit_code == 2 and "give one of them" in both.output
    again_marked = CliRunner().invoke(app, ["drain", "n1", *common, "--yes", "--by", "alice"])
    assert again_marked.exit_code == 0, again_marked.output
    # The session's end, by an operator's release too, terminates the node drained in it.
    released = CliRunner().invoke(app, ["release", "u1", *common, "--yes"],
                                  env={"COLUMNS": "200"})
    assert released.exit_code == 0, released.output
    assert "u1: holds node n1 (session " in released.output
    assert ", drained: it ends with the session)" in released.output
    assert ("released u1: node n1 terminating, as it was drained during the session; a replica "
            "sends its DELETE at its next tick") in released.output
    entries = redis.Redis.from_url(redis_url, decode_responses=True).xrange(
        keys.key("decisions"))
    drains = [(f["replica"], f["reason"]) for _, f in entries if f.get("kind") == "drain"]
    assert [who for who, _ in drains] == ["alice", "alice", "alice", "bob", "carol", "alice",
                                          "alice"]
    status = CliRunner().invoke(app, ["status", *common], env={"COLUMNS": "300"})
    assert "drains by an operator 5" in status.output, status.output
    assert json.loads(CliRunner().invoke(app, ["status", *common, "--json"]).output)[
        "operator_drains"] == 5
    decisions = CliRunner().invoke(app, ["decisions", *common, "--kind", "drain"],
                                   env={"COLUMNS": "300"})
    assert decisions.exit_code == 0 and "node n2 drained by bob" in decisions.output, (
        decisions.output)


def test_drain_cancel_asks_and_takes_back_only_a_drain_there_is(redis_url: str) -> None:
    """`drain --cancel`: a node not drained (ready, or in a session) has nothing to take back,
    said, exit 1 with no question; a ready node a replica of an earlier release left marked
    is asked about, and a "no" or no answer leaves its mark (exit 2); a yes takes it back and
    it stays in the pool. A cancel that said it did what it could not would leave the
    operator believing a node stays that the pool then terminates."""
    pool = "drain-cancel"
    keys = PoolKeys(pool)
    now = int(time.time() * 1000)
    asyncio.run(_boot_then_connect(redis_url, pool, now - 60_000, "n3", "n1", "n2",
                                   user="u1"))  # n3, idle the longest, to u1
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    # the mark a replica of an earlier release left on a node it freed
    sync.hset(keys.node("n2"), "drain_by", "alice")
    common = ["--redis-url", redis_url, "--pool", pool, "--cancel"]
    nothing = CliRunner().invoke(app, ["drain", "n1", "n3", *common], input="y\n",
                                 env={"COLUMNS": "200"})
    assert nothing.exit_code == 1, nothing.output
    lines = nothing.output.splitlines()
    assert _aged("n1: ready (idle for {}s): not drained, nothing to take back", 60, lines), lines
    assert _aged("n3: in the session of user u1 (for {}s): not drained, nothing to take back",
                 60, lines), lines
    assert "Take back" not in nothing.output and "taken back" not in nothing.output
    for answer, said in (("n\n", "not confirmed: nothing taken back"),
                         ("", "not confirmed (no answer): nothing taken back; --yes takes "
                          "them back without asking")):
        asked = CliRunner().invoke(app, ["drain", "n2", *common], input=answer,
                                   env={"COLUMNS": "200"})
        assert asked.exit_code == 2, asked.output
        assert _aged("n2: ready (idle for {}s), drained when a session on it ends", 60,
                     asked.output.splitlines()), asked.output
        assert "Take back the drain of 1 node(s) of pool drain-cancel?" in asked.output
        assert said in " ".join(asked.output.split()), asked.output
        assert sync.hget(keys.node("n2"), "drain_by") == "alice"
    taken = CliRunner().invoke(app, ["drain", "n2", *common, "--yes", "--by", "carol"],
                               env={"COLUMNS": "200"})
    assert taken.exit_code == 0, taken.output
    assert "taken back n2: it stays in the pool" in taken.output, taken.output
    record = sync.hgetall(keys.node("n2"))
    assert record["state"] == "ready" and "drain_by" not in record, record
    assert "n2" in sync.lrange(keys.key("ready"), 0, -1)


def test_drain_does_nothing_to_a_node_that_changed_while_its_prompt_waited(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prompt showed n1 ready; a user was handed it before the operator said yes: the
    drain is refused, not turned into a drain of that user's session."""
    pool = "drain-race"
    keys = PoolKeys(pool)
    now = int(time.time() * 1000)
    asyncio.run(_boot_then_connect(redis_url, pool, now, "n1"))
    # u1 is handed n1 while the prompt waits
    result = _answered_after(monkeypatch, _boot_then_connect(redis_url, pool, now, user="u1"),
                             "drain", "n1", "--redis-url", redis_url, "--pool", pool)
    assert result.exit_code == 1, result.output
    assert "n1: changed since it was shown (now allocated): nothing done" in result.output
    record = redis.Redis.from_url(redis_url, decode_responses=True).hgetall(keys.node("n1"))
    assert record["state"] == "allocated" and "drain_by" not in record


def test_drain_and_release_stamp_what_they_do_by_the_server_s_clock(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not the CLI host's, which may run ahead of the replicas' (a review: `drain --now` from
    a host five minutes ahead queued a user who then waited two minutes, measured as none)."""
    from provisioner.clock import WallClock

    pool = "drain-clock"
    keys = PoolKeys(pool)
    now = int(time.time() * 1000)
    asyncio.run(_boot_then_connect(redis_url, pool, now, "n1", "n2", user="u1"))  # n1
    asyncio.run(_boot_then_connect(redis_url, pool, now, user="u2"))  # n2
    monkeypatch.setattr(WallClock, "now_ms", lambda self: int(time.time() * 1000) + 300_000)
    common = ["--redis-url", redis_url, "--pool", pool, "--yes"]
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert CliRunner().invoke(app, ["drain", "n1", "--now", *common]).exit_code == 0
    waiting_since = int(client.hget(keys.key("waiting_since"), "u1"))
    assert abs(waiting_since - time.time() * 1000) < 10_000, waiting_since - time.time() * 1000
    assert CliRunner().invoke(app, ["release", "u2", *common]).exit_code == 0
    assert client.hget(keys.key("alloc"), "u1") == "n2"  # the node u2 freed
    stamps = [int(f["now"]) for _, f in client.xrange(keys.key("decisions"))]
    assert stamps and all(abs(t - time.time() * 1000) < 10_000 for t in stamps), stamps


def test_the_operators_views_read_a_server_out_of_memory(redis_url: str,
                                                          sync_redis: redis.Redis) -> None:
    """A server out of memory refuses every command queued in a transaction, reads included
    (Redis 7.0; not Valkey 8.1), and `status`, `nodes`, `users`, `decisions` and `check` all
    stopped on it (a helper's audit): each reads again without one, the pool standing still
    while its writes are refused."""
    pool = "oom"
    now = int(time.time() * 1000)
    asyncio.run(_boot_then_connect(redis_url, pool, now - 60_000, "n1", "n2"))
    asyncio.run(_boot_then_connect(redis_url, pool, now - 30_000, user="u1"))
    common = ["--redis-url", redis_url, "--pool", pool]
    sync_redis.config_set("maxmemory-policy", "noeviction")
    sync_redis.config_set("maxmemory", 1)
    try:
        # Redis 7.0 refuses a transaction of reads (the fallback is what this test runs
        # there); Valkey 8.1 runs it.
        with contextlib.suppress(redis.exceptions.OutOfMemoryError):
            with sync_redis.pipeline(transaction=True) as pipe:
                pipe.get("x")
                pipe.execute()
        for command in (["status"], ["nodes"], ["users"], ["decisions"], ["check"]):
            result = CliRunner().invoke(app, [*command, *common], env={"COLUMNS": "200"})
            assert result.exit_code == 0, (command, result.output)
        shown = CliRunner().invoke(app, ["status", *common], env={"COLUMNS": "200"}).output
        assert "ready 1" in shown
        # the cause said, not only its replicas silent (an operator's drill)
        assert "the Redis server is out of memory" in " ".join(shown.split())
        as_json = CliRunner().invoke(app, ["status", "--json", *common])
        assert json.loads(as_json.output)["server_refuses_writes"] is True
    finally:
        sync_redis.config_set("maxmemory", 0)


def test_the_views_and_the_model_read_a_server_that_holds_its_writes(
        redis_url: str, sync_redis: redis.Redis) -> None:
    """CLIENT PAUSE WRITE (a failover's pause, a drill's): the server answers reads, and a
    script flagged no-writes is one, but a script it does not hold (restarted, flushed, or one
    no replica runs: model_view) called by EVALSHA is held as a write, since the server cannot
    read its flags. `model show` and `model export` waited out their timeout and said "cannot
    reach Redis" beside `status` and `check` reading the pool (a helper's drill); a replica's
    gauges after a restart froze the same way. Read-only scripts go as EVALSHA_RO."""
    pool = "paused"
    now = int(time.time() * 1000)
    asyncio.run(_boot_then_connect(redis_url, pool, now, "n1"))
    sync_redis.hset(PoolKeys(pool).key("model"), mapping={"last_ms": now, "r0": 0.5, "x0": 10})
    sync_redis.script_flush()  # a server restarted: it holds no script
    # The client's timeout short: held, the command fails in a second rather than five.
    url = f"{redis_url}{'&' if '?' in redis_url else '?'}socket_timeout=1"
    common = ["--redis-url", url, "--pool", pool]
    sync_redis.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
    try:
        for command in (["status"], ["check"], ["model", "show"], ["model", "export"]):
            result = CliRunner().invoke(app, [*command, *common], env={"COLUMNS": "200"})
            assert result.exit_code == 0, (command, result.output)
        # and the replicas' gauges, and the check of the commands a replica makes at its start
        async def snapshot() -> tuple[int, list[str]]:
            client = aioredis.Redis.from_url(url)
            try:
                snap = await Scripts(client, PoolKeys(pool)).snapshot(now, 60_000)
                return snap.counts["ready"], await commands_refused(client, PoolKeys(pool))
            finally:
                await client.aclose()

        assert asyncio.run(snapshot()) == (1, [])
    finally:
        sync_redis.execute_command("CLIENT", "UNPAUSE")


def _first_trouble_of_a_watch(redis_url: str, pool: str) -> str:
    """The first line `status --watch` writes to stderr, then stopped as Ctrl-C does."""
    import os
    import signal
    import subprocess
    import sys

    watch = subprocess.Popen(
        [sys.executable, "-m", "provisioner", "status", "--watch", "--redis-url", redis_url,
         "--pool", pool], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "200"})
    try:
        assert watch.stderr is not None
        line = watch.stderr.readline()
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=15) == 0
    finally:
        watch.kill()
        watch.wait(timeout=10)
    return line


def test_status_watch_says_a_server_that_refuses_the_reading_refused_it(redis_url: str) -> None:
    """A key of the pool of another type (an edit by hand) makes the server refuse the
    reading: the watch says it refused, not that it is out of reach, which would send the
    operator to the network."""
    keys = PoolKeys("refusing")
    sync = redis.Redis.from_url(redis_url)
    sync.set(keys.key("epoch"), "1-a")
    sync.set(keys.key("ready"), "edited by hand")  # a list, by the schema
    line = _first_trouble_of_a_watch(redis_url, "refusing")
    assert line.startswith("Redis refused: WRONGTYPE"), line


def test_status_watch_says_a_wrong_password_was_refused(wrong_password_url: str) -> None:
    """redis-py files a wrong password as a connection error: the watch said "Redis
    unreachable" of a server that answered."""
    line = _first_trouble_of_a_watch(wrong_password_url, "default")
    assert line.startswith("Redis refused: invalid username-password pair"), line


def test_status_watch_says_a_server_at_its_maxclients_refused(full_redis_url: str) -> None:
    """Found by a review: "Redis unreachable: max number of clients reached"."""
    line = _first_trouble_of_a_watch(full_redis_url, "default")
    assert line.startswith("Redis refused: max number of clients reached"), line


async def test_status_reads_a_server_whose_info_fails_as_not_full() -> None:
    """A review: a proxy that lacks INFO and closes the connection on it (twemproxy's way)
    made `status` fail with "cannot reach Redis", where it worked before INFO was read."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    class ClosesOnInfo:
        async def info(self, section: str) -> dict[str, Any]:
            raise RedisConnectionError("Connection closed by server.")

    assert await view.server_full(cast(aioredis.Redis, ClosesOnInfo())) == ""


def test_status_gives_the_connects_that_resumed_a_session(redis_url: str) -> None:
    """A connect within 30 s of the same user's session ending resumes it (stats 'resumed'):
    `status --json` gives the count, and the panel says it beside the connects, only once
    there is one."""
    now = int(time.time() * 1000)
    pool = "flap-cli"
    asyncio.run(_boot_then_connect(redis_url, pool, now - 20_000, "n1", user="u1"))
    common = ["--redis-url", redis_url, "--pool", pool]
    status = json.loads(CliRunner().invoke(app, ["status", *common, "--json"]).output)
    assert status["resumed"] == 0, status
    text = CliRunner().invoke(app, ["status", *common], env={"COLUMNS": "200"}).output
    assert "resumed" not in text, text

    async def flap() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        scripts = Scripts(client, PoolKeys(pool))
        for at in (now - 10_000, now - 5_000):
            await scripts.release(at, "u1")
            assert (await scripts.allocate(at + 1_000, "u1")).resumed
        await client.aclose()

    asyncio.run(flap())
    status = json.loads(CliRunner().invoke(app, ["status", *common, "--json"]).output)
    assert (status["connects"], status["resumed"]) == (3, 2), status
    text = CliRunner().invoke(app, ["status", *common], env={"COLUMNS": "200"}).output
    assert "mean wait in the queue - resumed 2 abandoned 0" in " ".join(text.split()), text
