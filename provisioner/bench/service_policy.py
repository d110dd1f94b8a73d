"""The shipped service as a replay policy: the real Lua scripts in a real server, on virtual time.

Each trace message goes through `Replica.handle` (the live listener's `handle_many`, one message
at a time; a live burst sends the same script calls in one pipeline) and each tick through
`Replica.tick`, with a `ManualClock` set to the event's virtual time and a Node API that creates
and deletes nodes in the replay world. What the scripts decide (a hit, a miss, a waiting user
served, a release) is reported to the world, which checks it against its own books. Nothing of
the policy is re-implemented here.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from provisioner.bench.bar import SERVICE
from provisioner.bench.world import World
from provisioner.clock import ManualClock
from provisioner.config import PoolConfig, ServiceConfig
from provisioner.keys import PoolKeys
from provisioner.nodeapi import CreateOutcome, CreateResult, DeleteOutcome, ListedNode
from provisioner.scripts import (
    FORECAST_TERMS,
    AllocateResult,
    Allocation,
    ForecastCheck,
    NodeStatusResult,
    Release,
    ReleaseResult,
    Scripts,
    Served,
    Snapshot,
    as_text,
    clear_pool,
    finite_number,
)
from provisioner.service import Replica

#: the service as a replay policy: the name its result rows carry (defined once, in bar.py)
NAME = SERVICE
#: where the node was missing, as `Miss.kind` tells it
MISS_KINDS = ("behind", "booting", "short")


class ModelRefused(ValueError):
    """The model given to start the replay from (`--model`) was refused by the pool's own
    check (lua/load_model.lua)."""


@dataclass(frozen=True)
class Miss:
    """A connect that found no ready node, with the pool's last scaling decision before it:
    what an operator would read in `provisioner status` at that moment."""

    t: float  # seconds since the trace's start
    user_id: str
    scored: bool  # inside the scored play (not a warm-up copy)
    decided_t: float | None  # when that decision was taken; None before the first tick
    reason: str  # the miss as logged: what the pool held against its target, and when
    decision: str  # that decision's whole reason, with its forecast ('' before the first tick)
    numbers: dict[str, Any]  # its observation: ready, booting, spare, target, ...

    @property
    def kind(self) -> str:
        """Where the node was missing:
        `behind`: spare was below the target (the pool had not caught up with its forecast);
        `booting`: the target was met, but some of the spare nodes were still booting;
        `short`: the target was met with ready nodes, and more connects came than it held."""
        spare = self.numbers.get("spare", 0)
        if spare < self.numbers.get("target", 0):
            return "behind"
        if self.numbers.get("booting", 0) + self.numbers.get("creating", 0) > 0:
            return "booting"
        return "short"

    def as_dict(self) -> dict[str, Any]:
        return {"t": self.t, "user_id": self.user_id, "scored": self.scored, "kind": self.kind,
                "decided_t": self.decided_t, "reason": self.reason, "decision": self.decision,
                "numbers": self.numbers}


#: what a timeline window averages over its ticks, in order
TIMELINE_MEANS = ("ready", "booting", "allocated", "spare", "target", "keep")


@dataclass
class TimelineWindow:
    """The pool over one window of a replay, sampled after each tick: the world's nodes (ready
    and free; booting, including those requested and not yet booting; allocated), the spare
    nodes they make, the target the tick set and the keep level the reaper held (the highest
    target of the keep window), as means over the window's ticks; the share of ticks decided
    in a surge, and the nodes created in the window."""

    from_s: float
    to_s: float
    scored: bool  # inside the scored play (not a warm-up copy)
    ticks: int = 0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMELINE_MEANS, 0.0))
    surge_ticks: int = 0
    creates: int = 0
    #: counted connects in the window (hits and misses), to set beside the forecast
    connects: int = 0
    #: the forecast's terms (the decisions' numbers.forecast) summed over the ticks that had them
    forecast_sums: dict[str, float] = field(default_factory=dict)
    forecast_ticks: int = 0

    def add(self, values: dict[str, float], surge: bool,
            forecast: Mapping[str, object] | None = None) -> None:
        for name in TIMELINE_MEANS:
            self.sums[name] += values[name]
        self.ticks += 1
        self.surge_ticks += surge
        terms = {term: value for term in FORECAST_TERMS
                 if (value := finite_number((forecast or {}).get(term))) is not None}
        if len(terms) == len(FORECAST_TERMS):  # all of them, or none: a mean of like ticks
            for term, value in terms.items():
                self.forecast_sums[term] = self.forecast_sums.get(term, 0.0) + value
            self.forecast_ticks += 1

    def as_dict(self) -> dict[str, Any]:
        n = max(1, self.ticks)
        shown: dict[str, Any] = {
            "from_s": self.from_s, "to_s": self.to_s, "scored": self.scored,
            "ticks": self.ticks, **{k: round(self.sums[k] / n, 3) for k in TIMELINE_MEANS},
            "surge_share": round(self.surge_ticks / n, 4), "creates": self.creates,
            "connects": self.connects}
        if self.forecast_ticks:  # the heuristic policy has no terms
            shown["forecast"] = {term: round(self.forecast_sums[term] / self.forecast_ticks, 4)
                                 for term in FORECAST_TERMS}
        return shown


class WorldNodeApi:
    """The Node API of the replay world: a create or delete takes effect at the current
    virtual instant; the world sends `node:status` on its own schedule."""

    has_no_list = True  # no list to take nodes back from

    def __init__(self, world: World) -> None:
        self.world = world

    async def create(self) -> CreateResult:
        node_id = self.world.create_node()
        if node_id is None:
            return CreateResult(CreateOutcome.FAILED, detail="max_nodes reached")
        return CreateResult(CreateOutcome.CREATED, node_id)

    async def delete(self, node_id: str) -> DeleteOutcome:
        return DeleteOutcome.SENT if self.world.terminate_node(node_id) else DeleteOutcome.GONE

    async def list_nodes(self) -> list[ListedNode] | None:
        return None

    async def aclose(self) -> None:
        return None


class ServicePolicy:
    """`provisioner` in the suite: the service with `pool` settings (its defaults unless
    given), one replica, against the server at `redis_url`."""

    def __init__(self, redis_url: str, pool: PoolConfig | None = None,
                 name: str = NAME, timeline_s: float | None = None,
                 model: Mapping[str, float] | None = None) -> None:
        self.name = name
        #: a learned model (`provisioner model export`'s fields) the pool starts from, not the
        #: priors; the pool's own at the end is `final_model`
        self.model = dict(model) if model else None
        self.final_model: dict[str, str] | None = None
        #: the names of its fields the forecast learns (lua/model_view.lua)
        self.final_learned: list[str] = []
        self.redis_url = redis_url
        self.pool = pool or PoolConfig()
        #: the world ticks the policy at the pool's tick interval, as the service's ticker does
        self.tick_s = self.pool.tick_interval_s
        self.pool_name = f"bench-{uuid.uuid4().hex[:12]}"
        self.keys = PoolKeys(self.pool_name)
        self._redis: aioredis.Redis | None = None
        self._replica: Replica | None = None
        self._world: World | None = None
        self._epoch_ms = 0
        self.clock = ManualClock(0)
        #: every connect that missed, in order, with the decision that preceded it
        self.misses: list[Miss] = []
        #: the pool's counters at the end of the replay (warm-up plays included), read when the
        #: policy closes
        self.final_stats: Snapshot | None = None
        if timeline_s is not None and timeline_s <= 0:
            raise ValueError("timeline_s must be positive")
        self.timeline_s = timeline_s
        #: with `timeline_s`, the pool window by window over the whole replay (warm-up included)
        self.timeline: list[TimelineWindow] = []
        self._created_before = 0
        #: provisioner.service's own level before the replay quieted it (start, close)
        self._service_log_level = logging.NOTSET

    async def start(self, world: World) -> None:
        self._world = world
        self._epoch_ms = world.trace.epoch * 1000
        self.clock = ManualClock(self._epoch_ms)
        self._redis = aioredis.Redis.from_url(self.redis_url)
        service = ServiceConfig(redis_url=self.redis_url, node_api_url="http://replay",
                                pool=self.pool_name, http_port=0, replica_id="replay")
        self._replica = Replica(self._redis, service, self.pool, WorldNodeApi(world),
                                clock=self.clock, gauges=False)
        # The replay's logs are its scores; keep the per-event log lines out of the way while
        # it runs (close gives the level back: a process going on to log, a test, read it).
        service_log = logging.getLogger("provisioner.service")
        self._service_log_level = service_log.level
        service_log.setLevel(logging.WARNING)
        if self.model:
            loaded = await Scripts(self._redis, self.keys).load_model(self.clock.now_ms(),
                                                                      self.model)
            if not loaded.loaded:
                raise ModelRefused(f"{loaded.reason}: {'; '.join(loaded.problems)}")

    @property
    def forecast_check(self) -> ForecastCheck | None:
        """The forecast's check of itself over the whole replay, once the policy has closed."""
        return self.final_stats.forecast_check() if self.final_stats is not None else None

    @property
    def replica(self) -> Replica:
        if self._replica is None:
            raise RuntimeError("the policy has not been started")
        return self._replica

    @property
    def world(self) -> World:
        if self._world is None:
            raise RuntimeError("the policy has not been started")
        return self._world

    def _at(self, t: float) -> None:
        now = self._epoch_ms + round(t * 1000)
        if now > self.clock.now_ms():
            self.clock.set(now)

    async def _handle(self, t: float, channel: str, payload: dict[str, object]) -> None:
        self._at(t)
        outcome = await self.replica.handle(channel, json.dumps(payload))
        if isinstance(outcome, AllocateResult):
            user = str(payload["user_id"])
            if outcome.code is Allocation.ALLOCATED:
                self.world.report_hit(user, outcome.node_id)
            elif outcome.code is Allocation.WAITING:
                self.world.report_miss(user)
                self.misses.append(await self._miss(t, user))
            if self.timeline_s is not None and outcome.code in (Allocation.ALLOCATED,
                                                                Allocation.WAITING):
                self._window(t, self.timeline_s).connects += 1
        elif isinstance(outcome, ReleaseResult):
            user = str(payload["user_id"])
            if outcome.code in (Release.RELEASED, Release.DRAINED):
                self.world.report_released(user)
            elif outcome.code is Release.ABANDONED:
                self.world.report_abandoned(user)
            self._served(outcome.served)
        elif isinstance(outcome, NodeStatusResult):
            self._served(outcome.served)

    async def _miss(self, t: float, user: str) -> Miss:
        """The miss allocate has just logged (one replica: it is the newest decision entry)."""
        assert self._redis is not None
        entries = await self._redis.xrevrange(self.keys.key("decisions"), count=1)
        fields = entries[0][1] if entries else None
        logged = {as_text(k): as_text(v) for k, v in (fields or {}).items()}
        if logged.get("kind") != "miss":
            raise RuntimeError(f"allocate logged no miss for {user} at t={t}")
        decided_ms = logged.get("decided_ms")
        decided_t = (int(decided_ms) - self._epoch_ms) / 1000 if decided_ms else None
        return Miss(t=t, user_id=user, scored=t >= self.world.trace.scored_from_s,
                    decided_t=decided_t, reason=logged["reason"],
                    decision=logged.get("decision", ""),
                    numbers=json.loads(logged["numbers"]))

    def _served(self, served: list[Served]) -> None:
        for item in served:
            self.world.report_served(item.user_id, item.node_id)

    async def on_activity(self, t: float, user_id: str, timestamp: int) -> None:
        await self._handle(t, "user:activity", {"user_id": user_id, "timestamp": timestamp})

    async def on_connect(self, t: float, user_id: str) -> None:
        await self._handle(t, "user:connect", {"user_id": user_id})

    async def on_disconnect(self, t: float, user_id: str) -> None:
        await self._handle(t, "user:disconnect", {"user_id": user_id})

    async def on_node_status(self, t: float, node_id: str, status: str) -> None:
        await self._handle(t, "node:status", {"node_id": node_id, "status": status})

    async def tick(self, t: float) -> None:
        self._at(t)
        await self.replica.tick()
        await self.replica.settle()
        if self.timeline_s is not None:
            await self._sample(t, self.timeline_s)

    async def _sample(self, t: float, window_s: float) -> None:
        """One tick of the timeline: the world's nodes, and the target and keep level the
        scripts hold now (the last decision's numbers; the head of the `targets` list)."""
        assert self._redis is not None
        numbers_raw = await self._redis.hget(self.keys.key("stats"), "last_numbers")
        head = await self._redis.lindex(self.keys.key("targets"), 0)
        numbers = json.loads(as_text(numbers_raw)) if numbers_raw else {}
        keep = 0
        if head:
            _, _, peak = as_text(head).partition(":")
            keep = int(peak) if peak.isdigit() else 0
        window = self._window(t, window_s)
        counts = self.world.node_counts()
        booting = counts.requested + counts.booting
        forecast = numbers.get("forecast")
        window.add({"ready": counts.ready, "booting": booting, "allocated": counts.allocated,
                    "spare": counts.ready + booting, "target": float(numbers.get("target", 0)),
                    "keep": keep}, bool(numbers.get("surge")),
                   forecast if isinstance(forecast, dict) else None)
        created = self.world.nodes_created
        window.creates += created - self._created_before
        self._created_before = created

    def _window(self, t: float, window_s: float) -> TimelineWindow:
        """The timeline's window of `t`, and those before it, made as they are reached."""
        index = int(t // window_s)
        while len(self.timeline) <= index:
            start = len(self.timeline) * window_s
            self.timeline.append(TimelineWindow(
                start, min(start + window_s, self.world.trace.duration_s),
                start >= self.world.trace.scored_from_s))
        return self.timeline[index]

    async def close(self) -> None:
        if self._redis is None:
            return
        try:
            scripts = Scripts(self._redis, self.keys)
            self.final_stats = await scripts.snapshot(self.clock.now_ms(), self.pool.window_ms)
            self.final_model = await scripts.read_model()
            self.final_learned = await scripts.learned_fields(
                self.pool.policy_args(self.clock.now_ms(), "replay"))
            await clear_pool(self._redis, self.keys)
            await self._redis.aclose()
            self._redis = None
        finally:
            # Given back however the close ends: a replay whose server went away left the
            # service's logger at WARNING for whatever the process logged next.
            logging.getLogger("provisioner.service").setLevel(self._service_log_level)
