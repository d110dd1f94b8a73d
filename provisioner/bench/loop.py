"""`bench loop`: clients reconnecting in a loop, live, against the local stack.

A client that drops and reconnects at once, or reconnects in a loop, publishes a connect and a
disconnect back to back, hundreds of times a second. The suite's tests say what one replica's
scripts make of such a loop; this runs it as a product would meet it: the private server, the
mock Node API, N replicas each applying every event, the simulator's users browsing and
converting beside it. The loop's users publish their pairs at a steady rate, and the run
follows what the pool does meanwhile: the highest target the policy set (the head of the
`targets` list, the keep window's peak), the most nodes the pool and the Node API held, each
`user:allocated` and `user:waiting` heard for a looping user, and the pool's counters. At the
end it checks the pool's invariants, as `provisioner check`, and counts the tracebacks in each
process's log.

`replicas_from` runs the replicas from another checkout (a worktree of another release), so
that a release before and this one meet the same loop: what the README's figures of the loop
were measured with.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from provisioner import view
from provisioner.bench.soak import api_node_ids, count_log_marks
from provisioner.devstack import Stack, stack
from provisioner.keys import PoolKeys
from provisioner.redis_server import server_label

#: The orders a pair is published in: a connect then its disconnect (a session of no time, a
#: client that connects and drops), or a disconnect then a connect (a user in a session whose
#: client drops and comes back at once; each user connects once before the loop, and
#: disconnects once after it).
ORDERS = ("connect-first", "disconnect-first")
STATS = ("connects", "hits", "misses", "resumed", "releases", "releases_taken_back")
#: How often the run reads the pool while the loop runs, seconds.
SAMPLE_S = 0.25
#: How long a run waits for the pool's first ready node (a warm start), or for each looping
#: user's first node (`disconnect-first`), seconds.
WAIT_S = 300.0
#: How long a message published takes at most to be heard, here on one host, seconds.
HEARD_S = 0.5


@dataclass(kw_only=True)
class StackRun:
    """What every run against the local stack reads at its end, whatever its figures."""

    problems: list[str] = field(default_factory=list)  # invariants broken at the end
    tracebacks: dict[str, int] = field(default_factory=dict)  # process -> tracebacks logged
    exited: list[str] = field(default_factory=list)  # processes that ended before the stack
    logdir: str = ""
    replicas_from: str = ""  # the checkout the replicas ran from, if not this one

    def broken(self) -> list[str]:
        """A broken invariant, a process that ended before the stack was stopped, a
        traceback."""
        return [*self.problems, *self.exited, *(f"{name}: {n} traceback(s) in its log"
                                                for name, n in self.tracebacks.items() if n)]


@dataclass
class LoopResult(StackRun):
    server: str
    replicas: int
    users: int
    pairs: int  # published per user
    rate: float  # pairs a second per user
    order: str
    fresh: bool  # the loop began before the pool's first node was ready
    seconds: float = 0.0  # from the first pair to the last
    target_before: int = 0  # the keep window's peak target as the loop began
    peak_target: int = 0  # the highest target of the run, from the loop's start
    nodes_before: int = 0  # the pool's live nodes as the loop began
    peak_nodes: int = 0  # the most live nodes the pool held (its `nodes`)
    peak_api_nodes: int = -1  # the most the Node API ran (-1: it never answered)
    # user:allocated heard for each looping user, and user:waiting for them all, from the loop's
    # first pair (a user's first connect before a disconnect-first loop is not counted)
    allocated: dict[str, int] = field(default_factory=dict)
    waiting: int = 0
    stats: dict[str, int] = field(default_factory=dict)  # each counter's rise during the run

    @property
    def failed(self) -> list[str]:
        """What is wrong whatever the figures (`broken`)."""
        return self.broken()

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "failed": self.failed}


def peak_of(entry: str | bytes | None) -> int:
    """The target of a `targets` entry ('ms:target'); 0 for none or one unreadable."""
    text = entry.decode(errors="replace") if isinstance(entry, bytes) else entry or ""
    _, _, target = text.partition(":")
    return int(target) if target.isdigit() else 0


def loop_users(users: int) -> list[str]:
    return [f"loop-{n}" for n in range(1, users + 1)]


def run(users: int = 1, pairs: int = 24_000, rate: float = 200.0,
        order: str = "connect-first", fresh: bool = False, settle: float = 10.0,
        replicas: int = 2, boot_delay: str = "lognormal:20:45", arrival_rate: float = 20.0,
        seed: int = 1, mock: tuple[str, ...] | list[str] = (), replicas_from: Path | None = None,
        say: Callable[[str], None] = print) -> LoopResult:
    """Start the stack, let `users` clients each publish `pairs` pairs at `rate` a second,
    follow the pool through the loop and `settle` seconds after it, check it, stop it all."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {order!r}")
    source = replicas_from.resolve() if replicas_from is not None else None
    with stack(None, replicas, boot_delay, arrival_rate, ["--seed", str(seed)], say=say,
               mock=list(mock), replicas_from=source) as running:
        all_started(running)
        result = asyncio.run(_drive(running, replicas, users, pairs, rate, order, fresh,
                                    settle, say))
        result.exited = exited_during(running)
    result.replicas_from = str(replicas_from or "")
    result.tracebacks = tracebacks(running)
    return result


def all_started(running: Stack) -> None:
    """Raise RuntimeError naming each process of the stack that exited as it started: the
    stack goes on without it (a checkout whose `run` lacks an option the stack gives it), and
    a run without it measures nothing."""
    if down := [c for c in running.children if not c.alive()]:
        raise RuntimeError("; ".join(f"{c.name} exited as it started; see {c.log_path}"
                                     for c in down))


def exited_during(running: Stack) -> list[str]:
    """Each process of the stack that ended before it was stopped: a replica that crashed
    (SIGKILL logs no traceback) left the run to the others, and the figures are not those of
    the stack asked for."""
    return [f"{c.name} exited during the run (code {c.process.returncode}); see {c.log_path}"
            for c in running.children if not c.alive()]


def tracebacks(running: Stack) -> dict[str, int]:
    """The tracebacks in each process's log."""
    return {c.name: count_log_marks(c.log_path)["traceback"] for c in running.children}


async def _drive(running: Stack, replicas: int, users: int, pairs: int, rate: float,
                 order: str, fresh: bool, settle: float,
                 say: Callable[[str], None]) -> LoopResult:
    client = aioredis.Redis.from_url(running.redis_url, decode_responses=True)
    keys = PoolKeys(running.pool)
    api_url = f"http://127.0.0.1:{running.api_port}"
    looping = loop_users(users)
    result = LoopResult(server=server_label(await client.info("server")), replicas=replicas,
                        users=users, pairs=pairs, rate=rate, order=order, fresh=fresh,
                        logdir=str(running.logdir), allocated=dict.fromkeys(looping, 0))
    asyncio.get_running_loop().set_exception_handler(quiet_connect_race)
    heard = _Heard(client, set(looping))
    sampler: _Sampler | None = None
    sampling: asyncio.Task[None] | None = None
    try:
        await heard.start()
        if not fresh:
            say("waiting for the pool's first ready node")
            await _until(lambda: _ready(client, keys), "the pool's first ready node")
        if order == "disconnect-first":
            for user in looping:
                await client.publish("user:connect", _payload(user))
            say("waiting for each looping user's first node")
            await _until(lambda: _sessions(client, keys, looping),
                         "a node for each looping user (more users than the pool's max_nodes?)")
            # What those first connects published is heard before the loop's count begins.
            await asyncio.sleep(HEARD_S)
            heard.reset()
        before = await _stats(client, keys)
        result.target_before = peak_of(await client.lindex(keys.key("targets"), 0))
        result.nodes_before = int(await client.zcard(keys.key("nodes")))
        sampler = _Sampler(client, keys, api_url, result)
        sampling = asyncio.create_task(sampler.run())
        say(f"{users} user(s) publishing {pairs:,} pairs each, {rate:g} a second, {order}")
        started = time.monotonic()
        first, second = (("user:connect", "user:disconnect") if order == "connect-first"
                         else ("user:disconnect", "user:connect"))
        for n in range(pairs):
            _raise_if_cancelled()
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
            async with client.pipeline(transaction=False) as pipe:
                for user in looping:
                    pipe.publish(first, _payload(user))
                    pipe.publish(second, _payload(user))
                await pipe.execute()
        result.seconds = time.monotonic() - started
        if order == "disconnect-first":
            for user in looping:
                await client.publish("user:disconnect", _payload(user))
        say(f"the loop took {result.seconds:.1f} s; following the pool {settle:g} s more")
        # The figures are read at the end: what the last pairs published is applied and heard
        # by then, however short the settle (--settle 0 read the counters before it was).
        await asyncio.sleep(max(settle, HEARD_S))
        _raise_if_cancelled()
        sampler.stop()
        await sampling  # its peaks whole, and what it raised raised here
        after = await _stats(client, keys)
        result.stats = {name: after[name] - before[name] for name in STATS}
        result.problems = await view.check_invariants(client, running.pool)
        result.allocated = {user: heard.allocated[user] for user in looping}
        result.waiting = heard.waiting
    finally:
        if sampler is not None and sampling is not None:
            # Ended by its event, not left to asyncio.run's cancel at the exit, which its
            # pipeline's send can swallow as the loop's did (_raise_if_cancelled).
            sampler.stop()
            await asyncio.gather(sampling, return_exceptions=True)
        await heard.stop()
        await client.aclose()
    return result


def _payload(user: str) -> str:
    return json.dumps({"user_id": user})


async def _until(done: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await done():
        _raise_if_cancelled()
        if time.monotonic() > deadline:
            raise RuntimeError(f"waited {WAIT_S:.0f} s for {what}, in vain")
        await asyncio.sleep(SAMPLE_S)


def quiet_connect_race(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's handler of errors no task takes, less asyncio's own race on Python 3.11: the
    Ctrl-C handler cancels the run's task from the signal handler, which can run inside a
    connect's callback between its check that the connect's future is not done and its
    setting of the result. The stop was clean, but stderr said "Exception in callback
    BaseSelectorEventLoop._sock_connect_cb" with an InvalidStateError's traceback (1 run of
    the test file in 6). Anything else goes to asyncio's default handler."""
    if (isinstance(context.get("exception"), asyncio.InvalidStateError)
            and "_sock_connect_cb" in repr(context.get("handle"))):
        return
    loop.default_exception_handler(context)


def _raise_if_cancelled() -> None:
    """Raise the cancel this task was sent (Ctrl-C: asyncio's handler cancels the run's task)
    if code under way swallowed it. On Python 3.11 `asyncio.wait_for` returns the result of
    what it waited for when its task is cancelled after that finished but before wait_for
    woke up (fixed in 3.12, whose wait_for is `asyncio.timeout`), and redis-py sends every
    command under `wait_for(..., socket_timeout)` (redis/asyncio/connection.py,
    `send_packed_command`; socket_timeout is 5 s by default): 1 to 3 cancels in 100 landing
    during the loop's pairs were lost so, the loop going on (a review's runs of the test
    file: 4 in 17). The cancel stays counted in the task's `cancelling()` all the same, and
    asyncio.run still turns it into KeyboardInterrupt when a Ctrl-C sent it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _ready(client: aioredis.Redis, keys: PoolKeys) -> bool:
    return int(await client.llen(keys.key("ready"))) > 0


async def _sessions(client: aioredis.Redis, keys: PoolKeys, users: list[str]) -> bool:
    held = await client.hmget(keys.key("alloc"), users)
    return all(held)


async def _stats(client: aioredis.Redis, keys: PoolKeys) -> dict[str, int]:
    raw = await client.hmget(keys.key("stats"), list(STATS))
    return {name: int(value) if value and value.isdigit() else 0
            for name, value in zip(STATS, raw, strict=True)}


class _Heard:
    """The `user:allocated` and `user:waiting` published for the looping users."""

    def __init__(self, client: aioredis.Redis, users: set[str]) -> None:
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.users = users
        self.allocated: Counter[str] = Counter()
        self.waiting = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.pubsub.subscribe("user:allocated", "user:waiting")
        self._task = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        async for message in self.pubsub.listen():
            _raise_if_cancelled()  # stop() cancels it and waits: a lost cancel would hang
            try:
                user = json.loads(message["data"]).get("user_id")
            except (ValueError, AttributeError):
                continue
            if user not in self.users:
                continue
            if message["channel"] == "user:allocated":
                self.allocated[user] += 1
            else:
                self.waiting += 1

    def reset(self) -> None:
        self.allocated.clear()
        self.waiting = 0

    async def stop(self) -> None:
        if self._task is not None:  # its counts were read after the run's last HEARD_S wait
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.pubsub.aclose()


class _Sampler:
    """Reads the keep window's peak target and the pool's and the API's nodes, every
    `SAMPLE_S` (the API's every second), into `result`'s peaks."""

    def __init__(self, client: aioredis.Redis, keys: PoolKeys, api_url: str,
                 result: LoopResult) -> None:
        self.client, self.keys, self.api_url, self.result = client, keys, api_url, result
        self._stopped = asyncio.Event()

    def stop(self) -> None:
        self._stopped.set()

    async def run(self) -> None:
        result = self.result
        result.peak_target = result.target_before
        result.peak_nodes = result.nodes_before
        last_api = 0.0
        while True:
            _raise_if_cancelled()
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.lindex(self.keys.key("targets"), 0)
                pipe.zcard(self.keys.key("nodes"))
                head, nodes = await pipe.execute()
            result.peak_target = max(result.peak_target, peak_of(head))
            result.peak_nodes = max(result.peak_nodes, int(nodes))
            if time.monotonic() - last_api >= 1.0:
                last_api = time.monotonic()
                api = await asyncio.to_thread(api_node_ids, self.api_url)
                if api is not None:
                    result.peak_api_nodes = max(result.peak_api_nodes, len(api))
            try:
                await asyncio.wait_for(self._stopped.wait(), SAMPLE_S)
                return
            except TimeoutError:
                continue
