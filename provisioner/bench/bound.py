"""A reference for how little idle time a rate-based policy can spend on a trace.

A predictor that reads the activity stream can at best learn the *rates*: how many connects and
how many disconnects to expect per second. Which second they land in stays random. This module
asks what the best pool could do if it knew those rates exactly, for every window of the trace,
and nothing more:

- per window (600 s by default) the trace's own connect and disconnect counts become Poisson
  rates;
- every *band* policy is simulated on a long stationary run at those rates, against the trace's
  boot delays and FORMAT.md's rules: boot while ready + booting < s, reap the longest-idle ready
  node while ready + booting > S and it has been idle >= i seconds;
- for a multiplier theta (one miss is worth 1/theta idle node-hours) each window takes the band
  minimising idle_hours + misses / theta, and the sums over windows give one point of a frontier
  (misses, idle hours). Sweeping theta traces the frontier; the idle time at a miss rate (1%) is
  read off by interpolation.

It is a reference, not a proof: a policy family richer than bands could do better, and the
simulation has sampling noise (common random numbers across the bands of one window keep their
comparison fair; picking the best of many noisy estimates flatters the result). Two
simplifications flatter it too: frees arrive as a Poisson stream of their own, whatever the pool
did, and a missed connect is only counted, where in a replay the user waits and takes the next
node that turns ready. What it does
show is the price of Poisson randomness itself, with every rate known in advance, which no
online policy has.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from provisioner.bench.bar import MISS_RATE_LIMIT
from provisioner.bench.trace import Trace, counted_events, mean_lead_s

IDLE_CHOICES = (0.0, 60.0)
WIDTHS = (0, 1, 2, 3)  # S - s
WARMUP_S = 1_000  # longer than the traces' boots (at most 518 s): counting starts in the band
THETAS = (0.125, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0, 32.0)


@dataclass(frozen=True)
class Band:
    boot_to: int  # s: boot while ready + booting < s
    reap_above: int  # S: reap while ready + booting > S
    idle_s: float  # only nodes idle at least this long are reaped


@dataclass(frozen=True)
class BandResult:
    band: Band
    miss_prob: float  # misses per connect on the stationary run
    idle_nodes: float  # mean ready + booting nodes, plus terminate delays, per second


@dataclass(frozen=True)
class Window:
    start_s: float
    length_s: float
    connects: int
    frees: int


@dataclass(frozen=True)
class FrontierPoint:
    theta: float
    misses: float  # expected over the trace
    miss_rate: float
    idle_hours: float
    bands: tuple[Band, ...]  # chosen per window
    window_idle_hours: tuple[float, ...] = ()  # the idle hours of each window's band


#: the shortest span a window's rates are read over: a trace of a few seconds would otherwise
#: read as a rate of connects a second, and the bands to simulate for it are without number
MIN_RATE_SPAN_S = 60.0


def windows(trace: Trace, length_s: float) -> list[Window]:
    """Counted connects and disconnects (by FORMAT.md's counting rules) per window. A last
    window shorter than half a window joins the one before it. A disconnect at the trace's
    end is no free: it frees a node for no time the trace scores, and counted it would raise
    the last window's free rate (a connect there is counted, as the replay delivers it)."""
    n = max(1, math.ceil(trace.duration_s / length_s))
    if n > 1 and trace.duration_s - (n - 1) * length_s < length_s / 2:
        n -= 1
    connects, frees = [0] * n, [0] * n
    for event in counted_events(trace.events):
        if event.channel == "user:disconnect" and event.t >= trace.duration_s:
            continue
        i = min(n - 1, int(event.t // length_s))
        if event.channel == "user:connect":
            connects[i] += 1
        elif event.channel == "user:disconnect":
            frees[i] += 1
    return [Window(i * length_s,
                   length_s if i < n - 1 else trace.duration_s - i * length_s,
                   connects[i], frees[i]) for i in range(n)]


def _poisson(rnd: random.Random, mean: float) -> int:
    limit, product, n = math.exp(-mean), rnd.random(), 0
    while product > limit:
        product *= rnd.random()
        n += 1
    return n


def arrivals(connect_rate: float, free_rate: float, seconds: int,
             seed: int) -> list[tuple[bool, ...]]:
    """Per 1 s tick, the connects (True) and frees (False) of a stationary run, in the order
    they land. Every band of a window is run on the same arrivals, so bands are compared on
    equal luck."""
    rnd = random.Random(seed)
    out: list[tuple[bool, ...]] = []
    for _ in range(seconds):
        tick = [True] * _poisson(rnd, connect_rate) + [False] * _poisson(rnd, free_rate)
        rnd.shuffle(tick)
        out.append(tuple(tick))
    return out


def simulate(band: Band, ticks: list[tuple[bool, ...]], boot_delays: tuple[float, ...],
             api_latency_s: float, terminate_delay_s: float, warmup: int = 0) -> BandResult:
    """One band on 1 s ticks of `arrivals`: its miss probability and idle cost, counted from
    tick `warmup` on, so the empty pool it starts from does not weigh on a stationary figure."""
    ready: deque[float] = deque()  # idle since; oldest first, as FORMAT.md serves them
    booting: list[float] = []  # ready-at times
    created = misses = connects = reaps = 0
    node_seconds = 0
    for now, tick in enumerate(ticks):
        while booting and booting[0] <= now:
            heapq.heappop(booting)
            ready.append(now)
        counted = now >= warmup
        for is_connect in tick:
            if is_connect:
                connects += counted
                if ready:
                    ready.popleft()
                else:
                    misses += counted
            else:
                ready.append(now)
        spare = len(ready) + len(booting)
        while spare < band.boot_to:
            delay = boot_delays[created % len(boot_delays)]
            heapq.heappush(booting, now + api_latency_s + delay)
            created += 1
            spare += 1
        while spare > band.reap_above and ready and now - ready[0] >= band.idle_s:
            ready.popleft()
            reaps += counted
            spare -= 1
        node_seconds += spare if counted else 0
    cost = (node_seconds + reaps * terminate_delay_s) / max(1, len(ticks) - warmup)
    return BandResult(band, misses / connects if connects else 0.0, cost)


def candidate_bands(connect_rate: float, free_rate: float, lead_s: float) -> list[Band]:
    """Every band worth trying at these rates: boot-to levels from 0 to well past what a
    normal approximation of demand over one boot would ever ask for."""
    mean = connect_rate * lead_s
    top = math.ceil(mean + 4.0 * math.sqrt(mean + free_rate * lead_s)) + 2
    return [Band(s, s + w, i) for s in range(top + 1) for w in WIDTHS for i in IDLE_CHOICES]


@dataclass(frozen=True)
class Nodes:
    """The node environment of a trace, all a band simulation needs of it."""

    boot_delays: tuple[float, ...]
    api_latency_s: float
    terminate_delay_s: float

    @property
    def lead_s(self) -> float:
        return mean_lead_s(self.boot_delays, self.api_latency_s)


def window_results(window: Window, nodes: Nodes, seconds: int, seed: int) -> list[BandResult]:
    """Every candidate band simulated at the window's rates, on one shared draw of arrivals."""
    span = max(window.length_s, MIN_RATE_SPAN_S)
    c_rate = window.connects / span
    f_rate = window.frees / span
    ticks = arrivals(c_rate, f_rate, seconds + WARMUP_S, seed)
    return [simulate(band, ticks, nodes.boot_delays, nodes.api_latency_s,
                     nodes.terminate_delay_s, warmup=WARMUP_S)
            for band in candidate_bands(c_rate, f_rate, nodes.lead_s)]


def frontier(wins: list[Window], results: list[list[BandResult]],
             thetas: Iterable[float] = THETAS) -> list[FrontierPoint]:
    """For each theta, the band per window minimising idle hours + expected misses / theta."""
    total_connects = sum(w.connects for w in wins)
    points = []
    for theta in thetas:
        misses = idle = 0.0
        chosen = []
        idle_by_window = []
        for window, options in zip(wins, results, strict=True):
            prices = [r.idle_nodes * window.length_s / 3600 + r.miss_prob * window.connects / theta
                      for r in options]
            best = options[prices.index(min(prices))]
            hours = best.idle_nodes * window.length_s / 3600
            misses += best.miss_prob * window.connects
            idle += hours
            chosen.append(best.band)
            idle_by_window.append(hours)
        rate = misses / total_connects if total_connects else 0.0
        points.append(FrontierPoint(theta, misses, rate, idle, tuple(chosen),
                                    tuple(idle_by_window)))
    return points


def idle_at(points: list[FrontierPoint], miss_rate: float) -> float | None:
    """Idle hours at `miss_rate`, interpolated between the frontier points around it."""
    ordered = sorted(points, key=lambda p: p.miss_rate)
    for lo, hi in itertools.pairwise(ordered):
        if lo.miss_rate <= miss_rate <= hi.miss_rate:
            if hi.miss_rate == lo.miss_rate:
                return min(lo.idle_hours, hi.idle_hours)
            f = (miss_rate - lo.miss_rate) / (hi.miss_rate - lo.miss_rate)
            return lo.idle_hours + f * (hi.idle_hours - lo.idle_hours)
    return None


def poisson_at_most(k: int, mean: float) -> float:
    """P(N <= k) for N a Poisson count of this mean."""
    if k < 0:
        return 0.0
    term = total = math.exp(-mean)
    for i in range(1, k + 1):
        term *= mean / i
        total += term
    return min(1.0, total)


def chance_to_meet(point: FrontierPoint, connects: int, idle_limit_hours: float,
                   miss_rate_limit: float = MISS_RATE_LIMIT) -> float:
    """The chance that one draw of a trace meets issue 4's bar at this frontier point: its idle
    hours (the point's expectation, taken as certain) within the limit, and its misses, taken
    as a Poisson count of the point's expected misses, at most `miss_rate_limit` of the
    connects. Misses come in clumps more than a Poisson count does, so this flatters the
    oracle, as the rest of this module does."""
    if point.idle_hours > idle_limit_hours:
        return 0.0
    allowed = math.floor(miss_rate_limit * connects + 1e-9)
    return poisson_at_most(allowed, point.misses)


def rate_oracle(trace: Trace, window_s: float = 600.0, seconds: int = 50_000,
                jobs: int = 1, thetas: Iterable[float] = THETAS,
                ) -> tuple[list[Window], list[FrontierPoint]]:
    """The frontier of the best band per window, with every window's rates known exactly: one
    point per price in `thetas`."""
    wins = windows(trace, window_s)
    nodes = Nodes(trace.boot_delays, trace.api_latency_s, trace.terminate_delay_s)
    args = (wins, [nodes] * len(wins), [seconds] * len(wins), range(1_000, 1_000 + len(wins)))
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(window_results, *args))
    else:
        results = list(map(window_results, *args))
    return wins, frontier(wins, results, thetas)
