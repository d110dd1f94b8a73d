"""What a waiting user's disconnect and a miss cost the server as the waiting queue grows.

Loads N users into the waiting queue (the queue and `waiting_since` as allocate leaves them,
written in bulk, of the type the scripts keep it as), then times, by the server's own account
(`INFO commandstats`: microseconds of script time a call, no round trip), `calls` disconnects
of waiting users taken from the middle of the queue (release.lua: out of the queue) and `calls`
misses (allocate.lua: a new user joins its back). The queue is a sorted set by place in line
(lua/includes/pool.lua enqueue_waiting), so both should stay flat as N grows; a list's LREM
read the whole queue. The counters are the server's, every client's: on a server others use
(`--redis-url`), their scripts count too.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import redis.asyncio as aioredis

from provisioner.keys import PoolKeys
from provisioner.redis_server import script_calls, server_label
from provisioner.scripts import Allocation, Release, Scripts, clear_pool

T0 = 1_767_225_600_000


@dataclass(frozen=True)
class QueueCost:
    waiting: int
    disconnect_us: float  # server time of one waiting user's release.lua
    miss_us: float  # server time of one allocate.lua that joins the queue
    server: str
    disconnect_calls: int  # the script calls the server counted for each, as timed
    miss_calls: int


async def measure(redis_url: str, waiting: int, *, calls: int = 200,
                  pool_name: str = "queuecost") -> QueueCost:
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    keys = PoolKeys(pool_name)
    scripts = Scripts(redis, keys)
    try:
        await clear_pool(redis, keys)
        users = [f"waiting-{k:08d}" for k in range(waiting)]
        await scripts.allocate(T0, users[0])  # the queue, of the type these scripts keep it as
        queue = keys.key("waiting")
        as_list = await redis.type(queue) == "list"  # (releases up to 1f26912, compared)
        for first in range(1, waiting, 10_000):
            chunk = users[first:first + 10_000]
            async with redis.pipeline(transaction=False) as pipe:
                if as_list:
                    pipe.rpush(queue, *chunk)
                else:
                    # users[i] at place i + 1, one past users[0], whom allocate placed at 1
                    # (at 0 in the releases before fc311d0): no two share a place
                    pipe.zadd(queue, {u: first + k + 1 for k, u in enumerate(chunk)})
                pipe.hset(keys.key("waiting_since"), mapping=dict.fromkeys(chunk, T0))
                await pipe.execute()
        loaded = await (redis.llen(queue) if as_list else redis.zcard(queue))
        if loaded != waiting:
            raise RuntimeError("the queue was not loaded as meant")
        leaving = [users[(waiting // 2 + k) % waiting] for k in range(min(calls, waiting))]
        # Each script loaded before the timing: a first EVALSHA fails NOSCRIPT and would count.
        await scripts.release(T0, "nobody")
        before = script_calls(await redis.info("commandstats"))
        for user in leaving:
            if (await scripts.release(T0, user)).code is not Release.ABANDONED:
                raise RuntimeError(f"{user} was not waiting: the queue was not loaded as meant")
        after = script_calls(await redis.info("commandstats"))
        for k in range(calls):
            if (await scripts.allocate(T0, f"new-{k}")).code is not Allocation.WAITING:
                raise RuntimeError("a connect found a node: the pool was not empty")
        last = script_calls(await redis.info("commandstats"))
        server = server_label(await redis.info("server"))

        def per_call(a: tuple[int, float], b: tuple[int, float]) -> float:  # µs
            return (b[1] - a[1]) * 1e6 / max(1, b[0] - a[0])

        return QueueCost(waiting, per_call(before, after), per_call(after, last), server,
                         after[0] - before[0], last[0] - after[0])
    finally:
        await clear_pool(redis, keys)
        await redis.aclose()


def run(redis_url: str, sizes: list[int], calls: int = 200) -> list[QueueCost]:
    return [asyncio.run(measure(redis_url, n, calls=calls)) for n in sizes]
