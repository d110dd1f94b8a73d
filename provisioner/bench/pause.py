"""`bench pause`: the server stopped (SIGSTOP) while the replicas apply a batch of connects.

A server that stops answering for a while (a GC-less but frozen VM, a container paused, a
`SIGSTOP`, a failover's seconds) stops every replica alike. What the replicas were applying as
it stopped is held until it answers; past 10 s the replica asks the server whether any replica
was served meanwhile (lua/judge_gap.lua): none, and the batch is applied late; some, and this
replica was cut off alone, and drops it. The suite's tests hold each verdict at small scale;
this runs the drill the README's figures come from: the private server, the mock Node API, N
replicas and the simulator's users, then USERS connects published in one pipeline with the
server stopped at once, for PAUSE seconds, then let go. A user is *lost* when, SETTLE seconds
after, the pool neither gave them a node nor put them in line for one: their connect was
dropped, and they were told nothing. Each round's users disconnect before the next round.

`replicas_from` runs the replicas from another checkout, so that a release before and this one
meet the same drill.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from provisioner import view
from provisioner.bench.loop import (
    StackRun,
    _Heard,
    _raise_if_cancelled,
    _ready,
    _until,
    all_started,
    exited_during,
    quiet_connect_race,
    tracebacks,
)
from provisioner.bench.soak import replica_metrics
from provisioner.devstack import Stack, stack
from provisioner.keys import PoolKeys
from provisioner.redis_server import server_label
from provisioner.simulator import ANSWERED

#: The replicas' counter of gaps, by verdict (provisioner/metrics.py).
GAPS = "provisioner_server_gaps"
#: How long the run lets the replicas beat once each has, before the first pause: a few of
#: the default heartbeat intervals (2 s).
BEATEN_S = 5.0
#: How long the run waits for each round's users to leave the pool before the next, seconds.
LEAVE_S = 30.0


@dataclass
class Round:
    """One pause: who of its users the pool served, put in line, or lost."""

    paused_s: float  # how long the server was stopped, as this process timed it
    served: list[str] = field(default_factory=list)  # holding a node at the end
    waiting: list[str] = field(default_factory=list)  # in line for one
    lost: list[str] = field(default_factory=list)  # neither
    connects: int = 0  # the pool's `connects` counter's rise over the round
    allocated_heard: int = 0  # user:allocated heard for the round's users
    waiting_heard: int = 0  # user:waiting heard for them
    # each replica's gaps counted over the round, by verdict ({} where it has no such counter:
    # a release before session 74, or no answer)
    gaps: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class PauseResult(StackRun):
    server: str
    replicas: int
    users: int  # connects published a round
    pause_s: float  # asked for
    settle_s: float
    rounds: list[Round] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return sum(len(r.lost) for r in self.rounds)

    @property
    def failed(self) -> list[str]:
        """What the drill exists to catch, a user lost, and what is wrong whatever the figures:
        a broken invariant, a process that ended before the stack was stopped, a traceback."""
        lost = [f"round {n}: {len(r.lost)} of {self.users} users neither served nor waiting "
                f"({', '.join(r.lost[:5])}{', ...' if len(r.lost) > 5 else ''})"
                for n, r in enumerate(self.rounds, 1) if r.lost]
        return [*lost, *self.broken()]

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "lost": self.lost, "failed": self.failed}


def gaps_counted(text: str) -> dict[str, int]:
    """The gaps a replica's /metrics text counts, by verdict ({} without the counter)."""
    counted: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        if family.name != GAPS:
            continue
        for sample in family.samples:
            if sample.name == GAPS + "_total":
                counted[sample.labels.get("judged", "")] = int(sample.value)
    return counted


def _gaps(ports: list[int]) -> dict[str, dict[str, int]]:
    """Each replica's gaps by verdict ({} where it did not answer or has no such counter)."""
    found: dict[str, dict[str, int]] = {}
    for index, port in enumerate(ports, 1):
        text = replica_metrics(port)
        try:
            found[f"replica-{index}"] = gaps_counted(text) if text is not None else {}
        except ValueError:  # not the exposition format
            found[f"replica-{index}"] = {}
    return found


def _rise(after: dict[str, dict[str, int]],
          before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {name: {judged: n - before.get(name, {}).get(judged, 0)
                   for judged, n in counts.items()}
            for name, counts in after.items()}


def round_users(round_no: int, users: int) -> list[str]:
    return [f"pause-{round_no}-{n}" for n in range(1, users + 1)]


def run(users: int = 30, pause: float = 20.0, settle: float = 20.0, rounds: int = 1,
        replicas: int = 2, boot_delay: str = "lognormal:20:45", arrival_rate: float = 20.0,
        seed: int = 1, mock: tuple[str, ...] | list[str] = (), replicas_from: Path | None = None,
        say: Callable[[str], None] = print) -> PauseResult:
    """Start the stack with its private server; once the pool has a ready node, `rounds` times:
    publish `users` connects in one pipeline, stop the server at once for `pause` seconds,
    let it go, wait `settle` seconds and read who was served, put in line, or lost. Then check
    the pool's invariants and the logs, and stop it all."""
    source = replicas_from.resolve() if replicas_from is not None else None
    with stack(None, replicas, boot_delay, arrival_rate, ["--seed", str(seed)], say=say,
               mock=list(mock), replicas_from=source) as running:
        all_started(running)
        if running.server_pid is None:
            raise RuntimeError("the drill stops the stack's private server, and has none")
        result = asyncio.run(_drive(running, replicas, users, pause, settle, rounds, say))
        result.exited = exited_during(running)
    result.replicas_from = str(replicas_from or "")
    result.tracebacks = tracebacks(running)
    return result


async def _drive(running: Stack, replicas: int, users: int, pause: float, settle: float,
                 rounds: int, say: Callable[[str], None]) -> PauseResult:
    assert running.server_pid is not None
    client = aioredis.Redis.from_url(running.redis_url, decode_responses=True)
    keys = PoolKeys(running.pool)
    result = PauseResult(server=server_label(await client.info("server")), replicas=replicas,
                         users=users, pause_s=pause, settle_s=settle,
                         logdir=str(running.logdir))
    asyncio.get_running_loop().set_exception_handler(quiet_connect_race)
    everyone = {u for n in range(1, rounds + 1) for u in round_users(n, users)}
    heard = _Heard(client, everyone)
    stopped = False
    try:
        await heard.start()
        await warmed(running, client, keys, replicas, say)
        for round_no in range(1, rounds + 1):
            these = round_users(round_no, users)
            heard.reset()
            gaps_before = await asyncio.to_thread(_gaps, running.metrics_ports)
            connects_before = int(await client.hget(keys.key("stats"), "connects") or 0)
            async with client.pipeline(transaction=False) as pipe:
                for user in these:
                    pipe.publish("user:connect", json.dumps({"user_id": user}))
                await pipe.execute()
            os.kill(running.server_pid, signal.SIGSTOP)
            stopped, began = True, time.monotonic()
            say(f"round {round_no}: {users} connects published, the server stopped")
            await asyncio.sleep(pause)
            os.kill(running.server_pid, signal.SIGCONT)
            stopped = False
            this = Round(paused_s=time.monotonic() - began)
            say(f"round {round_no}: the server let go after {this.paused_s:.1f} s; "
                f"following the pool {settle:g} s")
            await asyncio.sleep(settle)
            _raise_if_cancelled()
            for user, node, place in zip(these, *await _placed(client, keys, these),
                                         strict=True):
                (this.served if node else this.waiting if place is not None
                 else this.lost).append(user)
            this.connects = (int(await client.hget(keys.key("stats"), "connects") or 0)
                             - connects_before)
            this.allocated_heard = sum(heard.allocated[u] for u in these)
            this.waiting_heard = heard.waiting
            this.gaps = _rise(await asyncio.to_thread(_gaps, running.metrics_ports),
                              gaps_before)
            result.rounds.append(this)
            say(f"round {round_no}: {len(this.served)} served, {len(this.waiting)} waiting, "
                f"{len(this.lost)} lost")
            async with client.pipeline(transaction=False) as pipe:
                for user in these:
                    pipe.publish("user:disconnect", json.dumps({"user_id": user}))
                await pipe.execute()
            if round_no < rounds:
                await _until_gone(client, keys, these)
        result.problems = await view.check_invariants(client, running.pool)
    finally:
        if stopped:  # a Ctrl-C mid-pause: the server goes on, for the stack to stop it
            os.kill(running.server_pid, signal.SIGCONT)
        await heard.stop()
        await client.aclose()
    return result


async def warmed(running: Stack, client: aioredis.Redis, keys: PoolKeys, replicas: int,
                 say: Callable[[str], None]) -> None:
    """Until a drill may begin: the pool has a ready node, the simulator its first answer and
    every replica has beaten, a few times."""
    say("waiting for the pool's first ready node")
    await _until(lambda: _ready(client, keys), "the pool's first ready node")
    # The simulator refuses a server that does not answer as it starts (exit 2): stopped
    # before its first PING, it ended, and the run with it.
    await _until(lambda: _publishing(running), "the simulator's start")
    # A replica judges a gap by the heartbeats around it: one stopped before the pool had
    # beaten could not tell a pause, and dropped its batch ("unknown").
    await _until(lambda: _beating(client, keys, replicas), "every replica's heartbeat")
    await asyncio.sleep(BEATEN_S)


async def _beating(client: aioredis.Redis, keys: PoolKeys, replicas: int) -> bool:
    return int(await client.zcard(keys.key("replicas"))) >= replicas


async def _publishing(running: Stack) -> bool:
    """Whether the simulator logged that the server answered it (or is gone: the run's end
    says so)."""
    for child in running.children:
        if child.name == "simulator" and child.alive():
            return ANSWERED in child.log_path.read_text(errors="replace")
    return True


async def _until_gone(client: aioredis.Redis, keys: PoolKeys, users: list[str]) -> None:
    """Until none of `users` holds a node or waits, or LEAVE_S (a disconnect dropped leaves one
    holding: the next round is not held up for it)."""
    deadline = time.monotonic() + LEAVE_S
    while time.monotonic() < deadline:
        held, in_line = await _placed(client, keys, users)
        if not any(held) and all(p is None for p in in_line):
            return
        await asyncio.sleep(0.25)


async def _placed(client: aioredis.Redis, keys: PoolKeys,
                  users: list[str]) -> tuple[list[bytes | str | None], list[float | None]]:
    """Each user's node (None: none) and place in line (None: not waiting)."""
    return (await client.hmget(keys.key("alloc"), users),
            await client.zmscore(keys.key("waiting"), users))
