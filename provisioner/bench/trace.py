"""Loading `provisioner-trace/1` workload traces (see shared/scenarios/FORMAT.md).

A trace is checked as it is read, so a replay never starts on a half-understood file: a bad
header, an unknown channel or events out of time order fail with the file and line number.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import math
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from provisioner import jsontext
from provisioner.events import ID_PATTERN, ID_RULE

FORMAT = "provisioner-trace/1"
#: How far an activity's `timestamp` may be from `epoch + t` before a replay says so: the
#: recorded traces' whole seconds run up to one early
TIMESTAMP_SLACK_S = 1.0
CHANNELS = ("user:activity", "user:connect", "user:disconnect")


class TraceError(ValueError):
    """A trace file that does not follow the format."""


@dataclass(frozen=True)
class TraceEvent:
    t: float
    channel: str
    msg: dict[str, Any]


def mean_lead_s(boot_delays: Iterable[float], api_latency_s: float) -> float:
    """The mean time from a create request to a ready node in a trace's node environment."""
    delays = list(boot_delays)
    return api_latency_s + sum(delays) / len(delays)


def counted_events(events: Iterable[TraceEvent]) -> Iterator[TraceEvent]:
    """The events as FORMAT.md counts them, in order: every activity, a connect of a user with
    no session open, a disconnect of a user with one. A repeated connect, or a disconnect with
    no session, is skipped, as the scoring skips it."""
    open_sessions: set[str] = set()
    for event in events:
        user = str(event.msg.get("user_id"))
        if event.channel == "user:connect":
            if user in open_sessions:
                continue
            open_sessions.add(user)
        elif event.channel == "user:disconnect":
            if user not in open_sessions:
                continue
            open_sessions.discard(user)
        yield event


@dataclass
class Trace:
    name: str
    description: str
    epoch: int
    duration_s: float
    boot_delays: tuple[float, ...]
    api_latency_s: float
    terminate_delay_s: float
    max_nodes: int
    events: list[TraceEvent] = field(default_factory=list)
    scored_from_s: float = 0.0  # a replay scores only what happens from here on

    def timestamps_off(self, slack_s: float = TIMESTAMP_SLACK_S) -> tuple[int, int, float]:
        """The activities whose `timestamp` is more than `slack_s` from `epoch + t`, where
        FORMAT.md puts it; of how many; and the largest distance, in seconds. The replay
        publishes each as the trace holds it, so the service places its users' browsing by it
        (the baselines read none): a trace written with another clock is scored as other
        traffic. The six recorded traces hold 200 a second early (`t` rounded up when
        written), none further."""
        off, activities, worst = 0, 0, 0.0
        for event in self.events:
            if event.channel == "user:activity":
                activities += 1
                distance = abs(event.msg["timestamp"] - (self.epoch + event.t))
                if distance > slack_s:
                    off += 1
                    worst = max(worst, distance)
        return off, activities, worst

    def with_boot_offset(self, offset: int) -> Trace:
        """The same trace with its boot-delay sequence started at index `offset` (mod its
        length): another draw of the same node environment, to judge a policy on more than one
        sequence of boots. Offset 0 is the recorded trace."""
        k = offset % len(self.boot_delays)
        return replace(self, boot_delays=self.boot_delays[k:] + self.boot_delays[:k])

    def warmed_up(self, copies: int) -> Trace:
        """The trace played `copies` times before itself, back to back, with only the last play
        scored: the policy meets the scored traffic after hours of the same kind, as a service
        that has run for a while does, not straight after its start. Each earlier copy has its
        own users (ids suffixed `.w1`, `.w2`, ...) and activity timestamps moved with it; boot
        delays run on through the sequence. 0 copies is the trace itself."""
        if copies < 0:
            raise ValueError(f"copies must be >= 0, got {copies}")
        if copies == 0:
            return self
        span = self.duration_s
        # A session still open when the trace ends would hold its node through the scored copy,
        # and closing them all at the seam would free a crowd of nodes at once (a static pool
        # pays 300 s of idle for each): in warm-up copies those users browse but do not connect.
        open_at_end: set[str] = set()
        for event in counted_events(self.events):
            if event.channel == "user:connect":
                open_at_end.add(event.msg["user_id"])
            elif event.channel == "user:disconnect":
                open_at_end.discard(event.msg["user_id"])
        events: list[TraceEvent] = []
        for copy in range(copies + 1):
            shift = copy * span
            warm_up = copy < copies
            suffix = f".w{copies - copy}" if warm_up else ""
            for event in self.events:
                user = event.msg["user_id"]
                if warm_up and user in open_at_end and event.channel != "user:activity":
                    continue
                msg = dict(event.msg, user_id=_warm_up_id(user, suffix))
                if "timestamp" in msg:
                    msg["timestamp"] += int(shift)
                # rounded as the world rounds its node times (a float sum lands a hair off)
                events.append(TraceEvent(round(event.t + shift, 9), event.channel, msg))
        return replace(self, duration_s=span * (copies + 1), events=events,
                       scored_from_s=self.scored_from_s + copies * span)


def _warm_up_id(user: str, suffix: str) -> str:
    """A warm-up copy's id for `user`: the id with `suffix`, or, where that would pass the
    contract's 128 characters, the id cut short with a hash of the whole of it before the
    suffix (distinct users stay distinct)."""
    if len(user) + len(suffix) <= MAX_ID_CHARS:
        return user + suffix
    digest = hashlib.sha1(user.encode()).hexdigest()[:12]
    return f"{user[:MAX_ID_CHARS - len(suffix) - len(digest) - 1]}-{digest}{suffix}"


#: the longest user id the contract allows (provisioner/events.py ID_PATTERN)
MAX_ID_CHARS = 128
#: the longest time a trace may give in seconds (a delay, an event's t): 31 years
MAX_SECONDS = 1e9
#: the longest trace: 31 days (a replay runs through every second of it, a tick a second)
MAX_DURATION_S = 31 * 86400
#: the latest Unix time a trace's epoch or an activity's timestamp may give (year 5138)
MAX_UNIX_S = 10**11


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _number(value: object, what: str, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number, got {_shown(value)}")
    # compared before any float(): an integer of 400 digits does not fit one
    if not minimum <= value <= MAX_SECONDS or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number in [{minimum}, {MAX_SECONDS:.0e}], "
                         f"got {_shown(value)}")
    return float(value)


def _duration(value: object) -> float:
    duration = _number(value, "duration_s")
    if duration > MAX_DURATION_S:
        raise ValueError(f"duration_s must be at most {MAX_DURATION_S} (31 days: a replay "
                         f"ticks through every second), got {_shown(value)}")
    return duration


def _whole(value: object) -> int | None:
    """`value` as an integer, if it is one: a JSON integer, or a number with no fraction
    (`10.0`, as a writer that keeps every number a float writes one), not a boolean."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _unix_seconds(value: object, what: str) -> int:
    whole = _whole(value)
    if whole is None or not 0 <= whole <= MAX_UNIX_S:
        raise ValueError(f"{what} must be an integer in [0, {MAX_UNIX_S}], got {_shown(value)}")
    return whole


def _header(obj: object) -> Trace:
    if not isinstance(obj, dict):
        raise ValueError("header is not a JSON object")
    if obj.get("format") != FORMAT:
        raise ValueError(f"format is {obj.get('format')!r}, expected {FORMAT!r}")
    nodes = obj.get("nodes")
    if not isinstance(nodes, dict):
        raise ValueError("header has no 'nodes' object")
    delays = nodes.get("boot_delay_s")
    if not isinstance(delays, list) or not delays:
        raise ValueError("nodes.boot_delay_s must be a non-empty list")
    max_nodes = _whole(nodes.get("max_nodes"))
    if max_nodes is None or max_nodes < 0:
        raise ValueError("nodes.max_nodes must be a non-negative integer, got "
                         f"{_shown(nodes.get('max_nodes'))}")
    epoch = _unix_seconds(obj.get("epoch"), "epoch")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("name must be a non-empty string")
    description = obj.get("description", "")
    if not isinstance(description, str):
        raise ValueError("description must be a string")
    return Trace(
        name=name,
        description=description,
        epoch=epoch,
        duration_s=_duration(obj.get("duration_s")),
        boot_delays=tuple(_number(d, "nodes.boot_delay_s[]") for d in delays),
        api_latency_s=_number(nodes.get("api_latency_s"), "nodes.api_latency_s"),
        terminate_delay_s=_number(nodes.get("terminate_delay_s"), "nodes.terminate_delay_s"),
        max_nodes=max_nodes,
    )


#: Each channel's payload's fields (the wire contract): what a trace's `msg` may hold.
PAYLOAD_FIELDS = {"user:activity": frozenset({"user_id", "timestamp"}),
                  "user:connect": frozenset({"user_id"}),
                  "user:disconnect": frozenset({"user_id"})}


def _event(obj: object) -> TraceEvent:
    if not isinstance(obj, dict):
        raise ValueError("event is not a JSON object")
    t = _number(obj.get("t"), "t")
    channel = obj.get("ch")
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}")
    msg = obj.get("msg")
    if not isinstance(msg, dict) or not isinstance(msg.get("user_id"), str):
        raise ValueError("msg must be an object with a string user_id")
    if not ID_PATTERN.match(msg["user_id"]):  # the service would drop its every event
        # the rule whole: '_u' was refused as not "1-128 of A-Z a-z 0-9 . _ : @ -", all of it
        raise ValueError(f"user_id {_shown(msg['user_id'])} is not an id the contract allows "
                         f"({ID_RULE})")
    if channel == "user:activity":
        _unix_seconds(msg.get("timestamp"), "activity timestamp")
    # The payload exactly, as the contract has it: a replay publishes `msg` as it is, and a
    # hand-made trace's extra field (a connect's timestamp, of the trace's epoch) went out on
    # the wire (a review).
    extra = sorted(set(msg) - PAYLOAD_FIELDS[channel])
    if extra:
        raise ValueError(f"msg of {channel} has fields its payload has not: "
                         f"{', '.join(_shown(name) for name in extra[:5])}")
    return TraceEvent(t, channel, msg)


def parse_lines(lines: Iterable[str], source: str = "<trace>") -> Trace:
    """Parse a trace from its text lines; `source` names the file in error messages."""
    trace: Trace | None = None
    last_t = 0.0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = jsontext.loads(line)
            if trace is None:
                trace = _header(obj)
                continue
            event = _event(obj)
        except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
            raise TraceError(f"{source}:{number}: {exc}") from exc
        if event.t < last_t:
            raise TraceError(f"{source}:{number}: event at t={event.t} is before t={last_t}")
        if event.t > trace.duration_s:
            raise TraceError(f"{source}:{number}: event at t={event.t} is after the trace's "
                             f"duration_s {trace.duration_s:g}, when its books close")
        last_t = event.t
        trace.events.append(event)
    if trace is None:
        raise TraceError(f"{source}: empty file, no header")
    return trace


def load_trace(path: str | Path) -> Trace:
    """Read a `.jsonl.gz` (by its gzip magic, whatever the name) or plain `.jsonl` trace."""
    return _read(Path(path), parse_lines)


def trace_header(path: str | Path) -> Trace:
    """A trace's header (its name, duration and quotas), read without its events."""
    def header_only(lines: Iterable[str], source: str) -> Trace:
        return parse_lines(itertools.islice((line for line in lines if line.strip()), 1),
                           source)
    return _read(Path(path), header_only)


def trace_name(path: str | Path) -> str:
    """The name in a trace's header, read without its events."""
    return trace_header(path).name


def _read(path: Path, parse: Callable[[Iterable[str], str], Trace]) -> Trace:
    try:
        with path.open("rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
        # utf-8-sig: a byte-order mark some editors and writers put first is read as none
        if gzipped:
            with gzip.open(path, "rt", encoding="utf-8-sig") as text:
                return parse(text, str(path))
        with path.open(encoding="utf-8-sig") as text:
            return parse(text, str(path))
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        # zlib.error: a gzip stream damaged inside its compressed data
        raise TraceError(f"{path}: {exc}") from exc
