"""How many `user:activity` messages a second the service applies, through its live listeners.

The tick's cost (`tickcost.py`) says what the server does per decision; this says how fast the
event path keeps up. `replicas` replicas subscribe as they do in production (`Replica.listen`),
each on its own connection; a further client publishes `messages` activity messages of `users`
users, one per user-second within the activity window (so every message is new and counted
once), in pipelined batches, much faster than they are applied. Every replica applies every
message (README, "How replicas cooperate"): the first copy to arrive counts in the pool's
`activities` counter, every later one in `activity_duplicates`, and the clock stops when the two
add up to `messages` times `replicas`, so the slowest replica sets the rate. Above that rate,
messages queue in the server's buffer for a subscriber until its output-buffer limit
disconnects it.

The server's own CPU time over the run (`INFO cpu`, user + system) says what each message
costs it, all copies together: run with 1 and then 2 replicas, the difference is one duplicate's
cost. `INFO commandstats` says how many script calls applied them and how long each held the
server on average (a run of activity goes in one call, up to the listener's ACTIVITY_BATCH).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import redis.asyncio as aioredis

from provisioner.config import PoolConfig, ServiceConfig
from provisioner.keys import PoolKeys
from provisioner.nodeapi import CreateOutcome, CreateResult, DeleteOutcome, ListedNode
from provisioner.redis_server import script_calls, server_label
from provisioner.scripts import clear_pool
from provisioner.service import Replica

PUBLISH_BATCH = 500


@dataclass(frozen=True)
class IngestRate:
    messages: int
    users: int
    replicas: int
    seconds: float  # from the first publish until every replica applied the last message
    active: int  # users the pool then held as browsing (`active`): all of them, if applied
    duplicates: int  # copies found already applied (`activity_duplicates`)
    server: str  # name and version, e.g. "valkey 8.1.8"
    server_cpu_s: float  # the server's CPU time (user + system) over the run
    script_calls: int = 0  # EVALSHA calls the server ran over the run (INFO commandstats)
    script_s: float = 0.0  # the server's time in them

    @property
    def ms_per_script_call(self) -> float:
        """How long one script call held the server, on average."""
        return self.script_s / self.script_calls * 1e3 if self.script_calls else 0.0

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def server_us_per_message(self) -> float:
        """The server's CPU per message, every replica's copy and the publish included."""
        return self.server_cpu_s / self.messages * 1e6


class _NoNodeApi:
    """The listener never calls the Node API (no tick runs); a call would fail, not hang."""

    has_no_list = True  # no list to take nodes back from

    async def create(self) -> CreateResult:
        return CreateResult(CreateOutcome.FAILED, detail="the ingest benchmark creates nothing")

    async def delete(self, node_id: str) -> DeleteOutcome:
        return DeleteOutcome.FAILED

    async def list_nodes(self) -> list[ListedNode] | None:
        return None

    async def aclose(self) -> None:
        return None


def activity_messages(messages: int, users: int, now_s: int) -> list[str]:
    """`messages` activity payloads: user k % users at second now - k // users, so each is a
    distinct user-second."""
    return [json.dumps({"user_id": f"ingest-{k % users}", "timestamp": now_s - k // users})
            for k in range(messages)]


def _cpu_s(info: dict[str, Any]) -> float:
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def measure(redis_url: str, messages: int, users: int, *, replicas: int = 1,
                  timeout_s: float = 300.0) -> IngestRate:
    if replicas < 1:
        raise ValueError("replicas must be at least 1")
    pool = PoolConfig()
    span_s = -(-messages // users)  # seconds of history each user gets
    if span_s > pool.activity_window_s / 2:
        raise ValueError(f"{messages} messages of {users} users span {span_s} s per user: at "
                         f"most {pool.activity_window_s / 2:.0f} s (half the activity window, so "
                         "the oldest are still inside it when they are applied)")
    service = ServiceConfig(redis_url=redis_url, node_api_url="http://unused",
                            pool=f"ingest-{uuid.uuid4().hex[:8]}", http_port=0,
                            replica_id="ingest")
    keys = PoolKeys(service.pool)
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(replicas)]
    publisher = aioredis.Redis.from_url(redis_url)
    group = [Replica(client, replace(service, replica_id=f"ingest-{i}"), pool, _NoNodeApi(),
                     gauges=False) for i, client in enumerate(clients)]
    listening = [asyncio.create_task(replica.listen()) for replica in group]
    try:
        for replica in group:
            await asyncio.wait_for(replica.subscribed.wait(), 10)
        payloads = activity_messages(messages, users, int(time.time()))
        server = server_label(await publisher.info("server"))
        cpu_before = _cpu_s(await publisher.info("cpu"))
        calls_before, script_s_before = script_calls(await publisher.info("commandstats"))
        started = time.perf_counter()
        for first in range(0, messages, PUBLISH_BATCH):
            async with publisher.pipeline(transaction=False) as pipe:
                for payload in payloads[first:first + PUBLISH_BATCH]:
                    pipe.publish("user:activity", payload)
                await pipe.execute()
        deadline = started + timeout_s
        copies = messages * replicas
        while True:
            applied, duplicates = (int(v or 0) for v in await publisher.hmget(
                keys.key("stats"), ["activities", "activity_duplicates"]))
            if applied + duplicates >= copies:
                break
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{applied + duplicates} of {copies} copies of the messages "
                                   f"applied in {timeout_s} s")
            await asyncio.sleep(0.01)
        seconds = time.perf_counter() - started
        cpu_s = _cpu_s(await publisher.info("cpu")) - cpu_before
        calls, script_s = script_calls(await publisher.info("commandstats"))
        active = int(await publisher.zcard(keys.key("active")))
        # users with a message: fewer than asked when there are fewer messages than users
        return IngestRate(messages, min(users, messages), replicas, seconds, active, duplicates,
                          server, cpu_s, calls - calls_before, script_s - script_s_before)
    finally:
        for replica in group:
            replica.stopping.set()
        await asyncio.gather(*listening)
        await clear_pool(publisher, keys)
        for client in clients:
            await client.aclose()
        await publisher.aclose()


def run(redis_url: str, messages: int, users: int, replicas: int = 1) -> IngestRate:
    return asyncio.run(measure(redis_url, messages, users, replicas=replicas))
