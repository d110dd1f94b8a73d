"""Virtual-time replay of one trace against one policy.

The world owns the simulated Node API and the truth about nodes and users. Policies decide and
*report* what they did (hit, miss, served, released, abandoned); the world checks every report
against its own books and raises `PolicyViolation` on anything illegal, so a score is only ever
what the rules of FORMAT.md allow. Nothing here reads the wall clock or sleeps: a two-hour trace
replays in seconds and twice gives the same scores.

Order of events at the same instant (a heap keyed by (time, priority, sequence)):

1. node status events (`booting`, `ready`, `terminated`), in the order they were scheduled;
2. trace events, in file order;
3. the tick.

So a node that becomes ready at t can serve a connect at t, and a tick at t sees every message
of t. Ticks fall at t = 0, tick_s, 2·tick_s, … up to and including `duration_s` (tick_s: the
one given; else the policy's own, where it has one, as the service's tick interval; else 1 s);
events after `duration_s` are not delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from collections import Counter, OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from provisioner.bench.scoring import Scoreboard, Scores
from provisioner.bench.trace import Trace, TraceEvent


class PolicyViolation(Exception):
    """A policy reported or did something the rules do not allow."""


class Policy(Protocol):
    name: str

    async def start(self, world: World) -> None: ...

    async def on_activity(self, t: float, user_id: str, timestamp: int) -> None: ...

    async def on_connect(self, t: float, user_id: str) -> None: ...

    async def on_disconnect(self, t: float, user_id: str) -> None: ...

    async def on_node_status(self, t: float, node_id: str, status: str) -> None: ...

    async def tick(self, t: float) -> None: ...

    async def close(self) -> None: ...


class _Priority(IntEnum):
    NODE_STATUS = 0
    TRACE = 1
    TICK = 2


# Node lifecycle in the world's books. REQUESTED: create accepted, `booting` not yet emitted.
REQUESTED, BOOTING, READY, TERMINATING, TERMINATED = (
    "requested", "booting", "ready", "terminating", "terminated")


@dataclass
class _Node:
    node_id: str
    status: str
    user: str | None = None


@dataclass(frozen=True)
class _StatusChange:
    node_id: str
    status: str


@dataclass(frozen=True)
class NodeCounts:
    """Nodes by state in the world's books: ready counts the free ones only."""

    requested: int
    booting: int
    ready: int
    allocated: int
    terminating: int


class World:
    """The simulated Node API and referee for one replay; create with a trace and a policy."""

    def __init__(self, trace: Trace, policy: Policy, *, tick_s: float | None = None) -> None:
        # Given none, a policy that runs on a tick of its own (the service: its pool's tick
        # interval) is ticked at it, others every second: the replay ticked every second
        # whatever the pool's setting, and a pool set to half a second decided half as often
        # as it would live (a review). One given is kept.
        if tick_s is None:
            tick_s = getattr(policy, "tick_s", None) or 1.0
        if tick_s <= 0:
            raise ValueError("tick_s must be positive")
        self.trace = trace
        self.policy = policy
        self.tick_s = tick_s
        self.now = 0.0
        self.board = Scoreboard(trace.duration_s, trace.terminate_delay_s, trace.scored_from_s)
        self._nodes: dict[str, _Node] = {}
        self._by_status: Counter[str] = Counter()  # every node ever created, by its status now
        self._created = 0
        self._holders: dict[str, str] = {}
        self._waiting: OrderedDict[str, float] = OrderedDict()
        self._free_ready: dict[str, None] = {}  # insertion-ordered set
        self._heap: list[tuple[float, int, int, _StatusChange]] = []
        self._seq = 0
        self._answering: str | None = None  # user whose counted connect is being dispatched
        self._leaving: str | None = None  # user whose disconnect is being dispatched
        self._violation: str | None = None

    # ---- the Node API ----------------------------------------------------------------------

    @property
    def nodes_created(self) -> int:
        """Successful creates so far: the next one boots in boot_delays[nodes_created % len]."""
        return self._created

    def node_counts(self) -> NodeCounts:
        """The world's nodes now, by state (terminated ones left out). O(1): kept as they move."""
        return NodeCounts(requested=self._by_status[REQUESTED], booting=self._by_status[BOOTING],
                          ready=len(self._free_ready), allocated=len(self._holders),
                          terminating=self._by_status[TERMINATING])

    def create_node(self) -> str | None:
        """Create a node now; None when it would make more than max_nodes exist (nodes count
        from the create request until their terminate request)."""
        live = self._by_status[REQUESTED] + self._by_status[BOOTING] + self._by_status[READY]
        if live >= self.trace.max_nodes:  # ready counts free and allocated nodes alike
            return None
        delays = self.trace.boot_delays
        node_id = f"node-{self._created:06d}"
        # Rounded to the nanosecond: times are decimals (a trace's in ms), and a float sum of
        # them can land a hair after the instant it means (0.2 + 5.001 = 5.2010000000000005),
        # so a node ready at a connect's instant came after it, a miss of 1e-15 s.
        # Never before the create, though: a tick's instant (3 * 0.1) is itself a hair off.
        booting_at = max(self.now, round(self.now + self.trace.api_latency_s, 9))
        ready_at = max(booting_at, round(self.now + self.trace.api_latency_s
                                         + delays[self._created % len(delays)], 9))
        self._created += 1
        self._nodes[node_id] = _Node(node_id, REQUESTED)
        self._by_status[REQUESTED] += 1
        self.board.node_created(node_id, self.now)
        self._schedule(booting_at, _StatusChange(node_id, BOOTING))
        self._schedule(ready_at, _StatusChange(node_id, READY))
        return node_id

    def terminate_node(self, node_id: str) -> bool:
        """Terminate a node that is not allocated; False when unknown or already terminated."""
        node = self._nodes.get(node_id)
        if node is None or node.status in (TERMINATING, TERMINATED):
            return False
        if node.user is not None:
            self._violate(f"terminated {node_id}, which is allocated to {node.user}")
        if node_id in self._free_ready and self._waiting:
            # FORMAT.md: a node that becomes ready or is freed goes to the oldest waiting user.
            # Terminated instead, the user waited on, or ended the replay abandoned, which the
            # waits' percentile leaves out (found by a review: a policy could game it).
            self._violate(f"terminated {node_id}, ready and free while "
                          f"{next(iter(self._waiting))} waits")
        if node_id in self._free_ready and self._answering is not None:
            # FORMAT.md: a miss is a connect at whose instant no ready node could be assigned;
            # one terminated while the connect is answered could have been.
            self._violate(f"terminated {node_id}, ready and free while the connect of "
                          f"{self._answering} is answered")
        self._move(node, TERMINATING)
        self._free_ready.pop(node_id, None)
        self.board.node_terminate_requested(node_id, self.now)
        self._schedule(self.now + self.trace.terminate_delay_s,
                       _StatusChange(node_id, TERMINATED))
        return True

    # ---- what policies report --------------------------------------------------------------

    def report_hit(self, user_id: str, node_id: str) -> None:
        """The connecting user got a ready, free node at once."""
        self._check_answer(user_id, "hit")
        self._take(user_id, node_id)
        self.board.connect_hit(user_id, node_id, self.now)

    def report_miss(self, user_id: str) -> None:
        """The connecting user found no ready node and now waits, last in line."""
        self._check_answer(user_id, "miss")
        self._waiting[user_id] = self.now
        self.board.connect_miss(user_id, self.now)

    def report_served(self, user_id: str, node_id: str) -> None:
        """The oldest waiting user got a node that became ready or was freed."""
        head = next(iter(self._waiting), None)
        if head != user_id:
            self._violate(f"served {user_id} but the oldest waiting user is {head}")
        del self._waiting[user_id]
        self._take(user_id, node_id)
        self.board.served_after_wait(user_id, node_id, self.now)

    def report_released(self, user_id: str) -> None:
        """The disconnecting user's node is free again."""
        if self._leaving != user_id:
            self._violate(f"released {user_id}, who is not disconnecting now")
        node_id = self._holders.pop(user_id, None)
        if node_id is None:
            self._violate(f"released {user_id}, who holds no node")
            return
        self._nodes[node_id].user = None
        self._free_ready[node_id] = None
        self.board.released(user_id, self.now)

    def report_abandoned(self, user_id: str) -> None:
        """The disconnecting user was waiting and gives up."""
        if self._leaving != user_id or user_id not in self._waiting:
            self._violate(f"abandoned {user_id}, who is not a waiting user disconnecting now")
        del self._waiting[user_id]
        self.board.waiting_user_left(user_id, self.now)

    # ---- the engine ------------------------------------------------------------------------

    async def run(self) -> Scores:
        """Replay the whole trace and return the scores."""
        events = self.trace.events
        duration = self.trace.duration_s
        next_event = 0
        tick_index = 0
        try:
            await self._guard(self.policy.start(self))
            while True:
                tick_t = tick_index * self.tick_s
                candidates: list[tuple[float, int]] = [(tick_t, _Priority.TICK)]
                if next_event < len(events):
                    candidates.append((events[next_event].t, _Priority.TRACE))
                if self._heap:
                    candidates.append((self._heap[0][0], _Priority.NODE_STATUS))
                t, kind = min(candidates)
                if t > duration:
                    break
                self.now = t
                if kind == _Priority.NODE_STATUS:
                    change = heapq.heappop(self._heap)[3]
                    await self._node_status(change)
                elif kind == _Priority.TRACE:
                    await self._trace_event(events[next_event])
                    next_event += 1
                else:
                    await self._guard(self.policy.tick(t))
                    tick_index += 1
        except BaseException:
            # A replay stopped early (a broken rule, a refused model) still lets the policy
            # release what it holds: the service's pool on a server that outlives the replay
            # (`--redis-url`) would keep its keys, none of which expire.
            with contextlib.suppress(Exception):
                await self.policy.close()
            raise
        self.now = duration
        await self.policy.close()
        return self.board.close()

    def _move(self, node: _Node, status: str) -> None:
        self._by_status[node.status] -= 1
        self._by_status[status] += 1
        node.status = status

    def _schedule(self, t: float, change: _StatusChange) -> None:
        heapq.heappush(self._heap, (t, _Priority.NODE_STATUS, self._seq, change))
        self._seq += 1

    async def _node_status(self, change: _StatusChange) -> None:
        node = self._nodes[change.node_id]
        if change.status == TERMINATED:
            self._move(node, TERMINATED)
        elif node.status in (TERMINATING, TERMINATED):
            return  # terminated before it came up: it never reports booting/ready
        else:
            self._move(node, change.status)
            if change.status == READY:
                self._free_ready[node.node_id] = None
                self.board.node_ready(node.node_id, self.now)
        await self._guard(self.policy.on_node_status(self.now, change.node_id, change.status))

    async def _trace_event(self, event: TraceEvent) -> None:
        user_id: str = event.msg["user_id"]
        if event.channel == "user:activity":
            await self._guard(self.policy.on_activity(event.t, user_id, event.msg["timestamp"]))
        elif event.channel == "user:connect":
            counted = user_id not in self._holders and user_id not in self._waiting
            self._answering = user_id if counted else None
            await self._guard(self.policy.on_connect(event.t, user_id))
            if self._answering is not None:
                self._violate(f"connect of {user_id} was neither a hit nor a miss")
        else:
            self._leaving = user_id
            await self._guard(self.policy.on_disconnect(event.t, user_id))
            self._leaving = None
            if user_id in self._holders or user_id in self._waiting:
                self._violate(f"disconnect of {user_id} did not free the node or the wait")

    async def _guard(self, step: Awaitable[None]) -> None:
        """Run one policy step, then check what must hold after every step."""
        await step
        if self._violation is None and self._waiting and self._free_ready:
            self._violation = (f"{next(iter(self._free_ready))} is ready and free while "
                               f"{next(iter(self._waiting))} waits")
        if self._violation is not None:
            raise PolicyViolation(f"t={self.now}: {self._violation}")

    # ---- checks ----------------------------------------------------------------------------

    def _violate(self, message: str) -> None:
        """Record the first violation (so a policy cannot swallow it) and raise it."""
        if self._violation is None:
            self._violation = message
        raise PolicyViolation(f"t={self.now}: {self._violation}")

    def _check_answer(self, user_id: str, what: str) -> None:
        if self._answering != user_id:
            self._violate(f"{what} for {user_id}, whose counted connect is not being handled")
        self._answering = None

    def _take(self, user_id: str, node_id: str) -> None:
        node = self._nodes.get(node_id)
        if node is None or node_id not in self._free_ready:
            self._violate(f"allocated {node_id} to {user_id}, but it is not ready and free")
        if user_id in self._holders:
            self._violate(f"{user_id} would hold two nodes")
        del self._free_ready[node_id]
        self._nodes[node_id].user = user_id
        self._holders[user_id] = node_id


async def replay(trace: Trace, policy: Policy, *, tick_s: float | None = None) -> Scores:
    """Replay inside a running event loop (for policies bound to one, like a Redis client)."""
    return await World(trace, policy, tick_s=tick_s).run()


def run_replay(trace: Trace, policy: Policy, tick_s: float | None = None) -> Scores:
    """Replay `trace` against `policy` on virtual time and return its scores."""
    return run_replay_world(trace, policy, tick_s).board.close()


def run_replay_world(trace: Trace, policy: Policy, tick_s: float | None = None) -> World:
    """Replay as run_replay does, and return the world: its board gives the scores
    (`board.close()`) and more (`board.node_time()`)."""
    world = World(trace, policy, tick_s=tick_s)
    asyncio.run(world.run())
    return world
