"""Helpers shared by the tests: a pool bound to a private server and a manual clock."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis.asyncio as aioredis

from provisioner import devstack
from provisioner.clock import ManualClock
from provisioner.config import PoolConfig
from provisioner.keys import PoolKeys
from provisioner.redis_server import free_port
from provisioner.scripts import Scripts, Snapshot

T0 = 1_767_225_600_000
# The paths whose answer names the process that answered (its "pid").
PID_ANSWERING = ("/healthz", "/readyz")


@dataclass
class PoolUnderTest:
    redis: aioredis.Redis
    keys: PoolKeys
    scripts: Scripts
    clock: ManualClock
    config: PoolConfig = field(default_factory=PoolConfig)

    @property
    def now(self) -> int:
        return self.clock.now_ms()

    async def snap(self) -> Snapshot:
        return await self.scripts.snapshot(self.now, self.config.window_ms)

    async def node(self, node_id: str) -> dict[str, str]:
        data: dict[str, str] = await self.redis.hgetall(self.keys.node(node_id))
        return data

    async def ready_list(self) -> list[str]:
        items: list[str] = await self.redis.lrange(self.keys.key("ready"), 0, -1)
        return items

    async def waiting_list(self) -> list[str]:
        items: list[str] = await self.redis.zrange(self.keys.key("waiting"), 0, -1)
        return items

    async def alloc(self) -> dict[str, str]:
        data: dict[str, str] = await self.redis.hgetall(self.keys.key("alloc"))
        return data

    async def boot(self, node_id: str) -> None:
        """A node the pool created and saw become ready."""
        await self.scripts.apply_node_status(self.now, node_id, "booting")
        await self.scripts.apply_node_status(self.now, node_id, "ready")

    async def dump(self) -> dict[str, Any]:
        """Every key of the pool with its value, to compare whole states."""
        return await dump_pool(self.redis, self.keys)


async def dump_pool(redis: aioredis.Redis, keys: PoolKeys) -> dict[str, Any]:
    """Every key of a pool, named without the pool (so two pools' states compare), with its
    value (a stream by its length)."""
    out: dict[str, Any] = {}
    async for key in redis.scan_iter(match=keys.pattern()):
        name = key.removeprefix(keys.base)
        kind = await redis.type(key)
        if kind == "hash":
            out[name] = await redis.hgetall(key)
        elif kind == "list":
            out[name] = await redis.lrange(key, 0, -1)
        elif kind == "zset":
            out[name] = await redis.zrange(key, 0, -1, withscores=True)
        elif kind == "string":
            out[name] = await redis.get(key)
        elif kind == "stream":
            out[name] = len(await redis.xrange(key))
    return out


class Subscriber:
    """Collects what is published on some channels."""

    def __init__(self, redis: aioredis.Redis, *channels: str) -> None:
        self.pubsub = redis.pubsub()
        self.channels = channels
        self.messages: list[tuple[str, dict[str, Any]]] = []

    async def __aenter__(self) -> Subscriber:
        await self.pubsub.subscribe(*self.channels)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pubsub.unsubscribe()
        await self.pubsub.aclose()

    async def drain(self, settle: float = 0.1) -> list[tuple[str, dict[str, Any]]]:
        """Everything published until `settle` seconds pass with nothing new."""
        loop = asyncio.get_running_loop()
        quiet_until = loop.time() + settle
        while loop.time() < quiet_until:
            message = await self.pubsub.get_message(ignore_subscribe_messages=True,
                                                    timeout=settle / 4)
            if message is not None:
                self.messages.append((message["channel"], json.loads(message["data"])))
                quiet_until = loop.time() + settle
        return self.messages

    async def wait_for(self, predicate: Any, within: float = 10.0) -> tuple[str, dict[str, Any]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        for item in self.messages:
            if predicate(*item):
                return item
        while loop.time() < deadline:
            message = await self.pubsub.get_message(ignore_subscribe_messages=True,
                                                    timeout=0.2)
            if message is None:
                continue
            item = (message["channel"], json.loads(message["data"]))
            self.messages.append(item)
            if predicate(*item):
                return item
        raise TimeoutError(f"no matching message among {self.messages}")


async def heard_ago(redis: aioredis.Redis, keys: PoolKeys, replica: str, ms: int) -> None:
    """Set a replica's last heartbeat `ms` before the server's now: heartbeats are stamped by
    the server's clock (lua/heartbeat.lua), which a test cannot move."""
    seconds, micros = await redis.time()
    await redis.zadd(keys.key("replicas"), {replica: seconds * 1000 + micros // 1000 - ms})


def run_delay_proxy(host: str, port: int, delay_s: float) -> None:
    """A TCP proxy to host:port, run in a process of its own (`python -c`) so that it goes on
    while a test blocks its own event loop: a connection that has sent SUBSCRIBE gets the
    server's bytes `delay_s` late (a listener that far behind the stream), others at once.
    Prints its port, then serves until killed."""

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(host, port)
        subscribed = False

        async def up() -> None:
            nonlocal subscribed
            while data := await client_r.read(65536):
                subscribed = subscribed or b"SUBSCRIBE" in data.upper()
                server_w.write(data)
                await server_w.drain()

        async def down() -> None:
            line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

            async def take() -> None:
                while data := await server_r.read(65536):
                    line.put_nowait((time.monotonic() + (delay_s if subscribed else 0), data))

            taking = asyncio.create_task(take())
            try:
                while True:
                    due, data = await line.get()
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                    client_w.write(data)
                    await client_w.drain()
            finally:
                taking.cancel()

        with contextlib.suppress(Exception):
            await asyncio.gather(up(), down())
        client_w.close()
        server_w.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(serve())


def wait_http(url: str, timeout: float = 20.0,
              process: subprocess.Popen[Any] | None = None) -> bool:
    """Whether `url` answered 200 within `timeout`, as `process` (devstack.wait_http: the pid
    in the answer, where the answer names one); False at once if `process` exited first."""
    pid = process.pid if process is not None and url.endswith(PID_ANSWERING) else None
    alive = (lambda: process.poll() is None) if process is not None else None
    if devstack.wait_http(url, timeout, pid=pid, alive=alive):
        return True
    if alive is not None and not alive():
        return False
    raise TimeoutError(f"{url} never answered 200")


def listening(command: Callable[[int], list[str]], path: str,
              **popen: Any) -> tuple[subprocess.Popen[Any], int]:
    """A process started with `command(port)` (and `popen`'s arguments) on a free port, once
    `path` answers 200 there. A free port is free when asked for, not when the process binds
    it: under `make test`'s two workers the other's processes take ports too, so one that
    exits first (its port taken) is started again on another; one that never answers is
    killed."""
    for _attempt in range(3):
        port = free_port()
        process = subprocess.Popen(command(port), **popen)
        try:
            if wait_http(f"http://127.0.0.1:{port}{path}", process=process):
                return process, port
        except TimeoutError:
            process.kill()
            process.wait()
            raise
        process.communicate()  # exited: its pipes, if any, closed
    raise RuntimeError(f"{command(0)} exited before answering, 3 times")


async def answering(start: Callable[[int], Awaitable[Any]], path: str,
                    host: str = "127.0.0.1") -> tuple[asyncio.Task[Any], int, httpx.Response]:
    """`start(port)` run as a task on a free port, once `path` answers there (any status):
    the task, the port and that first answer. As `listening` for a process: one that ends
    with an OSError first (its port taken meanwhile by another worker's process) is started
    again on another port; any other end, or no answer within 10 s, fails the test."""
    where = f"[{host}]" if ":" in host else host
    for _attempt in range(3):
        port = free_port()
        task = asyncio.ensure_future(start(port))
        deadline = time.monotonic() + 10
        async with httpx.AsyncClient() as client:
            while not task.done():
                try:
                    return task, port, await client.get(f"http://{where}:{port}{path}")
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        task.cancel()
                        raise TimeoutError(f"nothing answered {path} on port {port}") from None
                    await asyncio.sleep(0.02)
        if not isinstance(task.exception(), OSError):
            task.result()  # raises what ended it; a clean end before answering:
            raise RuntimeError(f"it ended before answering {path} on port {port}")
    raise RuntimeError(f"it could not listen on a free port 3 times: {task.exception()}")
