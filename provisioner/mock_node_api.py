"""A mock of the challenge's Node Management API, with fault injection.

`POST /api/nodes` creates a node: it publishes `node:status booting` *before* answering 202
`{"id": …}` (as the challenge's own mock does, so the service sees status before the create
returns), then `ready` after a boot delay drawn from a distribution. `DELETE /api/nodes/{id}`
answers 202 (again for a node already terminating: the call is idempotent) or 404 for an id it
never created or whose node ended over KEEP_TERMINATED_S ago, and publishes `terminated` after
`--terminate-delay`. `GET /api/nodes` lists the nodes with their states, for the service's
reconciliation. A create beyond `--max-nodes` answers 429 with a `Retry-After` (`--retry-after`
seconds).

Faults, all seeded: a share of creates and deletes answer 500, added latency on every call
(and on a create's answer, after its node exists), a share of boots that never become ready,
and nodes that die (`terminated` while ready or allocated) at a rate per node-hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import random
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Annotated, Any

import redis.asyncio as aioredis
import typer
from aiohttp import web
from aiohttp.typedefs import Handler
from redis.exceptions import RedisError

from provisioner.clock import sleep_unless
from provisioner.config import NOT_LISTENABLE, listenable, redis_client, redis_url_option
from provisioner.logs import setup_logging

log = logging.getLogger("provisioner.mock_node_api")

#: Terminated nodes stay listed this long, so a late DELETE still finds them (202, not 404);
#: after it, every call answers as for an id never made.
KEEP_TERMINATED_S = 600.0


MAX_DELAY_S = 86_400.0
MAX_LIFE_S = 366 * 86_400.0  # a ready node's injected death, at the least of rates
MIN_LOGNORMAL_MEDIAN_S = 0.001
#: A 429's Retry-After by default: the hold the service makes after a 429 without one
#: (service.CAPACITY_HOLD_MS), so a stack against the mock holds its creates as long as it did
#: before the header, now because the mock says so; a slot a DELETE frees (at once: a node
#: terminating is not counted) waits at most that long to be taken again.
RETRY_AFTER_S = 10


class DelaySpecError(ValueError):
    """A boot-delay specification that cannot be parsed."""


@dataclass(frozen=True)
class BootDelay:
    """A boot-delay distribution in seconds: `60`, `uniform:LOW:HIGH`, `lognormal:MEDIAN:P95` or
    `exp:MEAN`. Every number is at most a day (`--terminate-delay`'s bound), a lognormal's
    median at least a millisecond, and every draw within [0, a day]: `lognormal:1:1e308`
    overflowed a draw, which ended its boot task without a word and left the node booting
    for good, and `lognormal:1e-320:1` drew an infinite delay. Within those bounds a
    lognormal's sigma is at most 11.1, so no draw reaches a float's limit."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> BootDelay:
        parts = spec.strip().split(":")
        try:
            numbers = [float(p) for p in parts[1:]] if len(parts) > 1 else [float(parts[0])]
        except ValueError:
            raise DelaySpecError(f"{spec!r}: not a number") from None
        if any(not math.isfinite(n) or n < 0 for n in numbers):
            raise DelaySpecError(f"{spec!r}: delays must be finite and >= 0")
        if any(n > MAX_DELAY_S for n in numbers):
            raise DelaySpecError(f"{spec!r}: delays must be at most {MAX_DELAY_S:.0f} s (a day)")
        kind = parts[0] if len(parts) > 1 else "fixed"
        arity = {"fixed": 1, "uniform": 2, "lognormal": 2, "exp": 1}
        if kind not in arity:
            raise DelaySpecError(f"{spec!r}: unknown distribution {kind!r} "
                                 "(use N, uniform:LOW:HIGH, lognormal:MEDIAN:P95 or exp:MEAN)")
        if len(numbers) != arity[kind]:
            raise DelaySpecError(f"{spec!r}: {kind} takes {arity[kind]} number(s)")
        if kind == "uniform" and numbers[0] > numbers[1]:
            raise DelaySpecError(f"{spec!r}: LOW must be <= HIGH")
        if kind == "lognormal" and not MIN_LOGNORMAL_MEDIAN_S <= numbers[0] <= numbers[1]:
            raise DelaySpecError(f"{spec!r}: need {MIN_LOGNORMAL_MEDIAN_S} <= MEDIAN <= P95")
        return cls(kind, numbers[0], numbers[1] if len(numbers) > 1 else 0.0)

    def draw(self, rng: random.Random) -> float:
        return min(MAX_DELAY_S, self._draw(rng))

    def _draw(self, rng: random.Random) -> float:
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        if self.kind == "exp":
            return rng.expovariate(1 / self.a) if self.a > 0 else 0.0
        # lognormal: MEDIAN = e^mu, P95 = e^(mu + 1.645 sigma)
        sigma = math.log(self.b / self.a) / 1.6449
        return rng.lognormvariate(math.log(self.a), sigma)


@dataclass
class Faults:
    create_error_rate: float = 0.0
    delete_error_rate: float = 0.0
    latency_s: float = 0.0
    stuck_rate: float = 0.0
    death_rate_per_hour: float = 0.0
    #: a create's answer comes up to this long after its node exists (`latency_s` is all before
    #: it): a real API's answer slow on its way back, which a node's `booting`, and its `ready`
    #: where the boot is shorter, come before
    answer_latency_s: float = 0.0


@dataclass
class MockNode:
    id: str
    state: str  # booting | ready | terminating | terminated
    created_at: float
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    ended_at: float | None = None
    #: Held while one of its statuses goes out, so they go out in the order they were made: a
    #: node is found (listed, deleted) before its `booting` has gone out, and a DELETE with no
    #: terminate delay published `terminated` first.
    said: asyncio.Lock = field(default_factory=asyncio.Lock)

    def as_json(self) -> dict[str, object]:
        return {"id": self.id, "state": self.state, "created_at": self.created_at}


def _stream(seed: int | None, purpose: str) -> random.Random:
    """A generator of one kind of draw: from the seed and the kind if seeded (a str seeds
    through SHA-512, the same in every process), else from the OS."""
    return random.Random(None if seed is None else f"{seed}/{purpose}")


def host_option(value: str) -> str:
    """A typer callback: an address the server cannot be told to listen on is a bad option (a
    label over 63 characters stopped the mock with the resolver's UnicodeError, a traceback;
    an empty one listened on every interface, logged as `http://:PORT`)."""
    if not listenable(value):
        raise typer.BadParameter(f"{NOT_LISTENABLE})")
    return value


def _spawn(work: Coroutine[Any, Any, None], node_id: str) -> asyncio.Task[None]:
    """A node's boot or termination as a task whose failure is logged when it ends: a task that
    raised was kept in its node's list, so nothing ever said so, and the node stayed as it
    was."""
    task = asyncio.create_task(work)

    def said(done: asyncio.Task[None]) -> None:
        if not done.cancelled() and (exc := done.exception()) is not None:
            log.error("%s: its boot or termination failed, and the node stays as it was: %r",
                      node_id, exc)

    task.add_done_callback(said)
    return task


class MockNodeApi:
    def __init__(self, redis: aioredis.Redis, boot_delay: BootDelay, *,
                 terminate_delay_s: float = 1.0, max_nodes: int = 1000,
                 faults: Faults | None = None, seed: int | None = None,
                 retry_after_s: float = RETRY_AFTER_S,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if not 0 <= retry_after_s <= MAX_DELAY_S:  # nan too
            raise ValueError(f"retry_after_s must be from 0 to {MAX_DELAY_S:.0f} s, got "
                             f"{retry_after_s}")
        self.redis = redis
        #: A node's boot, life and termination wait on it; a test passes its own to see them.
        self.sleep = sleep
        self.boot_delay = boot_delay
        self.terminate_delay_s = terminate_delay_s
        self.max_nodes = max_nodes
        #: A 429's Retry-After: whole seconds, rounded up (RFC 9110's delay-seconds has no
        #: fraction, and a client reading it strictly ignores `2.5`); 0 sends none.
        self.retry_after_s = math.ceil(retry_after_s)
        self.faults = faults or Faults()
        #: One stream per kind of draw, each from the seed: with one stream for all, whether the
        #: k-th create failed hung on how many boots and deaths had been drawn before it came,
        #: so the same seed and calls gave other faults at another pace. `rng` draws latencies.
        self.rng = _stream(seed, "latency")
        self._create_rng = _stream(seed, "create")
        self._delete_rng = _stream(seed, "delete")
        self._stuck_rng = _stream(seed, "stuck")
        self._boot_rng = _stream(seed, "boot")
        self._death_rng = _stream(seed, "death")
        self.nodes: dict[str, MockNode] = {}
        #: Set by close(): a call in its injected latency is answered 503 at once. SIGTERM
        #: waited out the latency of the calls in flight (up to --latency, 600 s), which then
        #: created their nodes from a mock told to stop.
        self.stopping = asyncio.Event()
        # Not from the seed, which draws the delays and faults: a mock restarted with the same
        # seed would name its nodes again as before, and a pool keeps the ids it saw end as
        # tombstones (a day) and would ignore a new node under one of them.
        prefix = secrets.token_hex(3)
        self._ids = (f"node-{prefix}-{n}" for n in itertools.count(1))

    def live(self) -> list[MockNode]:
        return [n for n in self.nodes.values() if n.state in ("booting", "ready")]

    async def _publish(self, node: MockNode, status: str) -> bool:
        """Publish a status; False (and a log line) if it cannot be: the message is lost, as
        one can be in the real world, and the node stays as it is. Any failure, not only
        Redis's: one of the client's own kept a create's node while its POST answered 500,
        filling `--max-nodes` with nodes nobody was given (a review)."""
        try:
            async with node.said:
                await self.redis.publish("node:status", json.dumps({"node_id": node.id,
                                                                    "status": status}))
        except (OSError, RedisError) as exc:
            log.warning("%s: cannot publish %r: %s", node.id, status, exc)
            return False
        except Exception as exc:  # said, with its type; the caller handles the node
            log.error("%s: cannot publish %r: %r", node.id, status, exc)
            return False
        return True

    def _draw_latency(self, up_to_s: float) -> float:
        """An injected latency, up to `up_to_s` (a call's, or a create's answer's)."""
        return self.rng.uniform(0, up_to_s) if up_to_s > 0 else 0.0

    async def _latency(self, seconds: float) -> bool:
        """Wait an injected latency drawn by `_draw_latency`; whether the mock is stopping
        (then it ends early)."""
        if seconds > 0:
            return await sleep_unless(self.stopping, seconds)
        return self.stopping.is_set()

    @staticmethod
    def _stopping_answer(call: str) -> web.Response:
        log.info("%s: refused, the mock is stopping", call)
        return web.json_response({"error": "the mock is stopping"}, status=503)

    @staticmethod
    def _fails(rate: float, rng: random.Random) -> bool:
        return rate > 0 and rng.random() < rate

    def _forget_old(self) -> None:
        cutoff = time.time() - KEEP_TERMINATED_S
        for node_id in [n.id for n in self.nodes.values()
                        if n.ended_at is not None and n.ended_at < cutoff]:
            del self.nodes[node_id]

    def _find(self, node_id: str) -> MockNode | None:
        """The node, unless it is unknown or ended more than KEEP_TERMINATED_S ago: only a
        create or a list forgot them, so a late DELETE was answered 202 or 404, and a GET 200
        or 404, by whether another call had listed since."""
        self._forget_old()
        return self.nodes.get(node_id)

    # --- handlers -----------------------------------------------------------------------------

    async def create(self, _: web.Request) -> web.Response:
        # Every draw of a call at its arrival, in the order the calls come: drawn after its
        # latency, the k-th create's fault, boot and life were those of the k-th latency to
        # end, so the same seed and calls met other faults at another pace.
        latency_s = self._draw_latency(self.faults.latency_s)
        answer_s = self._draw_latency(self.faults.answer_latency_s)
        fails = self._fails(self.faults.create_error_rate, self._create_rng)
        stuck = self._fails(self.faults.stuck_rate, self._stuck_rng)
        boot_s = self.boot_delay.draw(self._boot_rng)
        per_second = self.faults.death_rate_per_hour / 3600
        # a rate of 5e-324 an hour is 0 a second: never dies
        life_s = (min(MAX_LIFE_S, self._death_rng.expovariate(per_second))
                  if per_second > 0 else None)
        if await self._latency(latency_s):
            return self._stopping_answer("create")
        self._forget_old()
        if fails:
            log.info("create: injected failure")
            return web.json_response({"error": "injected failure"}, status=500)
        if len(self.live()) >= self.max_nodes:
            headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s else None
            return web.json_response({"error": f"at most {self.max_nodes} nodes"}, status=429,
                                     headers=headers)
        node = MockNode(next(self._ids), "booting", time.time())
        # Kept before its `booting` is published: creates that come together count each other
        # against max_nodes, and whoever acts on the status (a DELETE, a list) finds the node.
        self.nodes[node.id] = node
        if not await self._publish(node, "booting"):
            if node.state == "booting":
                # Refused, and not kept: a node the caller was never given would be listed
                # forever.
                del self.nodes[node.id]
            return web.json_response({"error": "cannot publish node:status"}, status=503)
        # one deleted while its status went out ends; a mock stopping boots nothing more
        if not stuck and node.state == "booting" and not self.stopping.is_set():
            node.tasks.append(_spawn(self._boot(node, boot_s, life_s), node.id))
        log.info("create %s%s", node.id, " (will never become ready)" if stuck else "")
        # A mock stopping answers at once, and with the node: it exists, and is the caller's
        # all the same (a 503 would leave it to reconciliation).
        await self._latency(answer_s)
        return web.json_response({"id": node.id}, status=202)

    async def _boot(self, node: MockNode, boot_s: float, life_s: float | None) -> None:
        await self.sleep(boot_s)
        if node.state != "booting":
            return
        node.state = "ready"
        await self._publish(node, "ready")
        log.info("%s ready", node.id)
        if life_s is not None:
            await self.sleep(life_s)
            if node.state == "ready":
                log.info("%s dies (injected)", node.id)
                await self._end(node)

    async def _end(self, node: MockNode) -> None:
        node.state = "terminated"
        node.ended_at = time.time()
        await self._publish(node, "terminated")

    async def delete(self, request: web.Request) -> web.Response:
        latency_s = self._draw_latency(self.faults.latency_s)  # at its arrival, as a create's
        fails = self._fails(self.faults.delete_error_rate, self._delete_rng)
        if await self._latency(latency_s):
            return self._stopping_answer("delete")
        node = self._find(request.match_info["node_id"])
        if node is None:
            return web.json_response({"error": "no such node"}, status=404)
        if fails:
            log.info("delete %s: injected failure", node.id)
            return web.json_response({"error": "injected failure"}, status=500)
        if node.state in ("booting", "ready"):
            for task in node.tasks:
                task.cancel()
            node.state = "terminating"
            node.tasks = [_spawn(self._terminate(node), node.id)]
            log.info("delete %s", node.id)
        return web.json_response({"id": node.id}, status=202)

    async def _terminate(self, node: MockNode) -> None:
        await self.sleep(self.terminate_delay_s)
        await self._end(node)

    async def list_nodes(self, _: web.Request) -> web.Response:
        self._forget_old()
        return web.json_response({"nodes": [n.as_json() for n in self.nodes.values()]})

    async def get_node(self, request: web.Request) -> web.Response:
        node = self._find(request.match_info["node_id"])
        if node is None:
            return web.json_response({"error": "no such node"}, status=404)
        return web.json_response(node.as_json())

    async def healthz(self, _: web.Request) -> web.Response:
        # The pid: a stack that started this process on a port another took first tells the
        # two apart by it (devstack.wait_http).
        return web.json_response({"ok": True, "nodes": len(self.live()), "pid": os.getpid()})

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_log_refused])
        app.router.add_post("/api/nodes", self.create)
        app.router.add_get("/api/nodes", self.list_nodes)
        app.router.add_get("/api/nodes/{node_id}", self.get_node)
        app.router.add_delete("/api/nodes/{node_id}", self.delete)
        app.router.add_get("/healthz", self.healthz)
        return app

    async def close(self) -> None:
        self.stopping.set()
        for node in self.nodes.values():
            for task in node.tasks:
                task.cancel()


@web.middleware
async def _log_refused(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Logs each call answered 4xx, with what it was told, the access log being off: a client
    calling the mock wrong (a path it does not serve, a node it never made) is seen. Its 5xx
    answers, the faults it injects, say so where they are made. The path as it was sent, still
    percent-encoded: decoded, a %0A in it began a line of the client's own in the text log."""
    path = request.rel_url.raw_path
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # the router's: no such path (404), method (405)
        if 400 <= exc.status < 500:
            log.info("%s %s: %d %s", request.method, path, exc.status, exc.reason)
        raise
    if 400 <= response.status < 500:
        said = response.text if isinstance(response, web.Response) else None
        log.info("%s %s: %d %s", request.method, path, response.status,
                 _error_of(said) or response.reason)
    return response


def _error_of(body: str | None) -> str | None:
    """The `error` of a JSON answer's body, or None."""
    try:
        error = json.loads(body or "").get("error")
    except (ValueError, AttributeError):
        return None
    return error if isinstance(error, str) else None


async def serve(api: MockNodeApi, host: str, port: int) -> None:
    # A call in flight is waited for a few seconds at most (its publish has the client's 5 s
    # timeout; its injected latency ends when close() is called), not aiohttp's 60.
    runner = web.AppRunner(api.app(), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()  # a port taken: nothing left set up
        await api.redis.aclose()
        raise
    # a URL a client takes: an IPv6 address in brackets
    log.info("mock Node API on http://%s:%d", f"[{host}]" if ":" in host else host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await api.close()
        await runner.cleanup()
        await api.redis.aclose()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _rate(value: float) -> float:
    if not 0 <= value <= 1:
        raise typer.BadParameter("must be between 0 and 1")
    return value


def boot_delay_option(value: str) -> str:
    """A typer callback: a --boot-delay BootDelay cannot parse is a bad option (`dev` checks it
    before starting anything: the mock it starts found it 16 s later, in its log)."""
    try:
        BootDelay.parse(value)
    except DelaySpecError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def command(
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port.",
                                      envvar="MOCK_NODE_API_PORT")] = 8080,
    host: Annotated[str, typer.Option(callback=host_option,
                                      help="Address to bind.")] = "127.0.0.1",
    redis_url: Annotated[str, typer.Option(envvar="PROVISIONER_REDIS_URL",
                                           callback=redis_url_option,
                                           help="Where node:status is published.")]
    = "redis://127.0.0.1:6379/0",
    boot_delay: Annotated[str, typer.Option(
        callback=boot_delay_option,
        # not uniform:A:B: Rich's help reads ":A:" as an emoji's name, and showed 🅰
        help="Boot delay in seconds: N, uniform:LOW:HIGH, lognormal:MEDIAN:P95 or exp:MEAN.")]
    = "60",
    terminate_delay: Annotated[float, typer.Option(
        min=0, max=86_400, help="Seconds from DELETE to `terminated`.")] = 1.0,
    max_nodes: Annotated[int, typer.Option(min=1, max=1_000_000,
                                           help="Creates beyond this answer 429.")]
    = 1000,
    retry_after: Annotated[float, typer.Option(
        min=0, max=86_400, metavar="SECONDS",
        help="Retry-After of a 429, in whole seconds (rounded up); 0 sends none. The "
             "default is the hold the service makes after a 429 without one, so a stack "
             "holds its creates as long as before.")]
    = RETRY_AFTER_S,
    create_error_rate: Annotated[float, typer.Option(
        callback=_rate, help="Share of creates answering 500, 0 to 1.")] = 0.0,
    delete_error_rate: Annotated[float, typer.Option(
        callback=_rate, help="Share of deletes answering 500, 0 to 1.")] = 0.0,
    latency: Annotated[float, typer.Option(
        min=0, max=600, help="Added latency per create or delete, up to N s (a list answers "
                             "at once).")]
    = 0.0,
    answer_latency: Annotated[float, typer.Option(
        min=0, max=600, help="Added latency of a create's answer after its node exists, up "
                             "to N s: its booting, and its ready too where the boot is "
                             "shorter, may come first.")] = 0.0,
    stuck_rate: Annotated[float, typer.Option(
        callback=_rate, help="Share of boots that never become ready, 0 to 1.")] = 0.0,
    death_rate: Annotated[float, typer.Option(
        min=0, max=3600, help="Ready/allocated nodes die at this rate per node-hour.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Seed for delays and faults.")] = None,
) -> None:
    """Serve the mock Node Management API and publish node:status."""
    delay = BootDelay.parse(boot_delay)  # boot_delay_option has checked it
    # the service's logging: a malformed request is one throttled warning line, not aiohttp's
    # traceback at ERROR for each (a review sent a 20,000-character URL and a 20 kB header)
    setup_logging()
    faults = Faults(create_error_rate, delete_error_rate, latency, stuck_rate, death_rate,
                    answer_latency)

    async def main() -> None:
        redis = redis_client(redis_url)
        api = MockNodeApi(redis, delay, terminate_delay_s=terminate_delay, max_nodes=max_nodes,
                          faults=faults, seed=seed, retry_after_s=retry_after)
        await serve(api, host, port)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
