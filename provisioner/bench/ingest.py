"""How many `user:activity` messages a second one replica applies, through its live listener.

The tick's cost (`tickcost.py`) says what the server does per decision; this says how fast the
event path keeps up. A replica subscribes as it does in production (`Replica.listen`); a second
client publishes `messages` activity messages of `users` users, one per user-second within the
activity window (so every message is new and counted once), in pipelined batches, much faster
than they are applied; the clock stops when the pool's `activities` counter reaches them all.

Every replica applies every message (README, "How replicas cooperate"), so this is the rate
the whole service keeps up with, whatever the number of replicas. Above it, messages queue in
the server's buffer for the subscriber until its output-buffer limit disconnects it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis

from provisioner.config import PoolConfig, ServiceConfig
from provisioner.keys import PoolKeys
from provisioner.nodeapi import CreateOutcome, CreateResult, DeleteOutcome, ListedNode
from provisioner.redis_server import server_label
from provisioner.service import Replica

PUBLISH_BATCH = 500


@dataclass(frozen=True)
class IngestRate:
    messages: int
    users: int
    seconds: float  # from the first publish until the last message was applied
    active: int  # users the pool then held as browsing (`active`): all of them, if applied
    server: str  # name and version, e.g. "valkey 8.1.8"

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


class _NoNodeApi:
    """The listener never calls the Node API (no tick runs); a call would fail, not hang."""

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


async def measure(redis_url: str, messages: int, users: int, *,
                  timeout_s: float = 300.0) -> IngestRate:
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
    redis = aioredis.Redis.from_url(redis_url)
    publisher = aioredis.Redis.from_url(redis_url)
    replica = Replica(redis, service, pool, _NoNodeApi(), gauges=False)
    listening = asyncio.create_task(replica.listen())
    try:
        await asyncio.wait_for(replica.subscribed.wait(), 10)
        payloads = activity_messages(messages, users, int(time.time()))
        about = await publisher.info("server")
        server = server_label(about)
        started = time.perf_counter()
        for first in range(0, messages, PUBLISH_BATCH):
            async with publisher.pipeline(transaction=False) as pipe:
                for payload in payloads[first:first + PUBLISH_BATCH]:
                    pipe.publish("user:activity", payload)
                await pipe.execute()
        deadline = started + timeout_s
        while True:
            applied = int(await publisher.hget(keys.key("stats"), "activities") or 0)
            if applied >= messages:
                break
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{applied} of {messages} messages applied in {timeout_s} s")
            await asyncio.sleep(0.01)
        seconds = time.perf_counter() - started
        active = int(await publisher.zcard(keys.key("active")))
        return IngestRate(messages, users, seconds, active, server)
    finally:
        replica.stopping.set()
        await listening
        async for key in publisher.scan_iter(match=keys.pattern(), count=1000):
            await publisher.unlink(key)
        await redis.aclose()
        await publisher.aclose()


def run(redis_url: str, messages: int, users: int) -> IngestRate:
    return asyncio.run(measure(redis_url, messages, users))
