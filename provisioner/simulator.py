"""User traffic on the wire: synthetic users in real time, or a recorded trace replayed.

Synthetic users arrive as a Poisson process. Each browses (one `user:activity` per request, gaps
drawn from an exponential, a lognormal number of requests), and a share of them then connects
(`user:connect`), holds a session of a lognormal length and disconnects; the rest browse and
leave. Everything is seeded.

A trace (`provisioner-trace/1`) is replayed at its own pace or `--speed` times faster; activity
timestamps are rewritten to the wall-clock time each is due, so the service sees fresh events
(one held while Redis does not answer keeps its due time: when its request was made).

While Redis does not answer (a restart, a stall past the client's timeout) the traffic is held,
not dropped and not ended: the event that failed is published again, with a backoff, until it
goes out, and the events behind it follow late, in order. A user's disconnect lost would leave
their node held for good, and a simulator that exits leaves a stack running with no traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import math
import random
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

import redis.asyncio as aioredis
import typer
from redis.exceptions import RedisError

from provisioner.clock import sleep_unless
from provisioner.config import redis_trouble, redis_url_option
from provisioner.logs import setup_logging

log = logging.getLogger("provisioner.simulator")


@dataclass(frozen=True)
class Traffic:
    arrival_rate_per_min: float = 20.0
    browse_gap_s: float = 8.0
    conversion: float = 0.3
    #: mean number of requests before a converting user connects
    requests_before_connect: float = 10.0
    #: mean number of requests of a user who never connects
    requests_of_browser: float = 8.0
    #: mean session length
    session_s: float = 300.0
    #: spread (sigma of the log) of the lognormal request counts and session lengths; the
    #: recorded traces fit about 0.9 and 0.8 (few connect after one or two requests, few
    #: sessions last under three minutes). 0 draws the old memoryless model: geometric counts
    #: and exponential sessions.
    requests_sigma: float = 0.9
    session_sigma: float = 0.8


def _lognormal(rng: random.Random, mean: float, sigma: float) -> float:
    """A lognormal draw with the given mean (not median)."""
    return rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)


def synthetic(traffic: Traffic, rng: random.Random,
              duration_s: float | None = None) -> Iterator[tuple[float, str, dict[str, Any]]]:
    """Yield `(seconds from start, channel, payload)` in time order, forever or for a duration.
    Activity payloads carry their offset in `timestamp`; the publisher adds the wall clock."""
    events = merge_users(traffic, rng, poisson_arrivals(traffic.arrival_rate_per_min, rng),
                         duration_s)
    return events if duration_s is None else ending_sessions(events, duration_s)


def poisson_arrivals(rate_per_min: float, rng: random.Random) -> Iterator[float]:
    """Arrival times of a Poisson process, forever; drawn one at a time, as they are needed."""
    t = 0.0
    while True:
        t += rng.expovariate(rate_per_min / 60)
        yield t


def merge_users(traffic: Traffic, rng: random.Random, arrivals: Iterator[float],
                duration_s: float | None = None) -> Iterator[tuple[float, str, dict[str, Any]]]:
    """Every message of the users arriving at `arrivals` (ascending), in time order (ties in
    the order they were drawn), up to `duration_s` if given: cut there, as the recorded traces
    are, the sessions still running left open (`ending_sessions` ends them, for a live run). It
    streams: a user's script is drawn only once no earlier message is pending, so the draws
    come in the same order whether the caller takes ten messages or all of them."""
    pending: list[tuple[float, int, str, dict[str, Any]]] = []
    seq = itertools.count()
    upcoming = next(arrivals, None)
    while True:
        while upcoming is not None and (not pending or upcoming <= pending[0][0]):
            if duration_s is not None and upcoming > duration_s:
                upcoming = None
                break
            for t, channel, payload in user_script(traffic, rng, upcoming):
                heapq.heappush(pending, (t, next(seq), channel, payload))
            upcoming = next(arrivals, None)
        if not pending:
            return
        t, _, channel, payload = heapq.heappop(pending)
        if duration_s is not None and t > duration_s:
            return
        yield t, channel, payload


def ending_sessions(events: Iterable[tuple[float, str, dict[str, Any]]], end_s: float,
                    ) -> Iterator[tuple[float, str, dict[str, Any]]]:
    """`events` as they come, then at `end_s` the disconnect of every session still running,
    in the order they connected: traffic that ends leaves no node held. A trace is cut with
    sessions running (a disconnect at its last second would read as frees to whatever counts
    them per window), so only a live run ends them."""
    running: dict[str, None] = {}
    for t, channel, payload in events:
        if channel == "user:connect":
            running[str(payload.get("user_id"))] = None
        elif channel == "user:disconnect":
            running.pop(str(payload.get("user_id")), None)
        yield t, channel, payload
    for user in running:
        yield end_s, "user:disconnect", {"user_id": user}


def user_script(traffic: Traffic, rng: random.Random,
                start: float) -> list[tuple[float, str, dict[str, Any]]]:
    """One user arriving at `start`: their requests and, if they convert, connect and
    disconnect, as `(seconds, channel, payload)` in time order."""
    user = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    converts = rng.random() < traffic.conversion
    mean = traffic.requests_before_connect if converts else traffic.requests_of_browser
    if traffic.requests_sigma > 0:
        requests = max(1, round(_lognormal(rng, mean, traffic.requests_sigma)))
    else:
        requests = 1 + int(rng.expovariate(1 / max(mean - 1, 0.01)))
    events: list[tuple[float, str, dict[str, Any]]] = []
    t = start
    for _ in range(requests):
        events.append((t, "user:activity", {"user_id": user, "timestamp": t}))
        t += rng.expovariate(1 / traffic.browse_gap_s)
    if converts:
        events.append((t, "user:connect", {"user_id": user}))
        if traffic.session_sigma > 0:
            t += _lognormal(rng, traffic.session_s, traffic.session_sigma)
        else:
            t += rng.expovariate(1 / traffic.session_s)
        events.append((t, "user:disconnect", {"user_id": user}))
    return events


def trace_events(path: Path) -> Iterator[tuple[float, str, dict[str, Any]]]:
    from provisioner.bench.trace import load_trace

    trace = load_trace(path)
    log.info("replaying %s: %d events over %ds", trace.name, len(trace.events),
             trace.duration_s)
    # the sessions a trace is cut with end at its duration, as synthetic traffic's do
    yield from ending_sessions(
        ((event.t, event.channel,
          {**event.msg, "timestamp": event.t} if event.channel == "user:activity"
          else dict(event.msg)) for event in trace.events),
        trace.duration_s)


#: Logged once the server answered at the start: from here on, a server out of reach holds the
#: traffic instead of ending the run (`bench pause` waits for it before it stops the server).
ANSWERED = "the server answered; publishing the traffic"

#: The longest wait between two tries of a publish that failed.
RETRY_MAX_S = 5.0


async def _publish_held(redis: aioredis.Redis, channel: str, data: str, stop: asyncio.Event,
                        retry_s: float) -> bool:
    """Publish one message, trying again while Redis cannot be reached (a warning when it
    first fails, every 30 s after, and when it goes out); False if stopped before it did."""
    failed_at: float | None = None
    last_said = 0.0
    wait_s = retry_s
    while True:
        try:
            await redis.publish(channel, data)
        except (OSError, RedisError) as exc:
            now = time.monotonic()
            if failed_at is None:
                failed_at = last_said = now
                log.warning("cannot publish on %s (%s): the traffic is held, trying again",
                            channel, str(exc) or type(exc).__name__)
            elif now - last_said >= 30:
                last_said = now
                log.warning("still cannot publish, for %.0fs (%s)", now - failed_at,
                            str(exc) or type(exc).__name__)
            if await sleep_unless(stop, wait_s):
                return False
            wait_s = min(wait_s * 2, RETRY_MAX_S)
            continue
        if failed_at is not None:
            log.warning("published again after %.1fs; the events held follow, late",
                        time.monotonic() - failed_at)
        return True


async def publish(redis: aioredis.Redis, events: Iterator[tuple[float, str, dict[str, Any]]],
                  speed: float, stop: asyncio.Event, *, retry_s: float = 0.25,
                  monotonic: Callable[[], float] = time.monotonic,
                  sleep: Callable[[asyncio.Event, float], Awaitable[bool]] = sleep_unless,
                  ) -> dict[str, int]:
    """Publish each event at `start + t / speed` of the wall clock, holding the traffic while
    Redis cannot be reached (see the module's notes). Told to stop, it ends the sessions whose
    connect went out, or may have (one held after a try), with `_end_sessions`. `monotonic`
    and `sleep` pace it; a test passes its own to see the pace without timing it."""
    counts: dict[str, int] = {}
    running: dict[str, None] = {}  # users whose connect went out and disconnect not yet
    started_wall = time.time()
    started = monotonic()
    last_report = started
    for t, channel, payload in events:
        delay = started + t / speed - monotonic()
        if delay > 0:
            await sleep(stop, delay)
        if stop.is_set():
            break
        if channel == "user:activity":
            payload = {**payload, "timestamp": int(started_wall + payload["timestamp"] / speed)}
        user = str(payload.get("user_id"))
        if channel == "user:connect":
            # Running from its first try on: one held when the traffic is told to stop was
            # tried at least once, and a try whose reply was lost (the server took it, then
            # stalled past the client's timeout) may have gone out. A disconnect for a user
            # who never connected changes nothing (lua/release.lua).
            running[user] = None
        if not await _publish_held(redis, channel, json.dumps(payload), stop, retry_s):
            break
        counts[channel] = counts.get(channel, 0) + 1
        if channel == "user:disconnect":
            running.pop(user, None)
        if monotonic() - last_report > 30:
            last_report = monotonic()
            log.info("published %s", counts)
    if stop.is_set() and running:
        await _end_sessions(redis, running, counts)
    return counts


async def _end_sessions(redis: aioredis.Redis, running: dict[str, None],
                        counts: dict[str, int]) -> None:
    """A disconnect for each session still running when the traffic is told to stop, in the
    order they connected: SIGTERM or Ctrl-C left each connected, its node held until
    `provisioner release`. Each is tried once, not held: the first that fails ends the try,
    with the count of sessions left running."""
    for n, user in enumerate(running):
        try:
            await redis.publish("user:disconnect", json.dumps({"user_id": user}))
        except (OSError, RedisError) as exc:
            log.warning("stopping: cannot end the sessions still running (%d; %s): their nodes "
                        "stay held until `provisioner release`", len(running) - n,
                        str(exc) or type(exc).__name__)
            return
        counts["user:disconnect"] = counts.get("user:disconnect", 0) + 1
    log.info("stopping: ended the sessions still running (%d)", len(running))


#: The options that shape synthetic traffic; a trace holds its own users, so with --trace each
#: is refused (they were ignored in silence).
SYNTHETIC_ONLY = ("arrival_rate", "browse_gap", "conversion", "requests", "session", "duration",
                  "seed")


class Parsed(Protocol):
    """A command's options as its parser read them (a typer or click context)."""

    params: dict[str, Any]

    def get_parameter_source(self, name: str) -> object: ...


def option_given(ctx: Parsed, name: str) -> bool:
    """Whether option `name` was given (on the command line, or by its variable), not left at
    its default."""
    return getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"


class CannotReach(Exception):
    """The server named cannot be reached at the start: one line, exit 2."""


def not_with_a_trace(name: str) -> typer.BadParameter:
    """The refusal of synthetic option `name` beside a --trace."""
    hint = "--" + name.replace("_", "-")
    why = ("a trace runs for its own duration_s" if name == "duration"
           else "a trace holds its own users")
    return typer.BadParameter(f"{why}; {hint} is for synthetic traffic", param_hint=hint)


def synthetic_options_refused(ctx: Parsed) -> None:
    """With a --trace, refuse an option of the synthetic traffic given with it (a
    typer.BadParameter naming it): the trace's users and span are its own. Also `dev`'s check
    of the options it passes on, before anything starts."""
    if ctx.params.get("trace") is None:
        return
    given = [name for name in SYNTHETIC_ONLY if option_given(ctx, name)]
    if given:
        raise not_with_a_trace(given[0])


def command(
    ctx: typer.Context,
    redis_url: Annotated[str, typer.Option(
        envvar="PROVISIONER_REDIS_URL", callback=redis_url_option,
        help="Redis to publish the traffic on")] = "redis://127.0.0.1:6379/0",
    # Every range is closed: an infinite rate or count would never let the traffic's clock move.
    arrival_rate: Annotated[float, typer.Option(min=0.01, max=100_000,
                                                help="New users per minute.")] = 20.0,
    browse_gap: Annotated[float, typer.Option(min=0.1, max=86_400,
                                              help="Mean seconds between requests.")] = 8.0,
    conversion: Annotated[float, typer.Option(min=0, max=1,
                                              help="Share of users who connect.")] = 0.3,
    requests: Annotated[float, typer.Option(min=1, max=10_000,
                                            help="Mean requests before a connect.")] = 10.0,
    session: Annotated[float, typer.Option(min=1, max=30 * 86_400,
                                           help="Mean session length, seconds.")] = 300.0,
    duration: Annotated[float | None, typer.Option(
        min=1, max=366 * 86_400, help="Stop the synthetic traffic after N seconds, ending "
        "the sessions still running (a --trace runs for its own duration_s).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for the synthetic users.")] = None,
    trace: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="Replay this provisioner-trace/1 file instead.")]
    = None,
    speed: Annotated[float, typer.Option(
        min=0.01, max=10_000, help="Speed-up of the traffic's clock, a trace's or the synthetic "
        "traffic's (its rates and --duration are in traffic seconds).")] = 1.0,
) -> None:
    """Publish user traffic on user:activity, user:connect and user:disconnect."""
    setup_logging()  # the service's: what a terminal acts on, in a trace's ids, escaped
    if trace is not None:
        synthetic_options_refused(ctx)
        try:
            events = trace_events(trace)
            first = next(events, None)
        except (ValueError, OSError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--trace") from None
        if first is None:
            log.info("the trace holds no events: nothing to replay")
            return
        events = itertools.chain([first], events)
    else:
        traffic = Traffic(arrival_rate, browse_gap, conversion, requests, session_s=session)
        events = synthetic(traffic, random.Random(seed), duration)

    async def main() -> None:
        redis = aioredis.Redis.from_url(redis_url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            # A server that cannot be reached at the start is an error; one told to stop while
            # it waits for the answer stops, as it would once publishing (it waited out the
            # client's timeout, then said "cannot reach Redis", exit 2: a review).
            answer = asyncio.ensure_future(redis.ping())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({answer, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not answer.done():
                answer.cancel()
                await asyncio.gather(answer, return_exceptions=True)
                log.info("stopped before the server answered: nothing published")
                return
            try:
                answer.result()
            except (OSError, RedisError) as exc:
                raise CannotReach(redis_trouble(redis_url, exc)) from None
            log.info(ANSWERED)
            counts = await publish(redis, events, speed, stop)
            log.info("done: %s", counts)
        finally:
            await redis.aclose()

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(main())
    except CannotReach as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
