"""The mock Node API: the challenge's contract, the races it reproduces, and its faults."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import signal
import statistics
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from provisioner.config import redis_client
from provisioner.metrics import Metrics
from provisioner.mock_node_api import BootDelay, DelaySpecError, Faults, MockNodeApi
from provisioner.nodeapi import CreateOutcome, HttpNodeApi
from provisioner.redis_server import free_port
from tests.helpers import Subscriber, answering

Start = Callable[..., Any]


@pytest.fixture
async def start_api(aredis: aioredis.Redis) -> AsyncIterator[Start]:
    runners: list[tuple[web.AppRunner, MockNodeApi]] = []
    clients: list[httpx.AsyncClient] = []

    async def start(boot_delay: str = "0.2", redis: aioredis.Redis | None = None,
                    api: MockNodeApi | None = None, **kwargs: Any) -> httpx.AsyncClient:
        """Serve a mock built from these arguments, or `api` (a test that reaches into it)."""
        api = api or MockNodeApi(redis or aredis, BootDelay.parse(boot_delay), seed=1, **kwargs)
        runner = web.AppRunner(api.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()  # any free port: no race to bind
        port = runner.addresses[0][1]
        runners.append((runner, api))
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}")
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.aclose()
    for runner, api in runners:
        await api.close()
        await runner.cleanup()


async def test_create_publishes_booting_before_answering_then_ready(
        start_api: Start, aredis: aioredis.Redis) -> None:
    api = await start_api(boot_delay="0.3")
    async with Subscriber(aredis, "node:status") as sub:
        response = await api.post("/api/nodes")
        assert response.status_code == 202
        node_id = response.json()["id"]
        # Already published when the 202 came back: it is waiting in the subscriber's socket.
        first = await sub.wait_for(lambda ch, m: True, within=0.5)
        assert first == ("node:status", {"node_id": node_id, "status": "booting"})
        await sub.wait_for(lambda ch, m: m["status"] == "ready", within=3)
    assert (await api.get(f"/api/nodes/{node_id}")).json()["state"] == "ready"
    listed = (await api.get("/api/nodes")).json()["nodes"]
    assert [(n["id"], n["state"]) for n in listed] == [(node_id, "ready")]


async def test_a_create_it_cannot_publish_is_refused_and_not_kept(start_api: Start) -> None:
    """The node was stored before its `booting` was published: when Redis could not be
    reached the POST failed with 500, and the node was listed forever, booting."""
    unreachable = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        api = await start_api(redis=unreachable)
        response = await api.post("/api/nodes")
        assert response.status_code == 503
        assert response.json() == {"error": "cannot publish node:status"}
        assert (await api.get("/api/nodes")).json()["nodes"] == []
        assert (await api.get("/healthz")).json()["nodes"] == 0
    finally:
        await unreachable.aclose()


@pytest.mark.parametrize("option", [["--port", "99999"], ["--port", "0"],
                                    ["--latency", "inf"], ["--latency", "nan"],
                                    ["--terminate-delay", "inf"], ["--death-rate", "inf"],
                                    ["--max-nodes", "10000000"],
                                    ["--retry-after", "-1"], ["--retry-after", "-0.5"],
                                    ["--retry-after", "inf"], ["--retry-after", "nan"],
                                    ["--retry-after", "86401"],
                                    ["--answer-latency", "-1"], ["--answer-latency", "inf"],
                                    ["--answer-latency", "601"]])
def test_an_unbounded_mock_knob_is_refused_before_serving(option: list[str]) -> None:
    from typer.testing import CliRunner

    from provisioner.cli import app

    result = CliRunner().invoke(app, ["mock-node-api", "--redis-url", "redis://127.0.0.1:1/0",
                                      *option])
    assert result.exit_code == 2 and "Invalid value" in result.output, result.output


async def test_delete_is_idempotent_and_unknown_ids_are_404(
        start_api: Start, aredis: aioredis.Redis) -> None:
    api = await start_api(boot_delay="0", terminate_delay_s=0.1)
    node_id = (await api.post("/api/nodes")).json()["id"]
    async with Subscriber(aredis, "node:status") as sub:
        assert (await api.delete(f"/api/nodes/{node_id}")).status_code == 202
        assert (await api.delete(f"/api/nodes/{node_id}")).status_code == 202
        await sub.wait_for(lambda ch, m: m["status"] == "terminated", within=3)
        messages = await sub.drain(settle=0.3)
    assert [m["status"] for _, m in messages].count("terminated") == 1
    assert (await api.delete(f"/api/nodes/{node_id}")).status_code == 202
    assert (await api.delete("/api/nodes/node-nobody")).status_code == 404
    assert (await api.get("/api/nodes/node-nobody")).status_code == 404


async def test_the_mock_logs_every_call_it_refuses(start_api: Start,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Found by a review: a DELETE of a node it never made, a path it does not serve, a method
    a path does not take and a create past --max-nodes were answered 404, 405 and 429 with
    nothing in its log (its access log is off), so a client calling it wrong went unseen."""
    api = await start_api(boot_delay="0", max_nodes=1)
    caplog.set_level(logging.INFO, logger="provisioner.mock_node_api")
    assert (await api.post("/api/nodes")).status_code == 202
    calls = [("DELETE", "/api/nodes/node-nobody", 404, "DELETE /api/nodes/node-nobody: 404"),
             ("POST", "/api/node", 404, "POST /api/node: 404"),
             ("PUT", "/api/nodes", 405, "PUT /api/nodes: 405"),
             ("POST", "/api/nodes", 429, "POST /api/nodes: 429 at most 1 nodes")]
    for method, path, status, logged in calls:
        assert (await api.request(method, path)).status_code == status
        assert any(r.getMessage().startswith(logged) for r in caplog.records), (logged, caplog.text)



async def test_a_refused_call_is_logged_on_one_line_as_it_was_sent(
        start_api: Start, caplog: pytest.LogCaptureFixture) -> None:
    """Found by a review: the path was logged decoded, so a %0A in it began a line of the
    client's own in the mock's text log (its formatter keeps line breaks, for tracebacks)."""
    api = await start_api(boot_delay="0")
    caplog.set_level(logging.INFO, logger="provisioner.mock_node_api")
    forged = "/api/nodes/x%0A2026-12-05 10:00:00 ERROR forged"
    assert (await api.delete(forged)).status_code == 404
    [said] = [r.getMessage() for r in caplog.records if ": 404" in r.getMessage()]
    assert "\n" not in said and said.startswith("DELETE /api/nodes/x%0A2026-12-05"), said


async def test_delete_while_booting_never_becomes_ready(
        start_api: Start, aredis: aioredis.Redis) -> None:
    api = await start_api(boot_delay="0.3", terminate_delay_s=0)
    async with Subscriber(aredis, "node:status") as sub:
        node_id = (await api.post("/api/nodes")).json()["id"]
        await api.delete(f"/api/nodes/{node_id}")
        messages = await sub.drain(settle=0.8)
    assert [m["status"] for _, m in messages] == ["booting", "terminated"]


async def test_a_death_rate_too_small_to_draw_leaves_the_node_ready(
        start_api: Start, aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    """5e-324 a node-hour is 0 a second, and the draw divided by it: the boot task failed (a
    review), which nothing said until failures were logged."""
    api = await start_api(boot_delay="0", faults=Faults(death_rate_per_hour=5e-324))
    with caplog.at_level(logging.ERROR):
        async with Subscriber(aredis, "node:status") as sub:
            await api.post("/api/nodes")
            await sub.wait_for(lambda ch, m: m["status"] == "ready", within=3)
            await asyncio.sleep(0.2)
    assert "failed" not in caplog.text, caplog.text
    assert [n["state"] for n in (await api.get("/api/nodes")).json()["nodes"]] == ["ready"]


async def test_max_nodes_answers_429(start_api: Start) -> None:
    api = await start_api(max_nodes=2)
    codes = [(await api.post("/api/nodes")).status_code for _ in range(3)]
    assert codes == [202, 202, 429]


@pytest.mark.parametrize(("given", "header"), [
    ({}, "10"), ({"retry_after_s": 7}, "7"), ({"retry_after_s": 1}, "1"),
    ({"retry_after_s": 2.5}, "3"), ({"retry_after_s": 0.001}, "1"),  # whole seconds, up
    ({"retry_after_s": 0}, None)])  # none: a 429 as it was before
async def test_a_429_says_when_to_ask_again_in_whole_seconds(
        start_api: Start, given: dict[str, float], header: str | None) -> None:
    """RFC 9110's delay-seconds is a whole number: a client reading it strictly (this
    service's does) ignores `2.5`. Only the 429 carries it."""
    api = await start_api(max_nodes=1, **given)
    created = await api.post("/api/nodes")
    assert created.status_code == 202 and "retry-after" not in created.headers
    full = await api.post("/api/nodes")
    assert full.status_code == 429
    assert full.headers.get("retry-after") == header


def test_the_mock_s_default_retry_after_is_the_service_s_hold_without_one() -> None:
    """What its help says: against the mock a stack holds its creates as long as it did
    before the mock sent the header."""
    from provisioner.mock_node_api import RETRY_AFTER_S
    from provisioner.service import CAPACITY_HOLD_MS

    assert RETRY_AFTER_S * 1000 == CAPACITY_HOLD_MS


@pytest.mark.parametrize("seconds", [-1.0, -0.001, math.inf, -math.inf, math.nan, 86_401.0])
def test_a_retry_after_no_header_can_say_is_refused(seconds: float) -> None:
    with pytest.raises(ValueError, match="retry_after_s"):
        MockNodeApi(None, BootDelay.parse("1"), retry_after_s=seconds)  # type: ignore[arg-type]


@pytest.mark.parametrize(("option", "seconds"), [([], 10), (["--retry-after", "0"], 0),
                                                 (["--retry-after", "2.5"], 3),
                                                 (["--retry-after", "86400"], 86_400)])
def test_the_mock_command_passes_its_retry_after_on(monkeypatch: pytest.MonkeyPatch,
                                                    option: list[str], seconds: int) -> None:
    from typer.testing import CliRunner

    from provisioner import mock_node_api
    from provisioner.cli import app

    served: list[MockNodeApi] = []

    async def serve(api: MockNodeApi, host: str, port: int) -> None:
        served.append(api)
        await api.redis.aclose()

    monkeypatch.setattr(mock_node_api, "serve", serve)
    result = CliRunner().invoke(app, ["mock-node-api", "--redis-url", "redis://127.0.0.1:1/0",
                                      *option])
    assert result.exit_code == 0, result.output
    assert [api.retry_after_s for api in served] == [seconds]


async def test_a_create_s_answer_may_come_after_the_node_is_ready(
        start_api: Start, aredis: aioredis.Redis) -> None:
    """--answer-latency: the answer of a create comes up to N s after the node exists, as a
    real API's answer slow on its way back, so its `booting`, and its `ready` when the boot is
    shorter, come before it. The mock had all its latency before the node existed, and a
    node ready before its create's answer (which the pool learns its boot from) was out of
    reach of every live run."""
    api = MockNodeApi(aredis, BootDelay.parse("0.05"), seed=1,
                      faults=Faults(answer_latency_s=1.0))
    api.rng.uniform = lambda low, high: high  # type: ignore[method-assign]
    mock = await start_api(api=api)
    async with Subscriber(aredis, "node:status") as sub:
        created = await mock.post("/api/nodes")
        assert created.status_code == 202
        node_id = created.json()["id"]
        assert api.nodes[node_id].state == "ready"  # before its answer came
        messages = await sub.drain(settle=0.2)
    assert [(m["node_id"], m["status"]) for _, m in messages] == [
        (node_id, "booting"), (node_id, "ready")]


async def test_a_mock_stopping_answers_a_create_at_once_with_its_node(
        start_api: Start, aredis: aioredis.Redis) -> None:
    """A create in its answer's latency when the mock stops is answered at once with the node
    it made (202, not the 503 of a call refused before it made one: the node exists, and
    would be the caller's without its id)."""
    api = MockNodeApi(aredis, BootDelay.parse("100"), seed=1,
                      faults=Faults(answer_latency_s=600.0))
    mock = await start_api(api=api)
    pending = asyncio.create_task(mock.post("/api/nodes"))
    for _ in range(200):
        if api.nodes:
            break
        await asyncio.sleep(0.01)
    await api.close()
    answered = await asyncio.wait_for(pending, 5)
    assert answered.status_code == 202 and answered.json()["id"] in api.nodes


@pytest.mark.parametrize("seconds", [7, 0])
async def test_the_client_reads_the_mock_s_retry_after_on_a_create_at_capacity(
        start_api: Start, seconds: int) -> None:
    """The client's Retry-After path, tested before against httpx's MockTransport only, with
    the real mock over HTTP: the replica holds its creates as long as this says."""
    mock = await start_api(boot_delay="100", max_nodes=1, retry_after_s=seconds)
    client = HttpNodeApi(str(mock.base_url), attempts=1, metrics=Metrics())
    try:
        assert (await client.create()).outcome is CreateOutcome.CREATED
        full = await client.create()
    finally:
        await client.aclose()
    assert full.outcome is CreateOutcome.FAILED and full.detail.startswith("HTTP 429")
    assert full.at_capacity and not full.api_down
    assert full.retry_after_s == (seconds or None)


async def test_injected_faults(start_api: Start, aredis: aioredis.Redis) -> None:
    failing = await start_api(faults=Faults(create_error_rate=1.0))
    assert (await failing.post("/api/nodes")).status_code == 500
    assert (await failing.get("/api/nodes")).json()["nodes"] == []

    stuck = await start_api(boot_delay="0", faults=Faults(stuck_rate=1.0))
    async with Subscriber(aredis, "node:status") as sub:
        await stuck.post("/api/nodes")
        messages = await sub.drain(settle=0.5)
    assert [m["status"] for _, m in messages] == ["booting"]

    dying = await start_api(boot_delay="0", faults=Faults(death_rate_per_hour=36_000))
    async with Subscriber(aredis, "node:status") as sub:
        await dying.post("/api/nodes")
        await sub.wait_for(lambda ch, m: m["status"] == "terminated", within=5)
    assert [m["status"] for _, m in sub.messages] == ["booting", "ready", "terminated"]


@pytest.mark.parametrize("spec", ["", "x", "-1", "uniform:5", "uniform:9:1", "lognormal:0:5",
                                  "lognormal:60:30", "gamma:1:2", "nan", "exp:1:2",
                                  # past a day, or a median so small that a draw is infinite
                                  # (a review: each left its nodes booting for good)
                                  "lognormal:1:1e308", "1e308", "exp:1e6", "uniform:0:90000",
                                  "lognormal:1e-320:1", "lognormal:1e-300:1e300"])
def test_bad_boot_delay_specs_are_refused(spec: str) -> None:
    with pytest.raises(DelaySpecError):
        BootDelay.parse(spec)


def test_every_boot_delay_drawn_is_a_delay_of_at_most_a_day() -> None:
    rng = random.Random(2)
    for spec in ("lognormal:0.001:86400", "exp:86400", "uniform:0:86400", "86400"):
        draws = [BootDelay.parse(spec).draw(rng) for _ in range(2_000)]
        assert all(0 <= d <= 86_400 and math.isfinite(d) for d in draws), spec


def test_boot_delay_distributions() -> None:
    rng = random.Random(7)
    assert BootDelay.parse("60").draw(rng) == 60
    uniform = [BootDelay.parse("uniform:10:20").draw(rng) for _ in range(1000)]
    assert 10 <= min(uniform) and max(uniform) <= 20
    lognormal = sorted(BootDelay.parse("lognormal:60:150").draw(rng) for _ in range(20_000))
    assert statistics.median(lognormal) == pytest.approx(60, rel=0.05)
    assert lognormal[int(0.95 * len(lognormal))] == pytest.approx(150, rel=0.07)
    exp = [BootDelay.parse("exp:30").draw(rng) for _ in range(20_000)]
    assert statistics.mean(exp) == pytest.approx(30, rel=0.05)


class SlowReplies:
    """A Redis whose publish replies come back 50 ms after the message went out, as from a
    server across a network."""

    def __init__(self, real: aioredis.Redis) -> None:
        self.real = real

    async def publish(self, channel: str, message: str) -> int:
        sent = await self.real.publish(channel, message)
        await asyncio.sleep(0.05)
        return int(sent)


class BrokenClient:
    """A Redis client whose publish fails with an error of its own, not Redis's (an option it
    took from the URL and refuses only on use)."""

    async def publish(self, channel: str, message: str) -> int:
        raise TypeError("unexpected keyword argument 'socket_timout'")


async def test_a_create_whose_status_cannot_go_out_keeps_no_node(start_api: Start) -> None:
    """Its node was kept while the POST answered 500: the nodes nobody was given filled
    --max-nodes, and GET /api/nodes listed them booting for ever (a review)."""
    api = await start_api(redis=BrokenClient(), max_nodes=2)
    codes = [(await api.post("/api/nodes")).status_code for _ in range(3)]
    assert codes == [503, 503, 503]
    assert (await api.get("/api/nodes")).json()["nodes"] == []


async def test_max_nodes_holds_when_creates_come_together(start_api: Start,
                                                          aredis: aioredis.Redis) -> None:
    # Each create waited on its publish between the check and keeping the node: 20 of 20 got
    # through a limit of 2.
    api = await start_api(boot_delay="100", redis=SlowReplies(aredis), max_nodes=2)
    answers = await asyncio.gather(*(api.post("/api/nodes") for _ in range(10)))
    assert sorted(a.status_code for a in answers) == [202] * 2 + [429] * 8


async def test_a_node_announced_booting_is_found_by_a_delete_at_once(
        start_api: Start, aredis: aioredis.Redis) -> None:
    # Its `booting` went out before the node was kept: a DELETE on that status got 404 ("gone")
    # and the node then booted, owned by nobody.
    api = await start_api(boot_delay="0.3", redis=SlowReplies(aredis))
    async with Subscriber(aredis, "node:status") as sub:
        creating = asyncio.create_task(api.post("/api/nodes"))
        _, status = await sub.wait_for(lambda ch, m: m["status"] == "booting", within=2)
        deleted = await api.delete(f"/api/nodes/{status['node_id']}")
        assert deleted.status_code == 202 and (await creating).status_code == 202
        await sub.wait_for(lambda ch, m: m["status"] == "terminated", within=3)
    await asyncio.sleep(0.5)  # past its boot delay: it never becomes ready
    node = (await api.get(f"/api/nodes/{status['node_id']}")).json()
    assert node["state"] == "terminated"


async def test_a_restarted_mock_names_new_nodes_whatever_its_seed(aredis: aioredis.Redis) -> None:
    first = MockNodeApi(aredis, BootDelay.parse("1"), seed=7)
    again = MockNodeApi(aredis, BootDelay.parse("1"), seed=7)
    assert next(first._ids) != next(again._ids)


async def test_a_mock_told_to_stop_answers_a_call_in_its_latency_and_creates_nothing(
        aredis: aioredis.Redis) -> None:
    """SIGTERM waited out the injected latency of the call in flight (82 s in a review's run
    with --latency 600), then created its node and published `booting` from a mock told to
    stop."""
    from provisioner.mock_node_api import serve

    in_latency = asyncio.Event()

    class Watched(MockNodeApi):
        async def _latency(self, up_to_s: float) -> bool:
            in_latency.set()
            return await super()._latency(up_to_s)

    # seed 1 draws a latency of 80 s for the first call
    api = Watched(aredis, BootDelay.parse("1"), faults=Faults(latency_s=600), seed=1)
    serving, port, _ = await answering(lambda port: serve(api, "127.0.0.1", port), "/healthz")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        async with Subscriber(aredis, "node:status") as sub:
            creating = asyncio.create_task(client.post("/api/nodes"))
            await in_latency.wait()
            os.kill(os.getpid(), signal.SIGTERM)  # serve() handles it on this loop
            # a guard against the hang, not a measure of speed: the latency left is 80 s
            answer = await asyncio.wait_for(creating, 20)
            await asyncio.wait_for(serving, 20)
            published = await sub.drain(settle=0.3)
    assert answer.status_code == 503 and answer.json() == {"error": "the mock is stopping"}
    assert published == [] and api.nodes == {}


async def test_a_mock_on_a_taken_port_fails_cleanly_and_the_tests_start_it_on_another(
        redis_url: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Under `make test`'s two workers a free port can be taken between the asking and the
    binding. serve() there raises the OSError, leaving nothing set up; `answering` starts it
    again on another port."""
    import socket

    from provisioner import mock_node_api
    from tests import helpers

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1]]
        real = helpers.free_port
        monkeypatch.setattr(helpers, "free_port", lambda: ports.pop() if ports else real())
        tried: list[int] = []
        caplog.set_level(logging.INFO, logger=mock_node_api.log.name)

        def start(port: int) -> Any:
            tried.append(port)
            api = MockNodeApi(aioredis.Redis.from_url(redis_url), BootDelay.parse("1"), seed=1)
            return mock_node_api.serve(api, "127.0.0.1", port)

        serving, port, answer = await answering(start, "/healthz")
        try:
            assert tried == [taken.getsockname()[1], port] and answer.status_code == 200
            said = [r.getMessage() for r in caplog.records if "mock Node API on" in r.getMessage()]
            assert said == [f"mock Node API on http://127.0.0.1:{port}"]
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # serve() handles it on this loop
            await asyncio.wait_for(serving, 20)


class FirstHeld:
    """A Redis whose first publish waits before it goes out (its connection still being made)
    until the test lets it; every publish is recorded in the order it reached the server."""

    def __init__(self, real: aioredis.Redis) -> None:
        self.real = real
        self.holding = asyncio.Event()
        self.let_go = asyncio.Event()
        self.sent: list[str] = []

    async def publish(self, channel: str, message: str) -> int:
        if not self.holding.is_set():
            self.holding.set()
            await self.let_go.wait()
        self.sent.append(json.loads(message)["status"])
        return int(await self.real.publish(channel, message))


async def test_a_delete_while_booting_goes_out_publishes_terminated_after_booting(
        start_api: Start, aredis: aioredis.Redis) -> None:
    """A node is listed (and found by a DELETE) before its `booting` goes out: with no
    terminate delay its `terminated` went out first, and a pool that heard them in that
    order took the late `booting` for a node that had ended."""
    held = FirstHeld(aredis)
    api = await start_api(boot_delay="100", redis=held, terminate_delay_s=0)
    async with Subscriber(aredis, "node:status") as sub:
        creating = asyncio.create_task(api.post("/api/nodes"))
        await held.holding.wait()
        [listed] = (await api.get("/api/nodes")).json()["nodes"]
        assert (await api.delete(f"/api/nodes/{listed['id']}")).status_code == 202
        for _ in range(50):  # the termination's turns, had it not to wait for the booting
            await asyncio.sleep(0)
        held.let_go.set()
        assert (await creating).status_code == 202
        await sub.wait_for(lambda ch, m: m["status"] == "terminated", within=5)
    assert held.sent == ["booting", "terminated"]
    assert [m["status"] for _, m in sub.messages] == ["booting", "terminated"]


def test_uniform_delays_spread_over_their_range_and_a_range_of_one_value_is_allowed() -> None:
    """Draws were only checked to stay within LOW..HIGH: a uniform that always drew LOW passed.
    The refusals say LOW <= HIGH and MEDIAN <= P95, so equal bounds (a fixed delay) are taken."""
    rng = random.Random(7)
    uniform = [BootDelay.parse("uniform:10:20").draw(rng) for _ in range(1000)]
    assert min(uniform) < 10.5 and max(uniform) > 19.5
    assert statistics.mean(uniform) == pytest.approx(15, rel=0.05)
    assert BootDelay.parse("uniform:5:5").draw(rng) == 5
    assert BootDelay.parse("lognormal:60:60").draw(rng) == pytest.approx(60)


async def test_a_delete_error_rate_answers_500_and_leaves_the_node_as_it_was(
        start_api: Start, aredis: aioredis.Redis) -> None:
    """--delete-error-rate was never exercised: deletes that ignored it, or failed by the
    create's rate, passed every test."""
    api = await start_api(boot_delay="100", faults=Faults(delete_error_rate=1.0),
                          terminate_delay_s=0)
    async with Subscriber(aredis, "node:status") as sub:
        created = await api.post("/api/nodes")
        assert created.status_code == 202  # a create is not failed by the delete's rate
        node_id = created.json()["id"]
        deleted = await api.delete(f"/api/nodes/{node_id}")
        assert deleted.status_code == 500 and deleted.json() == {"error": "injected failure"}
        messages = await sub.drain(settle=0.3)
    assert [m["status"] for _, m in messages] == ["booting"]
    assert (await api.get(f"/api/nodes/{node_id}")).json()["state"] == "booting"
    assert (await api.delete("/api/nodes/node-nobody")).status_code == 404  # not a 500


async def test_a_node_is_terminating_until_its_terminate_delay_has_passed(
        start_api: Start, aredis: aioredis.Redis) -> None:
    """A `terminated` published at once after a DELETE passed every test: none waited on
    --terminate-delay (100 s here, so its `terminated` cannot go out during the test)."""
    api = await start_api(boot_delay="100", terminate_delay_s=100)
    async with Subscriber(aredis, "node:status") as sub:
        node_id = (await api.post("/api/nodes")).json()["id"]
        assert (await api.delete(f"/api/nodes/{node_id}")).status_code == 202
        messages = await sub.drain(settle=0.3)
    assert [m["status"] for _, m in messages] == ["booting"]  # nor `ready`: boot delay 100 s
    [listed] = (await api.get("/api/nodes")).json()["nodes"]
    assert (listed["id"], listed["state"]) == (node_id, "terminating")
    assert (await api.get("/healthz")).json()["nodes"] == 0  # a node ending is not counted


class FakeWallClock:
    """Stands for the `time` module in the mock: `time()` is what the test sets."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


async def test_a_terminated_node_is_kept_ten_minutes_then_forgotten(
        start_api: Start, aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A terminated node is listed, and a late DELETE finds it (202), for KEEP_TERMINATED_S;
    after that it is gone (404). Untested: a mock that never forgot them, or forgot them at
    once, passed."""
    from provisioner import mock_node_api

    clock = FakeWallClock(1_000_000.0)
    monkeypatch.setattr(mock_node_api, "time", clock)
    api = await start_api(boot_delay="0", terminate_delay_s=0)
    async with Subscriber(aredis, "node:status") as sub:
        node_id = (await api.post("/api/nodes")).json()["id"]
        await sub.wait_for(lambda ch, m: m["status"] == "ready", within=5)
        assert (await api.delete(f"/api/nodes/{node_id}")).status_code == 202
        await sub.wait_for(lambda ch, m: m["status"] == "terminated", within=5)
    clock.now += 599  # the README promises ten minutes
    assert [(n["id"], n["state"]) for n in (await api.get("/api/nodes")).json()["nodes"]] == \
        [(node_id, "terminated")]
    assert (await api.delete(f"/api/nodes/{node_id}")).status_code == 202
    clock.now += 2
    assert (await api.post("/api/nodes")).status_code == 202  # another node, made later
    assert node_id not in [n["id"] for n in (await api.get("/api/nodes")).json()["nodes"]]
    assert (await api.delete(f"/api/nodes/{node_id}")).status_code == 404


async def test_a_stopped_mock_creates_nothing_and_boots_none_it_was_creating(
        start_api: Start, aredis: aioredis.Redis) -> None:
    """Only a call in its injected latency was checked: with no latency a create that came
    after close() made a node, and one whose `booting` was going out then became ready."""
    held = FirstHeld(aredis)
    api = MockNodeApi(held, BootDelay.parse("0"), seed=1)  # type: ignore[arg-type]
    client = await start_api(api=api)
    async with Subscriber(aredis, "node:status") as sub:
        creating = asyncio.create_task(client.post("/api/nodes"))
        await held.holding.wait()
        await api.close()
        held.let_go.set()
        assert (await creating).status_code == 202  # its `booting` went out: it was made
        after = await client.post("/api/nodes")
        assert after.status_code == 503 and after.json() == {"error": "the mock is stopping"}
        messages = await sub.drain(settle=0.3)
    assert [m["status"] for _, m in messages] == ["booting"]
    assert [n["state"] for n in (await client.get("/api/nodes")).json()["nodes"]] == ["booting"]


async def test_latency_is_drawn_up_to_its_bound_for_each_create_and_delete(
        start_api: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    """--latency is "up to N s": a mock that waited N s on every call passed. The waits are
    recorded, not taken."""
    from provisioner import mock_node_api

    asked: list[float] = []

    async def no_wait(stop: asyncio.Event, seconds: float) -> bool:
        asked.append(seconds)
        return stop.is_set()

    monkeypatch.setattr(mock_node_api, "sleep_unless", no_wait)
    api = await start_api(boot_delay="100", faults=Faults(latency_s=10))
    ids = [(await api.post("/api/nodes")).json()["id"] for _ in range(10)]
    for node_id in ids:
        assert (await api.delete(f"/api/nodes/{node_id}")).status_code == 202
    assert (await api.get("/api/nodes")).status_code == 200
    assert len(asked) == 20  # one per create and delete, none for a list
    assert all(0 <= s <= 10 for s in asked) and max(asked) - min(asked) > 5, asked


async def test_a_node_ended_ten_minutes_ago_is_gone_whatever_was_called_before(
        start_api: Start, aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a create or a list forgot the nodes ended KEEP_TERMINATED_S ago: a late DELETE was
    answered 202 or 404, and a GET 200 or 404, by whether another client had listed since."""
    from provisioner import mock_node_api

    clock = FakeWallClock(1_000_000.0)
    monkeypatch.setattr(mock_node_api, "time", clock)
    api = await start_api(boot_delay="0", terminate_delay_s=0)
    async with Subscriber(aredis, "node:status") as sub:
        ids = [(await api.post("/api/nodes")).json()["id"] for _ in range(2)]
        for node_id in ids:
            assert (await api.delete(f"/api/nodes/{node_id}")).status_code == 202
        for node_id in ids:
            await sub.wait_for(lambda ch, m, n=node_id: m == {"node_id": n,
                                                              "status": "terminated"}, within=5)
    clock.now += 601
    assert (await api.get(f"/api/nodes/{ids[0]}")).status_code == 404
    assert (await api.delete(f"/api/nodes/{ids[1]}")).status_code == 404


async def test_nodes_die_at_the_death_rate_per_node_hour(
        start_api: Start, aredis: aioredis.Redis) -> None:
    """Only that a node with a death rate dies was checked: a rate read per minute, 60 times
    too fast, passed. The lives drawn are recorded, not waited (36,000 a node-hour: 0.1 s)."""
    lives: list[float] = []

    async def no_wait(seconds: float) -> None:
        if seconds > 0:  # 0 is the boot delay
            lives.append(seconds)
        await asyncio.sleep(0)

    api = MockNodeApi(aredis, BootDelay.parse("0"), seed=1, sleep=no_wait,
                      faults=Faults(death_rate_per_hour=36_000))
    client = await start_api(api=api)
    async with Subscriber(aredis, "node:status") as sub:
        for _ in range(40):
            assert (await client.post("/api/nodes")).status_code == 202
        await sub.wait_for(lambda ch, m: sum(s["status"] == "terminated"
                                             for _, s in sub.messages) == 40, within=10)
    assert len(lives) == 40
    assert 0.05 < statistics.mean(lives) < 0.2, lives  # 0.0017 read per minute


async def test_a_burst_of_creates_waits_for_the_client_s_connections(redis_url: str) -> None:
    """The client's default pool refused a publish when its 100 connections were in use: 58 of
    300 creates sent together answered 503 "cannot publish node:status" with Redis well."""
    redis = redis_client(redis_url)
    api = MockNodeApi(redis, BootDelay.parse("30"), max_nodes=5000, seed=1)
    runner = web.AppRunner(api.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{runner.addresses[0][1]}",
                                     limits=httpx.Limits(max_connections=None),
                                     timeout=30) as client:
            answers = await asyncio.gather(*[client.post("/api/nodes") for _ in range(300)])
        assert [a.status_code for a in answers] == [202] * 300
    finally:
        await api.close()
        await runner.cleanup()
        await redis.aclose()


async def test_the_same_seed_and_calls_inject_the_same_faults_at_any_pace(
        start_api: Start) -> None:
    """One generator drew every fault, boot and death: whether the k-th create failed hung on
    how many boots and deaths had been drawn before it, so the seed did not repeat a run."""
    patterns = []
    for pause_s in (0.0, 0.1):
        api = await start_api(boot_delay="uniform:0:0.05",
                              faults=Faults(create_error_rate=0.5, death_rate_per_hour=3600))
        codes = []
        for _ in range(20):
            codes.append((await api.post("/api/nodes")).status_code)
            await asyncio.sleep(pause_s)
        patterns.append(codes)
    assert patterns[0] == patterns[1]
    assert set(patterns[0]) == {202, 500}


def test_the_mock_command_s_client_waits_for_a_connection(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The test above builds its client itself: `mock-node-api` making its own with the
    client's default pool (the bug it fixes) passed it. The command's client blocks."""
    from redis.asyncio import BlockingConnectionPool
    from typer.testing import CliRunner

    import provisioner.mock_node_api as mock_module
    from provisioner.cli import app

    pools: list[object] = []

    async def recorded(api: MockNodeApi, host: str, port: int) -> None:
        pools.append(api.redis.connection_pool)
        await api.redis.aclose()

    monkeypatch.setattr(mock_module, "serve", recorded)
    result = CliRunner().invoke(app, ["mock-node-api", "--redis-url", redis_url])
    assert result.exit_code == 0, result.output
    assert len(pools) == 1 and isinstance(pools[0], BlockingConnectionPool), pools


async def test_the_k_th_call_meets_the_same_faults_whatever_calls_overlap(
        aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """Faults were drawn after a call's injected latency, in the order the latencies ended:
    with --latency the k-th create's fault hung on when the next call came (seed 10 gives the
    first create 7.3 s and the second 4.2 s: sent 1 s apart, the second drew first and took
    the first's fault), so the same seed and calls did not repeat a run. The waits are run
    on a clock of the test's own, not taken."""
    import heapq
    import itertools

    from provisioner import mock_node_api

    now = 0.0
    order = itertools.count()
    due: list[tuple[float, int, asyncio.Task[Any] | None, asyncio.Future[None]]] = []
    parked: set[asyncio.Task[Any] | None] = set()

    async def on_the_test_s_clock(stop: asyncio.Event, seconds: float) -> bool:
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(due, (now + seconds, next(order), asyncio.current_task(), woken))
        parked.add(asyncio.current_task())
        await woken
        return stop.is_set()

    async def settled(calls: list[asyncio.Task[web.Response]]) -> None:
        # each call done or waiting on the clock (a publish in between is real I/O)
        for _ in range(2000):
            if all(call.done() or call in parked for call in calls):
                return
            await asyncio.sleep(0.005)
        pytest.fail("a call neither ended nor waited")

    async def run_to(t: float, calls: list[asyncio.Task[web.Response]]) -> None:
        nonlocal now
        await settled(calls)
        while due and due[0][0] <= t:
            now, _, task, woken = heapq.heappop(due)
            parked.discard(task)
            woken.set_result(None)
            await settled(calls)
        now = t

    monkeypatch.setattr(mock_node_api, "sleep_unless", on_the_test_s_clock)

    async def two_creates(apart_s: float) -> list[int]:
        nonlocal now
        now = 0.0
        api = MockNodeApi(aredis, BootDelay.parse("100"), seed=10,
                          faults=Faults(create_error_rate=0.5, latency_s=10))
        try:
            calls = [asyncio.create_task(api.create(None))]  # type: ignore[arg-type]
            await run_to(apart_s, calls)
            calls.append(asyncio.create_task(api.create(None)))  # type: ignore[arg-type]
            await run_to(apart_s + 20, calls)
            return [call.result().status for call in calls]
        finally:
            await api.close()

    one_after_the_other = await two_creates(apart_s=30)
    overlapping = await two_creates(apart_s=1)
    assert one_after_the_other == overlapping
    assert sorted(overlapping) == [202, 500]
