"""`bench cut`: one replica cut off from the server, alone, while a user reconnects.

A partition between one replica and the server holds the bytes both ways (TCP resends them once
the path heals), while the other replicas apply the events published meanwhile. The cut
replica's subscription outlives such a cut and brings those messages late; its late copies of a
user's disconnect and connect would end the session she began since and hand her another node.
The suite's tests hold it at small scale; this runs the drill the README's figures come from:
a private server, the mock Node API, two replicas (the last reaching the server through a hop
this process runs, which holds every byte both ways while cut) and the simulator's users. Each
round a user connects and is served; the hop is cut; she disconnects and connects again, which
the other replica applies (her *node since*); after CUT seconds the hop heals, and SETTLE
seconds later she holds that node (*kept*), none (*ended*: a late disconnect ended her
session), or another (*moved*: a late disconnect and connect). Each round's user disconnects
before the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis.asyncio as aioredis

from provisioner import view
from provisioner.bench.loop import (
    StackRun,
    _Heard,
    _raise_if_cancelled,
    _until,
    all_started,
    exited_during,
    quiet_connect_race,
    tracebacks,
)
from provisioner.bench.pause import _gaps, _rise, _until_gone, warmed
from provisioner.devstack import Stack, stack
from provisioner.keys import PoolKeys
from provisioner.redis_server import server_label, start_server

#: The replica behind the hop.
CUT_REPLICA = "replica-2"
OUTCOMES = ("kept", "ended", "moved")


class Hop:
    """A TCP hop to `host:port`, run on a loop of its own in a thread. While cut it forwards
    nothing either way and holds what comes, in order, as a partition holds what TCP resends;
    healed, it forwards what it held, then the rest. New connections are taken while cut, and
    their bytes held too."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hop", daemon=True)
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.Server | None = None

    def start(self) -> int:
        """Start it; the port it listens on (127.0.0.1)."""
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    async def _start(self) -> int:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def cut(self) -> None:
        assert self._flowing is not None
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def heal(self) -> None:
        assert self._flowing is not None
        self._loop.call_soon_threadsafe(self._flowing.set)

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.close()
            return

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            assert self._flowing is not None
            with contextlib.suppress(Exception):
                while data := await source.read(65536):
                    await self._flowing.wait()
                    sink.write(data)
                    await sink.drain()

        pumps = [asyncio.create_task(pump(reader, up_writer)),
                 asyncio.create_task(pump(up_reader, writer))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.sleep(0.2)  # what the other way still carries
        finally:
            for task in pumps:
                task.cancel()
            up_writer.close()
            writer.close()


@dataclass
class CutRound:
    """One cut: where the round's user was at the end, against the node she had since."""

    user: str
    cut_s: float  # how long the hop held everything, as this process timed it
    node_before: str = ""  # hers before the cut
    node_since: str = ""  # hers after her reconnect in the cut, as the other replica applied it
    node_after: str = ""  # hers at the end ('' for none)
    outcome: str = ""  # kept, ended or moved
    allocated_heard: int = 0  # user:allocated heard for her from her reconnect on
    # each replica's gaps counted over the round, by verdict ({}: no such counter)
    gaps: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class CutResult(StackRun):
    server: str
    replicas: int
    cut_s: float  # asked for
    settle_s: float
    rounds: list[CutRound] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        """A session a late copy ended or moved, and what is wrong whatever the figures."""
        harmed = [f"round {n}: {r.user}'s session {r.outcome} (her node since the reconnect "
                  f"{r.node_since}, at the end {r.node_after or 'none'})"
                  for n, r in enumerate(self.rounds, 1) if r.outcome != "kept"]
        return [*harmed, *self.broken()]

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "failed": self.failed}


def outcome(since: str, after: str) -> str:
    """What became of a session begun on node `since`, held on `after` at the end."""
    return "kept" if after == since else "ended" if not after else "moved"


def run(cut: float = 20.0, settle: float = 15.0, rounds: int = 1,
        boot_delay: str = "lognormal:20:45", arrival_rate: float = 20.0, seed: int = 1,
        mock: tuple[str, ...] | list[str] = (), replicas_from: Path | None = None,
        say: Callable[[str], None] = print) -> CutResult:
    """Start a private server, a hop to it, and the stack on it with replica-2 behind the hop;
    once the pool has a ready node, `rounds` times: a user served, the hop cut, her reconnect
    applied by replica-1, the hop healed after `cut` seconds, and `settle` seconds later what
    she holds. Then the invariants and the logs, and everything stopped."""
    source = replicas_from.resolve() if replicas_from is not None else None
    server = start_server()
    hop = Hop("127.0.0.1", server.port)
    try:
        port = hop.start()
        say(f"private server {server.binary} on {server.url}; {CUT_REPLICA} reaches it through "
            f"a hop on 127.0.0.1:{port}")
        via = {CUT_REPLICA: {"PROVISIONER_REDIS_URL": f"redis://127.0.0.1:{port}/0"}}
        with stack(server.url, 2, boot_delay, arrival_rate, ["--seed", str(seed)], say=say,
                   mock=list(mock), replicas_from=source, replica_env=via) as running:
            all_started(running)
            result = asyncio.run(_drive(running, hop, cut, settle, rounds, say))
            result.exited = exited_during(running)
    finally:
        hop.stop()
        server.stop()
    result.replicas_from = str(replicas_from or "")
    result.tracebacks = tracebacks(running)
    return result


async def _drive(running: Stack, hop: Hop, cut: float, settle: float, rounds: int,
                 say: Callable[[str], None]) -> CutResult:
    client = aioredis.Redis.from_url(running.redis_url, decode_responses=True)
    keys = PoolKeys(running.pool)
    alloc = keys.key("alloc")
    result = CutResult(server=server_label(await client.info("server")), replicas=2, cut_s=cut,
                       settle_s=settle, logdir=str(running.logdir))
    asyncio.get_running_loop().set_exception_handler(quiet_connect_race)
    users = [f"cut-{n}" for n in range(1, rounds + 1)]
    heard = _Heard(client, set(users))
    healed = True
    try:
        await heard.start()
        await warmed(running, client, keys, 2, say)

        async def publish(channel: str, user: str) -> None:
            await client.publish(channel, json.dumps({"user_id": user}))

        async def node_of(user: str) -> str:
            node = ""

            async def held() -> bool:
                nonlocal node
                node = str(await client.hget(alloc, user) or "")
                return bool(node)

            await _until(held, f"a node for {user}")
            return node

        for user in users:
            gaps_before = await asyncio.to_thread(_gaps, running.metrics_ports)
            await publish("user:connect", user)
            this = CutRound(user, cut_s=0.0, node_before=await node_of(user))
            hop.cut()
            healed, began = False, time.monotonic()
            say(f"{user} holds {this.node_before}; {CUT_REPLICA} cut off")
            await asyncio.sleep(1.0)
            heard.reset()
            await publish("user:disconnect", user)
            # replica-1 applied it: her node went back to the pool
            await _until(functools.partial(_free, client, alloc, user), f"{user}'s disconnect")
            await publish("user:connect", user)
            this.node_since = await node_of(user)
            say(f"{user} disconnected and connected again in the cut, given {this.node_since}")
            await asyncio.sleep(max(0.0, began + cut - time.monotonic()))
            hop.heal()
            healed, this.cut_s = True, time.monotonic() - began
            say(f"healed after {this.cut_s:.1f} s; following the pool {settle:g} s")
            await asyncio.sleep(settle)
            _raise_if_cancelled()
            this.node_after = str(await client.hget(alloc, user) or "")
            this.outcome = outcome(this.node_since, this.node_after)
            this.allocated_heard = heard.allocated[user]
            this.gaps = _rise(await asyncio.to_thread(_gaps, running.metrics_ports),
                              gaps_before)
            result.rounds.append(this)
            say(f"{user}: {this.outcome} (since {this.node_since}, at the end "
                f"{this.node_after or 'none'}; user:allocated heard {this.allocated_heard})")
            await publish("user:disconnect", user)
            await _until_gone(client, keys, [user])
        result.problems = await view.check_invariants(client, running.pool)
    finally:
        if not healed:
            hop.heal()
        await heard.stop()
        await client.aclose()
    return result


async def _free(client: aioredis.Redis, alloc: str, user: str) -> bool:
    return not await client.hget(alloc, user)
