"""Synthetic traces in other shapes than the recorded ones, to judge the default configuration on
traffic it was not tuned on.

Each shape is the simulator's user model (`provisioner.simulator.Traffic`: Poisson arrivals,
exponential browsing gaps, lognormal request counts and session lengths, a share who connect)
with an arrival rate that changes over time, and a node environment whose boot delays are drawn
from a lognormal. Arrivals of a varying rate are drawn by thinning: candidates at the shape's
highest rate, each kept with the chance rate(t) / highest rate. The users' parameters were fitted
to the quantiles of the recorded `steady` trace (`docs/benchmark.md`, "Held-out shapes"). The
result is a `provisioner-trace/1` file that `bench replay` and `bench suite` read like a
recorded one; everything follows from the seed.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioner.bench.scoring import nearest_rank
from provisioner.bench.trace import Trace, counted_events
from provisioner.simulator import Traffic, merge_users

EPOCH = 1_767_225_600  # 2026-01-01T00:00:00Z, the recorded traces' epoch
BOOT_DELAYS = 4096  # as many as the recorded traces list


@dataclass(frozen=True)
class Shape:
    """One generated workload: how many users arrive when, how they behave, how nodes boot."""

    name: str
    description: str
    #: arrival rate (new users per minute) at t seconds from the start
    rate: Callable[[float], float]
    #: browsing and sessions about as in the recorded `steady` trace (mean gap 13 s, 18
    #: requests before a connect, 23 for a user who never connects, sessions of 13 minutes,
    #: lognormal counts and lengths: see `Traffic`)
    traffic: Traffic = field(default_factory=lambda: _traffic(session_s=800.0))
    duration_s: float = 7200.0
    boot_median_s: float = 60.0
    boot_sigma: float = 0.55  # of log(delay): p90 about twice the median, as recorded
    api_latency_s: float = 0.2
    terminate_delay_s: float = 5.0
    max_nodes: int = 200
    #: which shapes `bench generate --family` writes together: "held-out" (the default, the
    #: held-out suites of docs/bench), "later" (written after the defaults were last chosen,
    #: docs/later-shapes) or "stress" (written only when named); a family keeps its
    #: composition, so its committed suites stay reproducible
    family: str = "held-out"


def _traffic(session_s: float = 800.0, conversion: float = 0.3,
             requests_before_connect: float = 18.0) -> Traffic:
    return Traffic(browse_gap_s=13.0, conversion=conversion,
                   requests_before_connect=requests_before_connect, requests_of_browser=23.0,
                   session_s=session_s)


def _steps(*points: tuple[float, float]) -> Callable[[float], float]:
    """A rate that holds each (from_s, per_min) value until the next point."""
    def rate(t: float) -> float:
        value = points[0][1]
        for start, per_min in points:
            if t >= start:
                value = per_min
        return value
    return rate


def _bursts(base: float, peak: float, starts: tuple[float, ...],
            length_s: float) -> Callable[[float], float]:
    return lambda t: peak if any(s <= t < s + length_s for s in starts) else base


SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("constant", "Steady 6 arrivals a minute, the recorded steady trace's rate: another "
          "draw of the same traffic.", lambda t: 6.0),
    Shape("ramp", "A launch: arrivals grow steadily from 1 to 12 a minute over two hours.",
          lambda t: 1.0 + 11.0 * t / 7200.0),
    Shape("step-up", "A level shift: 2 arrivals a minute, then 10 a minute from the 40th "
          "minute on, for good.", _steps((0, 2.0), (2400, 10.0))),
    Shape("step-down", "The end of an event: 12 arrivals a minute, then 2 a minute from the "
          "60th minute on.", _steps((0, 12.0), (3600, 2.0))),
    Shape("bursts", "Three 5-minute bursts of 8x the arrivals over a quiet 2 a minute.",
          _bursts(2.0, 16.0, (1500.0, 3900.0, 5700.0), 300.0)),
    Shape("two-peaks", "Two compressed days in four hours: arrivals swing 10x twice.",
          lambda t: 1.0 + 9.0 * (0.5 - 0.5 * math.cos(2 * math.pi * 2 * t / 14400.0)),
          duration_s=14400.0),
    Shape("short-sessions", "Steady 8 arrivals a minute, sessions of 90 s on average, "
          "about one boot.", lambda t: 8.0,
          traffic=_traffic(session_s=90.0)),
    Shape("long-sessions", "Steady 2 arrivals a minute, sessions of 45 minutes on average.",
          lambda t: 2.0,
          traffic=_traffic(session_s=2700.0)),
    Shape("slow-boots", "Steady 6 arrivals a minute; nodes take 3 minutes to boot (median).",
          lambda t: 6.0, boot_median_s=180.0),
    Shape("very-slow-boots", "Steady 6 arrivals a minute; nodes take 8 minutes to boot "
          "(median): a third of the boots run past the 600 s boot timeout. A stress shape, "
          "written only when named.", lambda t: 6.0, boot_median_s=480.0, family="stress"),
    # Written on 2026-12-07 (session 70), long after the defaults were last chosen, to ask
    # again whether they carry over to traffic they were not tuned on (docs/benchmark.md,
    # "Shapes written later"). Scored as they were first replayed; nothing was tuned on them.
    Shape("crowd", "A busy product: 40 arrivals a minute, steady, some 160 sessions at once.",
          lambda t: 40.0, max_nodes=400, family="later"),
    Shape("no-warning", "Steady 6 arrivals a minute; a converting user connects after about "
          "2 requests, not 18: little browsing to read.", lambda t: 6.0,
          traffic=_traffic(requests_before_connect=2.0), family="later"),
    Shape("flash", "A flash crowd: 4 arrivals a minute, and 60 a minute for 10 minutes from "
          "the 50th.", _bursts(4.0, 60.0, (3000.0,), 600.0), max_nodes=400, family="later"),
    Shape("fast-boots", "Steady 6 arrivals a minute; nodes boot in 15 s (median).",
          lambda t: 6.0, boot_median_s=15.0, family="later"),
    Shape("heavy-browsing", "30 arrivals a minute, of whom 5% connect: a crowd that mostly "
          "browses.", lambda t: 30.0, traffic=_traffic(conversion=0.05), family="later"),
    Shape("sparse", "A quiet product: 1 arrival a minute.", lambda t: 1.0, family="later"),
)}

FAMILIES = ("held-out", "later", "stress")


def family_shapes(family: str) -> list[str]:
    """The names of a family's shapes, in the order `bench generate --family` writes them."""
    return [name for name, shape in SHAPES.items() if shape.family == family]


def arrival_times(shape: Shape, rng: random.Random) -> Iterator[float]:
    """User arrival times of a Poisson process with the shape's rate, by thinning."""
    top = max(shape.rate(t) for t in range(int(shape.duration_s) + 1))  # rates change on whole s
    if top <= 0:
        return
    t = 0.0
    while True:
        t += rng.expovariate(top / 60.0)
        if t > shape.duration_s:
            return
        if rng.random() * top < shape.rate(t):
            yield t


def boot_delays(shape: Shape, rng: random.Random) -> list[float]:
    mu = math.log(shape.boot_median_s)
    return [round(max(1.0, rng.lognormvariate(mu, shape.boot_sigma)), 3)
            for _ in range(BOOT_DELAYS)]


def events(shape: Shape, rng: random.Random) -> list[tuple[float, str, dict[str, Any]]]:
    """Every message of the trace in time order, cut at the shape's duration."""
    out = []
    for t, channel, payload in merge_users(shape.traffic, rng, arrival_times(shape, rng),
                                           shape.duration_s):
        t = round(t, 3)  # as written; the timestamp must agree with the written t
        if channel == "user:activity":
            payload = {**payload, "timestamp": EPOCH + int(t)}
        out.append((t, channel, payload))
    return out


def write_trace(shape: Shape, seed: int, path: Path) -> dict[str, Any]:
    """Write one `provisioner-trace/1` file (gzip) and return its header."""
    rng = random.Random(f"{shape.name}/{seed}")
    delays = boot_delays(shape, rng)
    messages = events(shape, rng)
    header = {
        "format": "provisioner-trace/1", "name": shape.name, "description": shape.description,
        "epoch": EPOCH, "duration_s": shape.duration_s, "seed": seed,
        "users": len({m["user_id"] for _, _, m in messages}), "events": len(messages),
        "nodes": {"boot_delay_s": delays, "api_latency_s": shape.api_latency_s,
                  "terminate_delay_s": shape.terminate_delay_s, "max_nodes": shape.max_nodes},
    }
    # mtime 0 and no name in the gzip header: the same seed writes the same bytes
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", filename="",
                                                mtime=0) as packed, \
            io.TextIOWrapper(packed, encoding="utf-8") as out:
        out.write(json.dumps(header, separators=(",", ":")) + "\n")
        for t, channel, payload in messages:
            out.write(json.dumps({"t": t, "ch": channel, "msg": payload},
                                 separators=(",", ":")) + "\n")
    return header


QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def user_quantiles(trace: Trace) -> dict[str, list[float]]:
    """What a trace's users do, as quantiles (QUANTILES) of: requests before a connect, seconds
    from a connecting user's first request to the connect, session seconds (sessions that end
    within the trace), and seconds between a user's requests. Compares generated users with
    recorded ones (`bench users`)."""
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    requests: dict[str, int] = {}
    connected: dict[str, float] = {}
    samples: dict[str, list[float]] = {"requests before connect": [],
                                       "first request to connect s": [], "session s": [],
                                       "gap between requests s": []}
    for event in counted_events(trace.events):
        user = str(event.msg.get("user_id"))
        if event.channel == "user:activity":
            if user in last:
                samples["gap between requests s"].append(event.t - last[user])
            first.setdefault(user, event.t)
            last[user] = event.t
            requests[user] = requests.get(user, 0) + 1
        elif event.channel == "user:connect":
            connected[user] = event.t
            samples["requests before connect"].append(requests.get(user, 0))
            if user in first:
                samples["first request to connect s"].append(event.t - first[user])
        else:
            samples["session s"].append(event.t - connected.pop(user))
            first.pop(user, None)
            last.pop(user, None)
            requests.pop(user, None)
    return {name: _quantiles(values) for name, values in samples.items()}


def _quantiles(values: list[float]) -> list[float]:
    """QUANTILES by the scores' nearest-rank rule; NaN when there is nothing to measure."""
    if not values:
        return [math.nan] * len(QUANTILES)
    return [nearest_rank(values, 100 * q) for q in QUANTILES]
