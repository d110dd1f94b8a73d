"""`provisioner replace`: every node of a pool replaced in turn (a new node image, a driver
update), a few at a time, without taking away the ready nodes users are handed.

The CLI drives it and the pool's own transitions do the work, so a replica's crash or restart
changes nothing, and the command can be stopped and run again (`--created-before` names the
same nodes). Each round reads the nodes created before the cutoff:

- a node in a session is drained in it (`lua/drain_node.lua`): it ends with its session
  instead of going back to the pool, and the forecast counts no free from it meanwhile;
- ready nodes are drained `at_once` at a time, idle the longest first, and only while the pool
  is not short of its target. The next batch waits until a replica has decided after the
  drain and every create decided since it has finished booting (or failed), so the pool holds
  as many ready nodes as its forecast wants before the next go;
- a node still booting is drained once it is ready.

It is done when no node created before the cutoff is ready or booting, and the boots the
pool began since the last drain have finished; those still in a session go when their sessions
end. With nothing changing for `wait_limit_s` (a boot that
never ends, no replica ticking, a pool held short by the Node API) it stops and says what it
waited for.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from provisioner.clock import server_now_ms
from provisioner.keys import PoolKeys
from provisioner.scripts import Drain, Scripts, as_text


@dataclass(frozen=True)
class OldNode:
    """A live node created before the cutoff, as the pool holds it."""

    node: str
    state: str
    #: allocated: the user whose session is on it ('' if its record names none that holds it)
    user: str = ""
    session_ms: int | None = None  # when that session began (its score in `sessions`)
    drained_by: str = ""           # who drained it in its session, if anyone did


async def cutoff_now(client: aioredis.Redis, keys: PoolKeys) -> int:
    """A cutoff that names every node the pool holds now: past the server's clock and past the
    newest node's creation, which a replica stamps by its own clock (it may run ahead)."""
    newest = await client.zrevrange(keys.key("nodes"), 0, 0, withscores=True)
    return max(await server_now_ms(client), int(newest[0][1]) if newest else 0) + 1


async def old_nodes(client: aioredis.Redis, keys: PoolKeys, before_ms: int) -> list[OldNode]:
    """The live nodes created before `before_ms`: the ready ones first, in the ready list's
    order (idle the longest first), then the others by creation."""
    ids = [as_text(x) for x in
           await client.zrangebyscore(keys.key("nodes"), "-inf", f"({before_ms}")]
    if not ids:
        return []
    async with client.pipeline(transaction=False) as pipe:
        pipe.lrange(keys.key("ready"), 0, -1)
        for node in ids:
            pipe.hmget(keys.node(node), "state", "user", "drain_by")
        ready_list, *records = await pipe.execute()
    found: dict[str, OldNode] = {}
    for node, (state, user, drained_by) in zip(ids, records, strict=True):
        state, user = as_text(state or ""), as_text(user or "")
        session = None
        if state == "allocated" and user:
            held = await client.hget(keys.key("alloc"), user)
            session = await client.zscore(keys.key("sessions"), user)
            if held is None or as_text(held) != node:
                user, session = "", None
        found[node] = OldNode(node, state, user, None if session is None else int(session),
                              as_text(drained_by or ""))
    order = {as_text(node): place for place, node in enumerate(ready_list)}
    return sorted(found.values(), key=lambda n: (n.state != "ready", order.get(n.node, 0)))


async def shortfall(client: aioredis.Redis, keys: PoolKeys) -> int:
    """How many nodes the pool's spare (ready + booting + creating - waiting, as the scaling
    decision counts it) is below the last decision's target: a pool short is not drained."""
    async with client.pipeline(transaction=True) as pipe:
        pipe.hget(keys.key("stats"), "last_numbers")
        pipe.llen(keys.key("ready"))
        pipe.zcard(keys.key("booting"))
        pipe.zcard(keys.key("pending"))
        pipe.zcard(keys.key("unclaimed"))
        pipe.zcard(keys.key("waiting"))
        numbers, ready, booting, pending, unclaimed, waiting = await pipe.execute()
    try:
        target = int(json.loads(numbers)["target"])
    except (TypeError, ValueError, KeyError):  # no decision yet, or one edited by hand
        return 0
    spare = ready + booting + max(0, pending - unclaimed) - waiting
    return int(max(0, target - spare))


@dataclass
class Batch:
    """Ready nodes drained together, and what the pool did since."""

    nodes: list[str]
    seq_before: int               # the reservation counter before the drain
    lock_after: str | None        # the decided slot (`tick_lock`) just after it
    seq_after: int | None = None  # the counter once a replica decided after the drain


async def _seq(client: aioredis.Redis, keys: PoolKeys) -> int:
    raw = await client.get(keys.key("seq"))
    try:
        return int(raw or 0)
    except ValueError:
        return 0


async def in_flight(client: aioredis.Redis, keys: PoolKeys, batch: Batch) -> int | None:
    """None until a replica has decided after the batch's drain (the decided slot changed:
    every decision takes a slot of its own); then how many creates reserved since the drain,
    up to that decision, are still pending or booting."""
    if batch.seq_after is None:
        lock = await client.get(keys.key("tick_lock"))
        if lock is None or as_text(lock) == batch.lock_after:
            return None
        batch.seq_after = await _seq(client, keys)
    low, high = batch.seq_before, batch.seq_after

    def since_the_drain(reservation: str) -> bool:
        seq = reservation.rpartition(":")[2]  # 'replica:seq'
        return seq.isdigit() and low < int(seq) <= high

    if high == low:
        return 0
    pending = [as_text(r) for r in await client.zrange(keys.key("pending"), 0, -1)]
    booting = [as_text(n) for n in await client.zrange(keys.key("booting"), 0, -1)]
    async with client.pipeline(transaction=False) as pipe:
        for node in booting:
            pipe.hget(keys.node(node), "reservation")
        reservations = await pipe.execute()
    return (sum(since_the_drain(r) for r in pending)
            + sum(since_the_drain(as_text(r or "")) for r in reservations))


@dataclass
class Outcome:
    done: bool
    drained: list[str] = field(default_factory=list)   # ready nodes drained
    marked: list[str] = field(default_factory=list)    # nodes drained in their sessions
    in_sessions: list[str] = field(default_factory=list)  # old nodes still in a session
    waited_for: str = ""  # not done: what nothing changed in for the wait limit


async def replace_nodes(client: aioredis.Redis, keys: PoolKeys, before_ms: int, *, by: str,
                        at_once: int = 1, wait_limit_s: float = 600.0,
                        say: Callable[[str], None] = print, poll_s: float = 1.0,
                        log_len: int = 1000,
                        clock: Callable[[], float] = time.monotonic) -> Outcome:
    """Replace the nodes created before `before_ms` (module docstring); `say` is told each
    step, and each wait once."""
    scripts = Scripts(client, keys)
    outcome = Outcome(done=False)
    batch: Batch | None = None
    last_change, seen, said = clock(), None, ""
    while True:
        now = await server_now_ms(client)
        old = await old_nodes(client, keys, before_ms)
        for n in old:
            if n.state == "allocated" and n.user and not n.drained_by:
                result = await scripts.drain_node(now, n.node, by, log_len,
                                                  expected=f"allocated:{n.user}",
                                                  session_ms=n.session_ms)
                if result.code is Drain.MARKED:
                    outcome.marked.append(n.node)
                    say(f"{n.node}: in the session of user {n.user}, terminated when it ends")
        ready = [n.node for n in old if n.state == "ready"]
        booting = [n.node for n in old if n.state == "booting"]
        if (len(ready), len(booting)) != seen:
            seen, last_change = (len(ready), len(booting)), clock()
        waiting = ""
        if batch is not None:
            flying = await in_flight(client, keys, batch)
            if flying is None:
                waiting = "a replica to decide after the last drain"
            elif flying:
                waiting = f"{flying} boot(s) the pool began since the last drain"
            else:
                batch, last_change = None, clock()
        if batch is None and not ready and not booting:  # the last batch's boots done too
            outcome.done = True
            outcome.in_sessions = [n.node for n in old if n.state == "allocated"]
            return outcome
        if batch is None and ready:
            short = await shortfall(client, keys)
            if short:
                waiting = f"the pool, {short} node(s) short of its target, to catch up"
            else:
                seq_before = await _seq(client, keys)
                drained = []
                for node in ready[:at_once]:
                    result = await scripts.drain_node(now, node, by, log_len, expected="ready")
                    if result.code is Drain.DRAINING:
                        drained.append(node)
                if drained:
                    lock = await client.get(keys.key("tick_lock"))
                    batch = Batch(drained, seq_before, None if lock is None else as_text(lock))
                    outcome.drained += drained
                    last_change = clock()
                    say(f"{', '.join(drained)}: drained (ready); "
                        f"{len(ready) - len(drained) + len(booting)} to go")
                    said = ""
        elif batch is None:
            waiting = f"{len(booting)} node(s) created before the cutoff to finish booting"
        if waiting and waiting != said:
            say(f"waiting for {waiting}")
            said = waiting
        if waiting and clock() - last_change > wait_limit_s:
            outcome.waited_for = waiting
            return outcome
        await asyncio.sleep(poll_s)
