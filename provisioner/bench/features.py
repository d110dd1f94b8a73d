"""How much a browsing user's recent pattern tells about their connect: `bench features`.

The forecast gives each browsing user the connect chance learned for their cell, level (requests
in the activity window) crossed with age (time since first seen), and sizes its buffer on the
sum of those Bernoulli variances (lua/includes/policy.lua). A richer cell pays only if it tells
the users who will connect within the horizon from those who will not. This module measures that
on a trace, offline and in hindsight: every `step` seconds it takes each browsing user as the
scripts see them (a request within the window, holding no node; first seen at the first request
since their last session ended or since a silence the scripts forget), with their level, age and
recency (seconds since their last request), and whether they connect within the horizon. Then,
for each way of cutting users into cells, with each cell's chance its share of those who
connected (fitted on the same samples: with tens of thousands of samples and at most a few dozen
cells, the flattery is small, and it flatters the richer cuts):

- the log loss per sample, against one chance for every browsing user: how much the cut knows;
- the sum of the Bernoulli variances per sample, against one chance for every user: the buffer
  is z times its square root, so this is what a sharper cut could save in stock.

The last cut is no feature a service could have: it is the shipped cells told, in hindsight,
which users will connect later (not when). It bounds what any signal of who converts could buy
beyond the shipped cells; what is left is when they connect, and users not browsing yet.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from provisioner.bench.tickcost import AGES_MS, LEVELS
from provisioner.bench.trace import Trace, counted_events, mean_lead_s
from provisioner.config import PoolConfig

WINDOW_S = PoolConfig().activity_window_s  # the service's default activity window
FORGET_S = 2 * WINDOW_S + 60  # a user silent this long is forgotten (the seen key expires)
RECENT_S = 20.0  # the recency cut: a request within this many seconds
#: The cut told who connects later: a bound, not a feature.
HINDSIGHT = "+ who connects later (hindsight)"


@dataclass(frozen=True)
class Sample:
    """One browsing user at one instant."""

    level: int  # requests (distinct seconds) within the window
    age_s: float  # seconds since first seen
    recency_s: float  # seconds since the last request
    connects: bool  # connects within the horizon
    converts: bool = False  # connects at any time later (hindsight: who, not when)


Cut = Callable[[Sample], tuple[object, ...]]


def _level(requests: int, levels: Sequence[int]) -> int:
    return sum(requests >= k for k in levels)


def _age(age_s: float) -> int:
    return sum(age_s >= limit / 1000 for limit in AGES_MS)


def _shipped(s: Sample) -> tuple[object, ...]:
    return _level(s.level, LEVELS), _age(s.age_s)


#: The cuts compared, from none to richer than the shipped one.
CUTS: dict[str, Cut] = {
    "one chance": lambda s: (),
    "level": lambda s: (_level(s.level, LEVELS),),
    "level x age (shipped)": _shipped,
    f"+ recency (<= {RECENT_S:g} s)":
        lambda s: (*_shipped(s), s.recency_s <= RECENT_S),
    "+ levels 32, 64": lambda s: (_level(s.level, (*LEVELS, 32, 64)), _age(s.age_s)),
    "+ both": lambda s: (_level(s.level, (*LEVELS, 32, 64)), _age(s.age_s),
                         s.recency_s <= RECENT_S),
    HINDSIGHT: lambda s: (*_shipped(s), s.converts),
}


@dataclass(frozen=True)
class CutScore:
    cut: str
    cells: int  # cells that held a sample
    log_loss: float  # per sample, in nats
    variance: float  # sum of the cells' Bernoulli variances, per sample

    def as_dict(self) -> dict[str, object]:
        return {"cut": self.cut, "cells": self.cells, "log_loss": round(self.log_loss, 6),
                "variance": round(self.variance, 6)}


@dataclass(frozen=True)
class Features:
    trace: str
    horizon_s: float
    samples: int
    connecting: int  # samples whose user connects within the horizon
    connects: int  # counted connects in the trace
    browsing_connects: int  # of those, by a user browsing at the connect
    scores: list[CutScore]

    def as_dict(self) -> dict[str, object]:
        return {"trace": self.trace, "horizon_s": self.horizon_s, "samples": self.samples,
                "connecting": self.connecting, "connects": self.connects,
                "browsing_connects": self.browsing_connects,
                "scores": [s.as_dict() for s in self.scores]}


def lead_time_s(trace: Trace) -> float:
    """The trace's mean boot lead time (API latency + mean boot delay), capped at the window:
    the horizon the service learns its chances over."""
    return min(mean_lead_s(trace.boot_delays, trace.api_latency_s), WINDOW_S)


@dataclass(frozen=True)
class _User:
    requests: list[float]  # distinct request seconds, in order
    runs: list[int]  # for each request, the index of the first request of its run
    sessions: list[tuple[float, float]]  # (connect, disconnect); one still open runs on forever


def _users(trace: Trace) -> dict[str, _User]:
    """Each user's requests and sessions, as FORMAT.md counts them."""
    requests: dict[str, list[float]] = {}
    sessions: dict[str, list[tuple[float, float]]] = {}
    opened: dict[str, float] = {}
    for event in counted_events(trace.events):
        user = str(event.msg.get("user_id"))
        if event.channel == "user:activity":
            second = float(math.floor(event.t))
            seen = requests.setdefault(user, [])
            if not seen or seen[-1] != second:
                seen.append(second)
        elif event.channel == "user:connect":
            opened[user] = event.t
        else:
            sessions.setdefault(user, []).append((opened.pop(user), event.t))
    for user, t in opened.items():
        sessions.setdefault(user, []).append((t, math.inf))
    return {user: _User(requests.get(user, []), _run_starts(requests.get(user, [])),
                        sessions.get(user, []))
            for user in [*requests, *(u for u in sessions if u not in requests)]}


def _run_starts(times: list[float]) -> list[int]:
    """For each request, the index of the first request of its run: the run starts afresh after
    a silence the scripts forget."""
    starts: list[int] = []
    for i, t in enumerate(times):
        starts.append(i if i == 0 or t - times[i - 1] > FORGET_S else starts[-1])
    return starts


def _browsing(user: _User, t: float) -> Sample | None:
    """The user at `t` as the scripts see them (the label left False), or None when not
    browsing: holding a node, or no request within the window since their last session."""
    ended = -math.inf
    for start, end in user.sessions:
        if start <= t < end:
            return None
        if end <= t:
            ended = max(ended, end)
    times = user.requests
    last = bisect.bisect_right(times, t) - 1
    if last < 0 or times[last] <= t - WINDOW_S or times[last] < ended:
        return None
    since = bisect.bisect_left(times, ended)
    lo = max(bisect.bisect_right(times, t - WINDOW_S), since)
    first = max(user.runs[last], since)
    return Sample(level=last - lo + 1, age_s=t - times[first], recency_s=t - times[last],
                  connects=False)


def samples(trace: Trace, horizon_s: float, step_s: float = 5.0) -> list[Sample]:
    """Every browsing user every `step_s` seconds, each labelled with whether they connect within
    the following `horizon_s` (instants closer to the end than the horizon are left out)."""
    return _samples(_users(trace), trace.duration_s, horizon_s, step_s)


def _samples(users: dict[str, _User], duration_s: float, horizon_s: float,
             step_s: float) -> list[Sample]:
    out: list[Sample] = []
    for user in users.values():
        if not user.requests:
            continue
        connects = sorted(start for start, _ in user.sessions)
        first = math.ceil(user.requests[0] / step_s)
        end = min(user.requests[-1] + WINDOW_S, duration_s - horizon_s)
        for k in range(first, math.floor(end / step_s) + 1):
            t = k * step_s
            sample = _browsing(user, t)
            if sample is not None:
                i = bisect.bisect_right(connects, t)
                later = i < len(connects)
                soon = later and connects[i] <= t + horizon_s
                out.append(Sample(sample.level, sample.age_s, sample.recency_s, soon, later))
    return out


def score_cuts(found: Sequence[Sample], cuts: dict[str, Cut] | None = None) -> list[CutScore]:
    """Each cut's log loss and Bernoulli variance per sample, its cells' chances fitted on
    `found` itself."""
    scores = []
    for name, cut in (cuts or CUTS).items():
        cells: dict[tuple[object, ...], list[int]] = {}
        for s in found:
            cell = cells.setdefault(cut(s), [0, 0])
            cell[0] += 1
            cell[1] += s.connects
        loss = variance = 0.0
        for n, k in cells.values():
            q = k / n
            variance += n * q * (1 - q)
            if 0 < k < n:
                loss -= k * math.log(q) + (n - k) * math.log(1 - q)
        total = max(1, len(found))
        scores.append(CutScore(name, len(cells), loss / total, variance / total))
    return scores


def measure(trace: Trace, horizon_s: float | None = None, step_s: float = 5.0) -> Features:
    """`bench features` for one trace (horizon: the trace's lead time, as the service learns)."""
    horizon = lead_time_s(trace) if horizon_s is None else horizon_s
    users = _users(trace)
    found = _samples(users, trace.duration_s, horizon, step_s)
    connects = browsing = 0
    for user in users.values():
        for start, _ in user.sessions:
            connects += 1
            over = [span for span in user.sessions if span[1] <= start]  # sessions already ended
            browsing += _browsing(replace(user, sessions=over), start - 1e-6) is not None
    return Features(trace.name, horizon, len(found), sum(s.connects for s in found),
                    connects, browsing, score_cuts(found))
