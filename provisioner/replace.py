"""`provisioner replace`: every node of a pool replaced in turn (a new node image, a driver
update), a few at a time, without taking away the ready nodes users are handed.

The CLI drives it and the pool's own transitions do the work (the replicas need the release
with `lua/hold_spare.lua`, whose spare the run waits to see in a decision).
The nodes to replace are those of the pool's creates up to its create count when the run
began (the reservation counter `seq`, which the server counts, so no replica's clock decides
which node is old), and those the pool first recorded by then without a create's answer
(adopted, or seen on `node:status`: each record keeps the count it was made at,
`creates_seen`); a node seen while a create is still unanswered (`unclaimed`) is taken for a
new one. Each round:

- a node in a session is drained in it (`lua/drain_node.lua`, under `<by> (replace)`): it
  ends with its session instead of going back to the pool, and the forecast counts no free
  from it meanwhile;
- ready nodes are drained `at_once` at a time, idle the longest first, and only while the
  pool's ready nodes, less the users waiting, meet the level its last decision holds them to
  (the reaper's keep level: the peak target of the keep window), and a replica has decided
  since the last batch. So the next batch waits until the pool has booted what it wanted in
  the last one's place and those boots are ready (whatever held them: a create held while the
  Node API fails, `max_nodes`, a boot that failed and was made again), and no node the pool
  keeps on purpose goes unreplaced; with `max_unavailable` N, batches go before their
  replacements are ready, as many as leave the ready nodes at least the pool's own keep
  level (the spare left out) less N, and never the last ready node (`_batch`; so a pool
  at `max_nodes`, with no room for the spare, is replaced);
- a node still booting is drained once it is ready.

While it runs it holds `at_once` spare nodes above the pool's keep level (`lua/hold_spare.lua`,
a lease it renews every round and lets go when it ends), so the keep level a batch must meet
is that much above what the pool needs: a batch is booted before it goes. Each node of the
last batch takes the hold one lower as it drains (`drain_node`'s `last`), and with no old node
left to go the run renews it no higher (`keep`): held at `at_once` after the last batch, the
pool booted as many again. An old node that comes back to go (a session's node freed before
its mark, a drain refused part way) has the hold renewed at `at_once` again. Without the hold, the
gate drained a pool at its floor (one ready node) to none before anything booted in its place,
and the next connect missed (a review's drill). A run whose hold was let go (`--cancel`) or
taken over (another run) stops.

Stopped and run again (the same cutoff), it goes on where it was: the gate reads the pool, not
the run. It is done when no old node is ready or booting, a replica has decided since the
last batch (so its replacements are reserved; their boots are the pool's) and no mark of the
round was refused (its session changed: the node may be back in the pool); those still in a
session go when their sessions end. With the old nodes unchanged for `wait_limit_s` it stops
and says what it waited for; if the pool's state is lost and begun again meanwhile (a new
epoch), it stops at once.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, AuthorizationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from provisioner.clock import server_now_ms
from provisioner.keys import PoolKeys
from provisioner.scripts import (
    Drain,
    DrainResult,
    Hold,
    Scripts,
    as_text,
    read_at_once,
    refused_for_now,
)

#: What `replace` drains under: the operator's name with this after it, so that `--cancel`
#: takes back its own drains and not a `provisioner drain` of the same operator.
TAG = " (replace)"
#: Seconds between a run's rounds.
POLL_S = 1.0


@dataclass(frozen=True)
class Cutoff:
    """The pool's create count when a run began, in the state begun at `epoch`."""

    creates: int
    epoch: str

    def __str__(self) -> str:
        return f"{self.creates}@{self.epoch}"

    @classmethod
    def parse(cls, text: str) -> Cutoff:
        count, at, epoch = text.strip().partition("@")
        if not (count.isdigit() and at and epoch):
            raise ValueError(f"{text!r} is not a cutoff as a run prints it (COUNT@EPOCH)")
        return cls(int(count), epoch)


@dataclass(frozen=True)
class OldNode:
    """A live node of the pool to replace, as the pool holds it."""

    node: str
    state: str
    #: allocated: the user whose session is on it ('' if its record names none that holds it)
    user: str = ""
    session_ms: int | None = None  # when that session began (its score in `sessions`)
    drained_by: str = ""           # who drained it in its session, if anyone did


@dataclass(frozen=True)
class Supply:
    """The pool at one instant: its ready nodes less the users waiting; the level the last
    decision holds ready nodes to (None before any decision, or unreadable): the reaper's keep
    level, the peak target of the keep window (its target, from a replica of a release that
    does not say it); the decided slot; and the epoch."""

    free: int
    keep: int | None
    lock: str | None
    epoch: str
    held: int = 0  # the spare a replace held in that decision (0: none, or a release before)


async def supply(client: aioredis.Redis, keys: PoolKeys) -> Supply:
    """Read at once (read_at_once); the decided slot first, so a decision the numbers are of
    is never older than the slot they are paired with."""
    def reads(pipe: Any) -> None:
        pipe.get(keys.key("tick_lock"))
        pipe.hget(keys.key("stats"), "last_numbers")
        pipe.llen(keys.key("ready"))
        pipe.zcard(keys.key("waiting"))
        pipe.get(keys.key("epoch"))

    lock, numbers, ready, waiting, epoch = await read_at_once(client, reads)
    held = 0
    try:
        said = json.loads(numbers)
        keep: int | None = int(said.get("keep", said["target"]))
        held = int(said.get("held", 0))
    except (TypeError, ValueError, KeyError, AttributeError):  # none yet, or edited by hand
        keep = None
    return Supply(int(ready) - int(waiting), keep, None if lock is None else as_text(lock),
                  as_text(epoch or ""), held)


async def cutoff_now(client: aioredis.Redis, keys: PoolKeys) -> Cutoff:
    def reads(pipe: Any) -> None:
        pipe.get(keys.key("seq"))
        pipe.get(keys.key("epoch"))

    count, epoch = await read_at_once(client, reads)
    return Cutoff(_count(count), as_text(epoch or ""))


def _count(raw: object) -> int:
    try:
        return int(as_text(raw or 0))
    except ValueError:  # an edit by hand
        return 0


def _create_of(reservation: str) -> int | None:
    """The create count of a reservation id, 'replica:seq', or of a count alone; None for
    none."""
    seq = reservation.rpartition(":")[2]
    return int(seq) if reservation and seq.isdigit() else None


async def old_nodes(client: aioredis.Redis, keys: PoolKeys, cutoff: Cutoff) -> list[OldNode]:
    """The live nodes to replace: the ready ones first, in the ready list's order (idle the
    longest first), then the others by creation. Three round trips, whatever the pool's size."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.zrange(keys.key("nodes"), 0, -1)
        pipe.zrange(keys.key("unclaimed"), 0, -1)
        pipe.lrange(keys.key("ready"), 0, -1)
        ids, unclaimed, ready_list = await pipe.execute()
    ids = [as_text(x) for x in ids]
    unclaimed = {as_text(x) for x in unclaimed}
    async with client.pipeline(transaction=False) as pipe:
        for node in ids:
            pipe.hmget(keys.node(node), "state", "user", "drain_by", "reservation",
                       "creates_seen")
        records = await pipe.execute()
    found = []  # (node, state, the user its record names, who drained it)
    for node, (state, user, drained_by, reservation, seen) in zip(ids, records, strict=True):
        # Made by a create of the pool's, its count; else the pool's count when it first
        # recorded the node (a create whose POST timed out, adopted when seen: the review's
        # run took each such replacement for an old node, and never ended).
        create = _create_of(as_text(reservation or ""))
        if create is None:
            create = _create_of(as_text(seen or ""))
        if node in unclaimed or (create is not None and create > cutoff.creates):
            continue
        found.append((node, as_text(state or ""), as_text(user or ""),
                      as_text(drained_by or "")))
    named = [(node, user) for node, state, user, _ in found if state == "allocated" and user]
    async with client.pipeline(transaction=False) as pipe:
        for _, user in named:
            pipe.hget(keys.key("alloc"), user)
            pipe.zscore(keys.key("sessions"), user)
        replies = await pipe.execute()
    # The sessions: a user whose allocation is the node that names them, and when it began.
    held = {node: (user, int(began) if began is not None and math.isfinite(began) else None)
            for (node, user), holder, began in zip(named, replies[::2], replies[1::2],
                                                   strict=True)
            if holder is not None and as_text(holder) == node}
    old = [OldNode(node, state, *held.get(node, ("", None)), drained_by)
           for node, state, _, drained_by in found]
    order = {as_text(node): place for place, node in enumerate(ready_list)}
    return sorted(old, key=lambda n: (n.state != "ready", order.get(n.node, 0)))


@dataclass
class Outcome:
    done: bool
    drained: list[str] = field(default_factory=list)      # ready nodes drained
    marked: list[str] = field(default_factory=list)       # nodes drained in their sessions
    in_sessions: list[str] = field(default_factory=list)  # old nodes still in a session
    waited_for: str = ""  # not done: what it waited for while the old nodes stood still
    lost: bool = False    # not done: the pool's state was lost and begun again meanwhile
    #: not done: its hold of spare nodes was let go (`--cancel`: '') or taken over by the
    #: run named; None while it holds it
    taken_back: str | None = None
    lapsed: bool = False  # taken back: its lease ended while the server refused its writes
    #: its hold could not be let go as it ended (the server refused the release, or its
    #: credentials): the pool holds the spare until the lease ends
    hold_left: bool = False


async def replace_nodes(client: aioredis.Redis, keys: PoolKeys, cutoff: Cutoff, *, by: str,
                        at_once: int = 1, max_unavailable: int = 0,
                        wait_limit_s: float = 600.0,
                        say: Callable[[str], None] = print, poll_s: float = POLL_S,
                        log_len: int = 1000,
                        clock: Callable[[], float] = time.monotonic,
                        outcome: Outcome | None = None) -> Outcome:
    """Replace the nodes of `cutoff` (module docstring); `say` is told each step, and each
    wait once. `outcome` (optional) is filled in as it goes, for a caller stopped midway.
    `max_unavailable`: ready nodes the run may take the pool below its own keep level
    before their replacements are ready, never its last (`_batch`; a pool at its
    `max_nodes` has no room for the spare)."""
    scripts = Scripts(client, keys)
    outcome = outcome if outcome is not None else Outcome(done=False)
    run = uuid.uuid4().hex[:12]
    try:
        taken = await _take_hold(client, scripts, run, at_once, wait_limit_s, say, poll_s,
                                 clock, outcome)
    except (asyncio.CancelledError, KeyboardInterrupt):
        # Stopped (Ctrl-C, SIGTERM) while its take was under way: the server may have applied
        # it, its reply not read (a clean clone's CI left the hold to its lease so). Let go as
        # a run that ends does; a release of no hold of this run changes nothing.
        await _let_go(client, scripts, run, outcome)
        raise
    if not taken:
        return outcome
    # Named once it holds: a run taken over is told the other's id, which it never saw (a
    # review).
    say(f"run {run} (by {by}) holds {at_once} spare node(s) above the keep level")
    try:
        return await _replace(client, keys, cutoff, scripts, run, by=by, at_once=at_once,
                              max_unavailable=max_unavailable,
                              wait_limit_s=wait_limit_s, say=say, poll_s=poll_s,
                              log_len=log_len, clock=clock, outcome=outcome)
    finally:
        # Let go as it ends, however it ends (done, stopped, Ctrl-C): the lease would lapse
        # by itself, but the pool would hold the extra nodes until it did.
        await _let_go(client, scripts, run, outcome)


async def _let_go(client: aioredis.Redis, scripts: Scripts, run: str, outcome: Outcome) -> None:
    """Release the run's hold. A run ended by its credentials refused cannot let go either
    (the same credentials): the caller is told, not left to think it was (a review)."""
    try:
        await scripts.hold_spare(await server_now_ms(client), "release", run)
    except (RedisError, OSError):
        outcome.hold_left = True


async def _replace(client: aioredis.Redis, keys: PoolKeys, cutoff: Cutoff, scripts: Scripts,
                   run: str, *, by: str, at_once: int, max_unavailable: int,
                   wait_limit_s: float,
                   say: Callable[[str], None], poll_s: float, log_len: int,
                   clock: Callable[[], float], outcome: Outcome) -> Outcome:
    state = _Run(clock())
    while True:
        try:
            ended = await _round(client, keys, cutoff, scripts, run, state, by=by,
                                 at_once=at_once, max_unavailable=max_unavailable, say=say,
                                 log_len=log_len, clock=clock, outcome=outcome)
        except RedisError as exc:
            # Writes refused for now (out of memory, a replica read-only, loading, a script
            # running long) or the server out of reach: waited for as any other hold-up,
            # within the wait limit (a review: two seconds of maxmemory 1 ended a run that
            # had only waited before). Anything else ends the run, its hold let go.
            if not _for_now(exc):
                raise
            state.refused = True
            state.waiting, state.short = WRITES_REFUSED, f" ({exc})"
            ended = False
        if ended:
            return outcome
        if state.waiting and state.waiting != state.said:
            say(f"waiting for {state.waiting}")
            state.said = state.waiting
        if state.waiting and clock() - state.last_change > wait_limit_s:
            outcome.waited_for = state.waiting + state.short
            return outcome
        await asyncio.sleep(poll_s)


async def _take_hold(client: aioredis.Redis, scripts: Scripts, run: str, at_once: int,
                     wait_limit_s: float, say: Callable[[str], None], poll_s: float,
                     clock: Callable[[], float], outcome: Outcome) -> bool:
    """Take the hold of spare nodes for `run`, waiting out a server that refuses writes for
    now as the rounds do, within the wait limit: a run started then stopped at once with exit
    2, where one already going waited (a review). False, with `outcome.waited_for` said, if
    the wait limit passed first."""
    began, said = clock(), False
    while True:
        try:
            await scripts.hold_spare(await server_now_ms(client), "take", run, at_once)
            return True
        except RedisError as exc:
            if not _for_now(exc):
                raise
            waiting = f"{WRITES_REFUSED} ({exc})"
            if clock() - began > wait_limit_s:
                outcome.waited_for = waiting
                return False
            if not said:
                say(f"waiting for {waiting}")
                said = True
        await asyncio.sleep(poll_s)


#: What a run waits for while the server refuses its writes, at its start or in its rounds.
WRITES_REFUSED = "the server to take its writes again"


def _for_now(exc: RedisError) -> bool:
    """What a round waits out rather than ends on: the server refusing writes for now
    (`refused_for_now`, the listener's rule), or out of reach for a moment (still loading
    its data among them). Not its credentials refused on a new connection (a password
    changed under the run), which redis-py files as a connection error: waited out, they
    read "waiting for the server to take its writes again" until the wait limit."""
    if isinstance(exc, AuthenticationError | AuthorizationError):
        return False
    return refused_for_now(exc) or isinstance(exc, RedisConnectionError | RedisTimeoutError)


@dataclass
class _Run:
    """What a run carries from one round to the next."""

    last_change: float
    seen: tuple[int, int] | None = None
    said: str = ""
    waiting: str = ""
    short: str = ""
    batch_lock: str | None = None  # the decided slot just after the last batch
    batched: bool = False
    refused: bool = False  # a round was refused since the hold was last renewed


async def _round(client: aioredis.Redis, keys: PoolKeys, cutoff: Cutoff, scripts: Scripts,
                 run: str, state: _Run, *, by: str, at_once: int, max_unavailable: int,
                 say: Callable[[str], None], log_len: int, clock: Callable[[], float],
                 outcome: Outcome) -> bool:
    """One round; True when the run ends (`outcome` says how)."""
    state.waiting, state.short = "", ""
    now = await server_now_ms(client)
    old = await old_nodes(client, keys, cutoff)
    ready = [n.node for n in old if n.state == "ready"]
    booting = [n.node for n in old if n.state == "booting"]
    # Old nodes still to go: their spare held, at `at_once` again if the last batch took it
    # down and one came back (a review: a session's node freed before its mark, then the run
    # waited to its limit for a decision holding a spare no renewal raised). None: no higher
    # than the last batch left it.
    mode = "renew" if ready or booting else "keep"
    held, holder = await scripts.hold_spare(now, mode, run, at_once)
    if held is Hold.TAKEN_BACK:
        outcome.taken_back, outcome.lapsed = holder, state.refused and not holder
        return True
    state.refused = False
    pool = await supply(client, keys)
    if pool.epoch != cutoff.epoch:
        outcome.lost = True
        return True
    changed: list[str] = []  # nodes whose mark was refused: their session changed meanwhile
    for n in old:
        if n.state == "allocated" and n.user and not n.drained_by:
            result = await scripts.drain_node(now, n.node, by + TAG, log_len,
                                              expected=f"allocated:{n.user}",
                                              session_ms=n.session_ms, run=run)
            if result.code is Drain.NOT_HELD:  # let go of by --cancel since the renewal
                return _taken_back(outcome, result)
            if result.code is Drain.MARKED:
                outcome.marked.append(n.node)
                say(f"{n.node}: in the session of user {n.user}, terminated when it ends")
            if result.code is Drain.CHANGED:
                changed.append(n.node)
    if (len(ready), len(booting)) != state.seen:
        state.seen, state.last_change = (len(ready), len(booting)), clock()
    pool = await supply(client, keys)  # again: the marks may have taken a while
    if state.batched and pool.lock == state.batch_lock:
        state.waiting = "a replica to decide after the last drain"
    elif not ready and not booting and changed:
        # A session ended (or began) since the listing: its node may be ready to go now, which
        # the listing does not say. A review: the session of the only old node ended before
        # its mark, and the run said "done" with that node back in the pool, never replaced.
        # (Not a round's end for every refusal: one refused at every round, a score edited by
        # hand, then held back every batch.)
        state.waiting = (f"{', '.join(changed)} listed again (its session changed as it was "
                         "marked)")
    elif not ready and not booting:
        # The last batch's replacements are reserved; their boots are the pool's. Waiting
        # for its ready nodes to meet its keep level too never ended under steady demand
        # (a review), where connects keep them below it.
        outcome.done = True
        outcome.in_sessions = [n.node for n in old if n.state == "allocated"]
        return True
    elif pool.keep is None:
        state.waiting = "a first decision of the pool"
    elif pool.held < at_once:
        # A decision with no hold in it: made before the hold, or by a replica of a release
        # that does not hold one (a review's replica of the release before; its keep level
        # left the batch nothing booted in its place).
        state.waiting = f"a decision that holds {at_once} spare node(s)"
    elif (batch := _batch(pool, at_once, max_unavailable)) <= 0:
        state.waiting = "the pool's ready nodes, less the users waiting, to meet its keep level"
        state.short = f" ({pool.free} against {pool.keep})"
        if max_unavailable:
            state.short = (f" ({pool.free} against {pool.keep}; {_needed(pool, max_unavailable)}"
                           f" for --max-unavailable {max_unavailable})")
    elif ready:
        drained: list[str] = []
        # The last batch's replacements are booted: as it goes, the hold goes down with it,
        # or the pool boots as many again (and reaps them idle later).
        last = batch >= len(ready) and not booting
        try:
            for node in ready[:batch]:
                result = await scripts.drain_node(now, node, by + TAG, log_len,
                                                  expected="ready", run=run, last=last)
                if result.code is Drain.NOT_HELD:
                    return _taken_back(outcome, result)
                if result.code is Drain.DRAINING:
                    drained.append(node)
                    # A batch refused part way is a batch all the same: the next one waits
                    # for a decision after it (a review: one refused after its first drain
                    # lost it, and the next round drained two more with no decision between).
                    state.batch_lock, state.batched = pool.lock, True
        finally:
            if drained:
                outcome.drained += drained
                state.last_change = clock()
                say(f"{', '.join(drained)}: drained (ready); "
                    f"{len(ready) - len(drained) + len(booting)} ready or booting to go")
                state.said = ""
        if drained:
            state.batch_lock = (await supply(client, keys)).lock
    else:
        state.waiting = f"{len(booting)} old node(s) to finish booting"
    return False


def _needed(pool: Supply, max_unavailable: int) -> int:
    """The ready nodes (less the users waiting) the pool needs for a batch to go: its keep
    level with the spare held, so each batch was booted before it goes; with
    `max_unavailable`, its own keep level (the spare left out) less that many, plus the node
    that goes, and two at least, so the last ready node never goes (a review: at
    `--max-unavailable 1` a pool at a floor of one was drained to none, and the next connect
    waited)."""
    keep = pool.keep or 0
    if not max_unavailable:
        return keep
    return max(keep - pool.held - max_unavailable + 1, 2)


def _batch(pool: Supply, at_once: int, max_unavailable: int) -> int:
    """How many ready nodes may go now: none while the pool has fewer than it needs
    (`_needed`); else `at_once`, or with `max_unavailable` as many as leave it one short of
    that (up to `at_once` more than it once the spare is ready)."""
    needed = _needed(pool, max_unavailable)
    if pool.keep is None or pool.free < needed:
        return 0
    return pool.free - needed + 1 if max_unavailable else at_once


def _taken_back(outcome: Outcome, refused: DrainResult) -> bool:
    """The run stops: its drain was refused, the hold let go (`--cancel`) or taken over by
    the run the refusal names."""
    outcome.taken_back = refused.user
    return True
