"""The operator's views read the pool as it was at one instant, never age anything below 0,
say when --limit left rows out, and call a model learned as `model import` does (a review of
the read side: each test failed before its mend)."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from typer.testing import CliRunner

from provisioner import view
from provisioner.cli import app
from provisioner.keys import PoolKeys
from provisioner.scripts import Scripts, Snapshot
from tests.helpers import T0


def _once_after(monkeypatch: pytest.MonkeyPatch, client: aioredis.Redis,
                reads: Callable[[tuple[Any, ...]], bool],
                then: Callable[[], Awaitable[None]]) -> Callable[[], bool]:
    """Run `then` once, right after the first round trip that sends a command `reads`
    matches, whatever form the round trip takes (the client's call, a pipeline's, or one a
    pipeline under WATCH sends at once); whether it ran."""
    ran = False

    async def after(commands: list[tuple[Any, ...]]) -> None:
        nonlocal ran
        if not ran and any(reads(c) for c in commands):
            ran = True
            await then()

    client_call: Any = client.execute_command

    async def hooked(*args: Any, **options: Any) -> Any:
        reply = await client_call(*args, **options)
        await after([args])
        return reply

    monkeypatch.setattr(client, "execute_command", hooked)
    pipeline_execute: Any = aioredis.client.Pipeline.execute

    async def hooked_execute(self: Any, *args: Any, **options: Any) -> Any:
        queued = [command[0] for command in self.command_stack]
        reply = await pipeline_execute(self, *args, **options)
        await after(queued)
        return reply

    monkeypatch.setattr(aioredis.client.Pipeline, "execute", hooked_execute)
    immediate: Any = aioredis.client.Pipeline.immediate_execute_command

    async def hooked_immediate(self: Any, *args: Any, **options: Any) -> Any:
        reply = await immediate(self, *args, **options)
        await after([args])
        return reply

    monkeypatch.setattr(aioredis.client.Pipeline, "immediate_execute_command", hooked_immediate)
    return lambda: ran


async def test_users_never_shows_a_user_both_waiting_and_connected(
        aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """`users` read the queue, then the waits' starts, then the sessions, each in its own
    round trip: a user served between them was listed as waiting (for an unknown time) and as
    connected at once, which no instant of the pool held. A replica's script runs here right
    after the round trip that read the queue, whatever form that round trip takes."""
    keys = PoolKeys("torn-users")
    scripts = Scripts(aredis, keys)
    await scripts.allocate(T0, "u1")  # no node: u1 waits
    assert await aredis.hlen(keys.key("waiting_since")) == 1

    async def serve() -> None:  # a node comes up: u1 is served from the queue
        await scripts.apply_node_status(T0 + 1_000, "n1", "ready")

    served = _once_after(monkeypatch, aredis, lambda args: str(args[0]).upper() in (
        "ZRANGE", "LRANGE") and args[1] == keys.key("waiting"), serve)
    waiting, sessions = await view.user_rows(aredis, "torn-users")
    assert served() and await aredis.hgetall(keys.key("alloc")) == {"u1": "n1"}
    both = {u for u, _ in waiting} & {s.user for s in sessions}
    assert not both, (waiting, sessions)
    assert all(since is not None for _, since in waiting), waiting


def test_status_never_shows_a_decision_made_in_the_future() -> None:
    """A decision is aged by its replica's clock against the server's read before it: one
    stamped a second ahead (a replica's clock ahead within the 2 s tolerated, or a decision
    written after the view read the time) was shown aged "-1s"."""
    now = T0
    snapshot = Snapshot({name: 0 for name in (
        "ready", "booting", "allocated", "waiting", "terminating", "pending", "unclaimed",
        "nodes", "active", "engaged", "oldest_session_ms", "oldest_wait_ms", "spare_held",
        "spare_held_ms")}, {})
    decisions = [{"now": str(now + 1_200), "replica": "r1", "kind": "scale_up",
                  "reason": "spare 0 < target 1", "numbers": "{}", "acted": "1",
                  "id": f"{now + 1_200}-0"}]
    pool_view = view.PoolView("p", now, snapshot, decisions, [])
    from rich.console import Console
    console = Console(width=200, record=True)
    console.print(view.render_view(pool_view))
    text = console.export_text()
    assert "-1s" not in text, text


def test_users_json_never_ages_a_session_or_a_wait_below_zero(redis_url: str) -> None:
    """`status` ages the longest session max(0, ...) and `users` in text `0s`; `users --json`
    printed the difference as it came: a session begun by a replica whose clock runs 1.5 s
    ahead of the server's (within what the pool tolerates) was `session_s: -1.5`, and so were
    its `last_active_s` and a wait's `waiting_s`."""
    keys = PoolKeys("ahead-json")
    ahead = int(time.time() * 1000) + 1_500

    async def record() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        scripts = Scripts(client, keys)
        await scripts.apply_node_status(ahead, "n1", "ready")
        await scripts.record_activity(ahead, "u1", ahead, 120_000, 3, 100)
        await scripts.allocate(ahead, "u1")
        await scripts.allocate(ahead, "u2")  # no node left: waits
        await client.aclose()

    asyncio.run(record())
    common = ["--redis-url", redis_url, "--pool", "ahead-json"]
    shown = json.loads(CliRunner().invoke(app, ["users", "--json", *common]).stdout)
    status = json.loads(CliRunner().invoke(app, ["status", "--json", *common]).stdout)
    assert status["longest_session_s"] == 0.0
    ages = [shown["allocated"][0]["session_s"], shown["waiting"][0]["waiting_s"]]
    assert all(age is not None and age >= 0 for age in ages), shown


def test_model_show_and_import_agree_on_whether_the_pool_learned(
        redis_url: str, sync_redis: Any) -> None:
    """A pool on --scaling-policy heuristic learns the boot time (the stuck-boot timeout reads
    it) and the release rate, never the forecast's clock. `model import` refuses it ("the pool
    has a model already, learned or imported"), while `model show` said it "has learned
    nothing yet: every figure below is the prior", beside a horizon of its learned boot."""
    learned = {"boot_ms": 150000.0, "boot_n": 3.0, "rel": 12.0, "bx": 9000.0}
    sync_redis.hset(PoolKeys("heur").key("model"), mapping=learned)
    runner = CliRunner(env={"COLUMNS": "200"})
    common = ["--redis-url", redis_url, "--pool", "heur"]
    shown = json.loads(runner.invoke(app, ["model", "show", "--json", *common]).stdout)
    text = " ".join(runner.invoke(app, ["model", "show", *common]).output.split())
    model = Path(tempfile.mkdtemp()) / "m.json"
    model.write_text(json.dumps({"format": "provisioner-model/1", "fields": {"boot_ms": 90000}}))
    imported = runner.invoke(app, ["model", "import", str(model), *common])
    assert imported.exit_code == 2 and "the pool has a model already" in imported.output
    assert shown["boot_learned"] and shown["lead_s"] == 150
    assert shown["learned"], shown
    assert "has learned nothing yet" not in text, text


async def test_nodes_lists_only_nodes_live_at_one_instant(
        aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """`nodes` ("live nodes of the pool") read the ids, then each record, in two round trips:
    a node terminated between them was listed with its tombstone, state `terminated`, a state
    no live node has and `status` never counts."""
    keys = PoolKeys("torn-nodes")
    scripts = Scripts(aredis, keys)
    for node in ("n1", "n2"):
        await scripts.apply_node_status(T0, node, "ready")

    async def terminate() -> None:
        await scripts.apply_node_status(T0 + 1_000, "n1", "terminated")

    done = _once_after(monkeypatch, aredis, lambda args: str(args[0]).upper() == "ZRANGE"
                       and args[1] == keys.key("nodes"), terminate)
    rows = await view.node_rows(aredis, "torn-nodes")
    assert done() and await aredis.zrange(keys.key("nodes"), 0, -1) == ["n2"]
    assert [row.get("state") for row in rows] in (["ready"], ["ready", "ready"]), rows
