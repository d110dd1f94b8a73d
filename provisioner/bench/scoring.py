"""The one scorekeeper of a replay, shared by every policy so that their figures compare.

It implements the rules of FORMAT.md "How a replay is scored" and nothing else: it trusts its
caller (the world), which has already checked that every reported outcome is legal.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Scores:
    """What one replay of one trace under one policy scored.

    `wait_p95_s` is the nearest-rank 95th percentile of the waits of missed users who were
    eventually served (the ceil(0.95·n)-th smallest wait), 0.0 when no one was served after a wait.
    `miss_rate` is 0.0 without connects. `cost_ratio` is node_hours / busy_hours; it is 0.0 when no
    node was billed at all and +inf when nodes were billed but never busy.
    """

    connects: int
    misses: int
    miss_rate: float
    wait_p95_s: float
    abandoned: int
    nodes_created: int
    node_hours: float
    busy_hours: float
    cost_ratio: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class NodeTime:
    """A replay's billed node-hours split by what the nodes were doing."""

    billed_hours: float
    busy_hours: float
    booting_hours: float
    terminating_hours: float  # billed after a terminate request (FORMAT.md's terminate delay)
    idle_ready_hours: float

    def describe(self) -> str:
        return (f"node time: {self.billed_hours:.2f} h billed = {self.busy_hours:.2f} busy + "
                f"{self.booting_hours:.2f} booting + {self.idle_ready_hours:.2f} ready and idle + "
                f"{self.terminating_hours:.2f} terminating")


@dataclass(frozen=True)
class GivenUp:
    """The nodes a replay terminated, ready and idle or still booting, and how many of each a
    create followed within `within_s` (one mean boot of the trace): kept until then instead, a
    node would have idled less than a mean boot, what its replacement's boot costs on average,
    and (if it was ready) been ready at once. Each create answers for one termination at
    most."""

    within_s: float
    ready: int
    booting: int
    ready_followed: int
    booting_followed: int

    def describe(self) -> str:
        return (f"given up: {self.ready + self.booting} nodes terminated ({self.ready} ready, "
                f"{self.booting} booting); a create followed {self.ready_followed} of the "
                f"ready and {self.booting_followed} of the booting within "
                f"{self.within_s:.0f}s, one mean boot")


@dataclass(frozen=True)
class Unserved:
    """The nodes created in a replay's scored window that no session ever held (not a score of
    FORMAT.md): what they were billed in the window, and how much of that was their boot. A
    node that served none was bought for a need that did not come while it lived."""

    created: int
    unserved: int
    billed_hours: float
    booting_hours: float

    def describe(self) -> str:
        return (f"never served: {self.unserved} of the {self.created} nodes created held no "
                f"session, {self.billed_hours:.2f} h billed ({self.booting_hours:.2f} h of it "
                "booting)")


def nearest_rank(values: list[float], percentile: float) -> float:
    """Nearest-rank percentile: the smallest value with at least `percentile`% at or below it."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(percentile / 100.0 * len(ordered)))
    return ordered[rank - 1]


class Scoreboard:
    """Books of one replay; times are seconds since trace start, and the books close at
    `duration_s`: whatever is still open then (nodes, allocations, waits) ends there.

    Only what happens from `scored_from_s` on is scored: connects (and their waits) made before
    it are not counted, and node and busy time count only its part inside the window. A replay
    that warms a policy up on earlier copies of a trace scores its last copy this way."""

    def __init__(self, duration_s: float, terminate_delay_s: float,
                 scored_from_s: float = 0.0) -> None:
        if not 0.0 <= scored_from_s <= duration_s:
            raise ValueError(f"scored_from_s must be in [0, {duration_s}], got {scored_from_s}")
        self.duration_s = duration_s
        self.terminate_delay_s = terminate_delay_s
        self.scored_from_s = scored_from_s
        self._created: dict[str, float] = {}
        self._billed_until: dict[str, float] = {}
        self._ready_at: dict[str, float] = {}
        self._terminate_requested: dict[str, float] = {}
        self._allocated_at: dict[str, float] = {}
        self._served: set[str] = set()  # every node a session has held
        self._missed_at: dict[str, float] = {}
        self._waits: list[float] = []
        self._busy_s = 0.0
        self._connects = 0
        self._misses = 0
        self._abandoned = 0

    def node_created(self, node_id: str, t: float) -> None:
        """A create request was sent at `t`: billing starts now, booting time is paid."""
        self._created[node_id] = t

    def node_ready(self, node_id: str, t: float) -> None:
        """The node finished booting (for the node-time breakdown; no score depends on it)."""
        self._ready_at[node_id] = t

    def node_terminate_requested(self, node_id: str, t: float) -> None:
        """Billing runs on for the terminate delay after the request, but not past the end."""
        self._terminate_requested[node_id] = t
        self._billed_until[node_id] = min(t + self.terminate_delay_s, self.duration_s)

    def connect_hit(self, user_id: str, node_id: str, t: float) -> None:
        if self._scored(t):
            self._connects += 1
        self._allocated_at[user_id] = t
        self._served.add(node_id)

    def connect_miss(self, user_id: str, t: float) -> None:
        if self._scored(t):
            self._connects += 1
            self._misses += 1
        self._missed_at[user_id] = t

    def served_after_wait(self, user_id: str, node_id: str, t: float) -> None:
        missed = self._missed_at.pop(user_id)
        if self._scored(missed):
            self._waits.append(t - missed)
        self._allocated_at[user_id] = t
        self._served.add(node_id)

    def released(self, user_id: str, t: float) -> None:
        """The user's allocation interval ends: its part in the scored window was busy time."""
        self._busy_s += self._inside(self._allocated_at.pop(user_id), t)

    def waiting_user_left(self, user_id: str, t: float) -> None:
        """A waiting user gave up: abandoned, and the wait is not a served wait."""
        if self._scored(self._missed_at.pop(user_id)):
            self._abandoned += 1

    def _scored(self, t: float) -> bool:
        """Whether something that happened at `t` is inside the scored window."""
        return t >= self.scored_from_s

    def _inside(self, start: float, end: float) -> float:
        """Seconds of [start, end] inside the scored window."""
        return max(0.0, min(end, self.duration_s) - max(start, self.scored_from_s))

    def _booting_s(self, node: str) -> float:
        """Seconds of the scored window `node` spent booting: from its create request to ready,
        or to a terminate request before ready, or to the end."""
        end = self.duration_s
        return self._inside(self._created[node], min(self._ready_at.get(node, end),
                                                     self._terminate_requested.get(node, end)))

    def node_time(self) -> NodeTime:
        """Where the billed node time of the scored window went (not a score of FORMAT.md):
        booting (create request to ready, or to a terminate request before ready), allocated,
        after a terminate request, and the rest, ready and idle."""
        scores = self.close()
        booting_s = sum(self._booting_s(node) for node in self._created)
        terminating_s = sum(
            self._inside(requested, self._billed_until[node])
            for node, requested in self._terminate_requested.items())
        billed_h = scores.node_hours
        booting_h, terminating_h = booting_s / 3600.0, terminating_s / 3600.0
        return NodeTime(billed_h, scores.busy_hours, booting_h, terminating_h,
                        billed_h - scores.busy_hours - booting_h - terminating_h)

    def unserved(self) -> Unserved:
        """The nodes created in the scored window, and those of them no session held by the end
        of the replay, with their billed and booting time inside the window."""
        end = self.duration_s
        created = [node for node, t in self._created.items() if self._scored(t)]
        idle = [node for node in created if node not in self._served]
        billed_s = sum(self._inside(self._created[node], self._billed_until.get(node, end))
                       for node in idle)
        booting_s = sum(self._booting_s(node) for node in idle)
        return Unserved(len(created), len(idle), billed_s / 3600.0, booting_s / 3600.0)

    def given_up(self, within_s: float) -> GivenUp:
        """The scored window's terminations, split by whether the node had become ready, and
        those a later create followed within `within_s` (not a score of FORMAT.md): each
        termination in time order takes the first create after it not yet taken."""
        creates = sorted(self._created.values())
        counts = {True: [0, 0], False: [0, 0]}  # became ready: [terminated, followed]
        taken = 0  # creates before this are taken, or came before every termination left
        for t, node in sorted((t, node) for node, t in self._terminate_requested.items()
                              if self._scored(t)):
            ready = self._ready_at.get(node, math.inf) <= t
            counts[ready][0] += 1
            taken = max(taken, bisect.bisect_right(creates, t))
            if taken < len(creates) and creates[taken] - t <= within_s:
                counts[ready][1] += 1
                taken += 1
        return GivenUp(within_s, counts[True][0], counts[False][0], counts[True][1],
                       counts[False][1])

    def close(self) -> Scores:
        """Score as of `duration_s`; the board can be closed more than once with the same result."""
        end = self.duration_s
        busy_s = self._busy_s + sum(self._inside(t, end) for t in self._allocated_at.values())
        node_s = sum(
            self._inside(created, self._billed_until.get(node, end))
            for node, created in self._created.items()
        )
        node_hours = node_s / 3600.0
        busy_hours = busy_s / 3600.0
        if node_hours == 0.0:
            cost_ratio = 0.0
        elif busy_hours == 0.0:
            cost_ratio = math.inf
        else:
            cost_ratio = node_hours / busy_hours
        return Scores(
            connects=self._connects,
            misses=self._misses,
            miss_rate=self._misses / self._connects if self._connects else 0.0,
            wait_p95_s=nearest_rank(self._waits, 95.0),
            abandoned=self._abandoned + sum(map(self._scored, self._missed_at.values())),
            nodes_created=sum(map(self._scored, self._created.values())),
            node_hours=node_hours,
            busy_hours=busy_hours,
            cost_ratio=cost_ratio,
        )
