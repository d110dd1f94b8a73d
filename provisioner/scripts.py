"""The Lua state machine, as Python calls it.

Each transition is one script in ``lua/``; this module loads them (inlining the
``--@include "includes/…"`` lines, after BullMQ's loader), calls them with the pool's key vector,
and turns their replies into typed results whose codes mirror the scripts' return codes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import Field, asdict, dataclass, field, fields
from enum import IntEnum
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Generic, TypeVar, get_type_hints

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from provisioner import jsontext
from provisioner.keys import PoolKeys

INCLUDE = re.compile(r'^--@include "([^"]+)"\s*$', re.MULTILINE)

#: Every transition of the state machine, by file name in lua/.
SCRIPT_NAMES = (
    "record_activity",
    "allocate",
    "release",
    "drain_node",
    "hold_spare",
    "apply_node_status",
    "register_node",
    "cancel_create",
    "confirm_terminate",
    "scale_decide",
    "reap_idle",
    "load_model",
    "model_view",
    "snapshot",
    "heartbeat",
    "judge_gap",
)


#: A script's error reply that says the server cannot take it for now, not that it is wrong:
#: out of memory, a replica read-only (a failover), a script running long (BUSY), a cluster
#: moving or down (MASTERDOWN with it).
_FOR_NOW = (OutOfMemoryError, ReadOnlyError, TryAgainError, ClusterDownError)


def refused_for_now(reply: object) -> bool:
    """Whether a script's reply (or the error it raised) says the server cannot take it for
    now: the listener tries such a call again, and `provisioner replace` waits it out."""
    return isinstance(reply, _FOR_NOW) or (
        isinstance(reply, ResponseError) and str(reply).startswith("BUSY "))


def lua_dir() -> Path:
    """Where the scripts are: inside the installed wheel, or lua/ beside the package."""
    shipped = resources.files("provisioner").joinpath("lua")
    if shipped.is_dir():
        return Path(str(shipped))
    return Path(__file__).resolve().parent.parent / "lua"


@cache
def load_source(name: str) -> str:
    """The script `name` with its includes inlined (each include at most once)."""
    base = lua_dir()
    included: set[str] = set()

    def inline(match: re.Match[str]) -> str:
        path = match.group(1)
        if path in included:
            return ""
        included.add(path)
        text = (base / path).read_text()
        return f"-- >>> {path}\n{INCLUDE.sub(inline, text)}\n-- <<< {path}"

    source = (base / f"{name}.lua").read_text()
    # The shebang must stay the first line, so includes are expanded below it.
    return INCLUDE.sub(inline, source)


@cache
def writes_nothing(name: str) -> bool:
    """Whether lua/NAME.lua says `flags=no-writes` on its first line: called by EVALSHA_RO
    (`read_only`)."""
    return "flags=no-writes" in load_source(name).split("\n", 1)[0]


@cache
def key_types() -> dict[str, frozenset[str]]:
    """Each pool key's type as the scripts hold it (lua/includes/keys.lua KEY_TYPES), with the
    legacy type a release before left that the scripts still take (LEGACY_TYPES): read from
    the one table the scripts check, so the operator's tools judge a key as they do."""
    source = (lua_dir() / "includes" / "keys.lua").read_text()

    def table(name: str) -> str:
        # `local NAME = {` to the first `}` that ends a line: the table's own (its entries'
        # braces are followed by a comma), whether it takes one line or several
        found = re.search(rf"^local {name} = \{{(.*?)\}}$", source, re.MULTILINE | re.DOTALL)
        if found is None:
            raise RuntimeError(f"lua/includes/keys.lua: no {name} table")
        return found.group(1)

    types = {name: {kind} for name, kind in re.findall(r"\{'(\w+)', '(\w+)'\}",
                                                      table("KEY_TYPES"))}
    for name, kind in re.findall(r"(\w+) = '(\w+)'", table("LEGACY_TYPES")):
        types[name].add(kind)
    return {name: frozenset(kinds) for name, kinds in types.items()}


@cache
def scripts_fingerprint() -> str:
    """The state machine this release runs: a digest of every script as sent to the server
    (includes inlined), 12 hex digits. Each replica says it in its heartbeat, so an operator
    sees a pool whose replicas run different releases of the scripts (an upgrade left half
    done): they may refuse each other's keys ("Key schema") and judge each other differently."""
    digest = hashlib.sha1()
    for name in sorted(SCRIPT_NAMES):
        digest.update(f"{name}\0{load_source(name)}\0".encode())
    return digest.hexdigest()[:12]


_CALLED = re.compile(r"rcall\(\s*'([A-Z]+)'|pcall\(\s*rcall\s*,\s*'([A-Z]+)'"
                     r"|'(HINCRBY(?:FLOAT)?)'")
_PUBLISHED = re.compile(r"rcall\(\s*'PUBLISH'\s*,\s*'([^']+)'")


@cache
def commands_called() -> tuple[str, ...]:
    """Every command the scripts call, and `PUBLISH CHANNEL` for each channel they publish on,
    read from their sources: what a Redis user running them must be allowed."""
    called: set[str] = set()
    for name in SCRIPT_NAMES:
        source = load_source(name)
        called.update(next(g for g in match if g) for match in _CALLED.findall(source))
        called.update(f"PUBLISH {channel}" for channel in _PUBLISHED.findall(source))
    called.discard("PUBLISH")
    return tuple(sorted(called))


# Which of ARGV (a command, or `PUBLISH CHANNEL`) the connection's user may not run, on the
# pool's keys (KEYS[1]) or that channel. Redis 7.0 or later, as every script's `#!lua` line.
_PERMITTED = """#!lua flags=no-writes
local denied = {}
for _, spec in ipairs(ARGV) do
  local cmd, channel = string.match(spec, '^(%u+) ?(.*)$')
  local allowed
  if cmd == 'PUBLISH' then
    allowed = redis.acl_check_cmd(cmd, channel, '')
  elseif cmd == 'TIME' then
    allowed = redis.acl_check_cmd(cmd)
  else  -- the pool's key alone: DEL takes each argument for a key, and "0" is none of the pool's
    allowed = redis.acl_check_cmd(cmd, KEYS[1])
  end
  if not allowed then denied[#denied + 1] = spec end
end
return denied
"""


class CommandsRefused(RedisError):
    """The connection's Redis user may not run some of the commands the scripts call: a
    replica so started would leave every transition that reaches one half made."""

    def __init__(self, denied: list[str],
                 then: str = "give the replicas' user every command and channel of the scripts",
                 ) -> None:
        super().__init__(
            f"this Redis user may not run {', '.join(denied)}, which the pool's scripts call: "
            f"a script refused part way keeps what it wrote, and leaves the pool half changed; "
            f"{then}")
        self.denied = denied


async def commands_refused(redis: aioredis.Redis, keys: PoolKeys) -> list[str]:
    """The scripts' commands (`commands_called`) the connection's Redis user may not run on
    the pool's keys: Redis undoes nothing a script wrote before a command it refused, so a
    script run by such a user stops part way and leaves its transition half made."""
    denied = await read_only(redis, redis.register_script(_PERMITTED), [keys.key("stats")],
                             list(commands_called()))
    return [as_text(one) for one in denied]


async def read_only(redis: aioredis.Redis, script: AsyncScript, keys: Sequence[Any],
                    args: Sequence[Any]) -> Any:
    """A no-writes script by EVALSHA_RO. By EVALSHA, one the server does not hold (after a
    restart, a SCRIPT FLUSH, or one no replica runs: model_view) is held as a write under
    CLIENT PAUSE WRITE, since the server cannot read its flags: `status`, `model show` and a
    replica's gauges waited out their timeout as if the server were out of reach, and a
    replica started then exited "cannot reach Redis" at its commands' check (a helper's
    drill). EVALSHA_RO is a read: the server answers NOSCRIPT at once, and the script is
    loaded (SCRIPT LOAD is not held) and called again."""
    try:
        return await redis.evalsha_ro(script.sha, len(keys), *keys, *args)
    except NoScriptError:
        await redis.script_load(script.script)
        return await redis.evalsha_ro(script.sha, len(keys), *keys, *args)


class Activity(IntEnum):
    RECORDED = 1
    DUPLICATE = 2
    STALE = 3


class Allocation(IntEnum):
    ALLOCATED = 1
    WAITING = 2
    ALREADY_ALLOCATED = 3
    ALREADY_WAITING = 4
    MADE_AGAIN = 5  # this replica's call already ran (its reply was lost): nothing done


class Release(IntEnum):
    UNKNOWN = 0
    RELEASED = 1
    ABANDONED = 2
    CHANGED = 3  # an operator's release refused: the user's state is not the one confirmed
    STALE = 4  # the user's allocation named a node whose record is not theirs: dropped, no free
    MADE_AGAIN = 5  # this replica's call already ran (its reply was lost): nothing done
    DRAINED = 6  # as RELEASED, but the node was drained in the session: it is terminating


class Drain(IntEnum):
    NOTHING = 0  # terminating, terminated or unknown; or (with its user) marked already
    DRAINING = 1  # terminating now, its DELETE due at once
    MARKED = 2  # allocated: terminated when its session ends
    CHANGED = 3  # not in the state (or the session) the operator confirmed
    CANCELLED = 4  # the mark of a node in a session taken back
    NOT_HELD = 5  # a replace run's drain, refused: the run holds the pool's spare no more


#: How long `provisioner replace`'s hold of spare nodes lasts unless renewed (each round of a
#: run renews it): a run that dies leaves the pool at its own target within this.
HOLD_LEASE_MS = 30_000


class Hold(IntEnum):
    TAKEN_BACK = 0  # renew: the run does not hold it (let go by --cancel, or another run's)
    HELD = 1  # taken or renewed
    RELEASED = 2  # let go
    NOT_HELD = 3  # release: no hold of that run


class NodeStatusOutcome(IntEnum):
    NEW = 1
    READY = 2
    TERMINATED = 3
    DUPLICATE = 4
    IGNORED = 5


class Registration(IntEnum):
    REGISTERED = 1
    ALREADY_KNOWN = 2
    LATE = 3
    TOMBSTONE = 4


@dataclass(frozen=True)
class Served:
    """A waiting user handed a node by a transition (user:allocated was published)."""

    user_id: str
    node_id: str
    waited_ms: int


def _served(flat: Sequence[Any]) -> list[Served]:
    return [
        Served(as_text(flat[i]), as_text(flat[i + 1]), int(flat[i + 2]))
        for i in range(0, len(flat), 3)
    ]


@dataclass(frozen=True)
class ActivityResult:
    code: Activity
    events_in_window: int


@dataclass(frozen=True)
class AllocateResult:
    code: Allocation
    node_id: str
    queue_position: int
    #: the connect resumed the user's session or wait, ended within 30 s (lua/allocate.lua):
    #: taught nothing to the forecast
    resumed: bool = False


@dataclass(frozen=True)
class ReleaseResult:
    code: Release
    node_id: str
    served: list[Served]


@dataclass(frozen=True)
class DrainResult:
    code: Drain
    state: str  # the node's state before (DRAINING, MARKED) or now (NOTHING, CHANGED)
    #: MARKED, or NOTHING for a node marked already: the session's user; DRAINING: the user
    #: sent back to the queue, or ''; NOT_HELD: the run that holds the spare now, or ''
    user: str
    served: list[Served]


@dataclass(frozen=True)
class NodeStatusResult:
    code: NodeStatusOutcome
    previous_state: str
    requeued_user: str
    served: list[Served]


@dataclass(frozen=True)
class RegisterResult:
    code: Registration
    state: str


@dataclass(frozen=True)
class ModelLoad:
    """What load_model did: `loaded` fields written, or why it refused (and each problem)."""

    loaded: bool
    fields: int = 0
    reason: str = ""
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Decision:
    """What scale_decide decided; `won` is False when another replica holds the interval, or
    when the pool's epoch is not the one the replica passed (`epoch_changed`: its state was
    lost since)."""

    won: bool
    reason: str = ""
    numbers: dict[str, Any] = field(default_factory=dict)
    reservations: list[str] = field(default_factory=list)
    epoch_changed: bool = False
    #: not won because the interval slot is held over a minute ahead of this replica's clock,
    #: by a replica still renewing it: one of the two clocks is wrong
    held_ahead: bool = False


@dataclass(frozen=True)
class Termination:
    node_id: str
    reason: str


@dataclass(frozen=True)
class Snapshot:
    counts: dict[str, int]
    stats: dict[str, str]

    def stat(self, name: str) -> int:
        try:
            return int(self.stats.get(name, 0))
        except ValueError:
            return 0

    def fstat(self, name: str) -> float:
        try:
            value = float(self.stats.get(name, 0))
        except ValueError:
            return 0.0
        return value if math.isfinite(value) else 0.0

    def forecast_check(self) -> ForecastCheck:
        return ForecastCheck.from_stats(self.stat, self.fstat)

    def longest_session_s(self, now_ms: int) -> float:
        """How long the longest session running at `now_ms` has held its node (0 when none
        runs): the head of the `sessions` zset, as snapshot.lua reads it."""
        oldest = self.counts.get("oldest_session_ms", 0)
        return max(0, now_ms - oldest) / 1000 if oldest else 0.0

    def longest_wait_s(self, now_ms: int) -> float | None:
        """How long the user waiting the longest at `now_ms` has waited, as snapshot.lua reads
        it from the queue: 0 when none waits, None when users wait but none of the starts it
        reads is a time (edited by hand)."""
        oldest = self.counts.get("oldest_wait_ms", 0)
        if not oldest:
            return None if self.counts.get("waiting", 0) else 0.0
        return max(0, now_ms - oldest) / 1000

    def last_decision(self) -> dict[str, float]:
        """The last scaling decision's numbers for the gauges: its target, keep level and
        spare, and for the forecast policy the terms behind the target (FORECAST_TERMS). What
        is not a finite number (a hand edit, a release before the terms) is left out."""
        try:
            numbers = jsontext.loads_finite(self.stats.get("last_numbers") or "{}")
        except ValueError:
            return {}
        if not isinstance(numbers, dict):
            return {}
        terms = numbers.get("forecast")
        found = {name: numbers.get(name) for name in DECISION_NUMBERS}
        if isinstance(terms, dict):
            found |= {name: terms.get(name) for name in FORECAST_TERMS}
        return {name: number for name, value in found.items()
                if (number := finite_number(value)) is not None}

    def scaling(self) -> ScalingTotals:
        return ScalingTotals(
            creates=self.stat("creates_reserved"), on_rise=self.stat("creates_on_rise"),
            to_refill=self.stat("creates_to_refill"),
            terminations=self.stat("terminations_started"),
            raised=self.stat("target_raised"), lowered=self.stat("target_lowered"),
            failed=self.stat("creates_failed"), unusable=self.stat("creates_unusable"),
            withdrawn=self.stat("creates_withdrawn"))


def duration_text(seconds: float) -> str:
    """Seconds as an operator reads them: 45s, 12m 5s, 3h 20m."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    return f"{s // 3600}h {s % 3600 // 60}m"


#: How far a replica's clock may be from the server's before it says so: every transition is
#: stamped with the replica's clock, and activity timestamps come in whole seconds.
CLOCK_OFFSET_WARN_S = 2.0


#: What a replica's `scripts` reads as when its heartbeat holds a value no release writes.
UNREADABLE_FINGERPRINT = "unreadable"


def _fingerprint(value: Any) -> str | None:
    """A scripts fingerprint as a heartbeat says it (hex digits); None if it says none (a
    release before the field), UNREADABLE_FINGERPRINT if it says what no release writes."""
    if value is None:
        return None
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{1,40}", value):
        return value
    return UNREADABLE_FINGERPRINT


@dataclass(frozen=True)
class ReplicaSeen:
    """A replica as its last heartbeat left it (lua/heartbeat.lua)."""

    replica_id: str
    age_s: float  # since its last heartbeat
    lag_s: float | None  # how far its listener was behind the events then
    subscribed: bool
    interval_s: float | None  # its heartbeat interval
    unsubscribed_s: float | None = None  # seconds its listener was not subscribed, in all
    clock_offset_s: float | None = None  # its clock less the server's, at its last heartbeat
    up_s: float | None = None  # since it started, by its own clock (its offset allowed for)
    other_pools: tuple[str, ...] = ()  # other pools it found listening on its server
    #: the state machine it runs (scripts_fingerprint); None: its release says none (those
    #: before the field); UNREADABLE_FINGERPRINT: a hand wrote what is not one
    scripts: str | None = None
    #: it holds its scaling decisions until the Node API lists the nodes (the pool's state
    #: new or lost: Replica._taking_back_since)
    taking_back: bool = False
    #: its server's eviction policy where that server may delete the pool's keys
    #: (Replica.look_at_eviction), else ""
    server_evicts: str = ""
    #: the pool settings it runs (PoolConfig.digest); None: its release says none, or a hand
    #: wrote what is not one (UNREADABLE_FINGERPRINT)
    settings: str | None = None

    @classmethod
    def of(cls, replica_id: str, age_ms: int, details: Any,
           server_ms: float | None = None) -> ReplicaSeen:
        """`age_ms` since its last heartbeat and `server_ms` now, both by the server's clock;
        `details` what the heartbeat said (anything: a hand may have written it)."""
        said = details if isinstance(details, dict) else {}

        def number(name: str) -> float | None:
            return finite_number(said.get(name))

        started, offset_s = number("started_ms"), number("clock_offset_s")
        # it started by its own clock: now by that clock is the server's plus its offset
        up_s = (None if started is None or server_ms is None
                else max(0.0, server_ms + (offset_s or 0.0) * 1000 - started) / 1000)
        others = said.get("other_pools")
        return cls(replica_id, max(0, age_ms) / 1000, number("lag_s"),
                   said.get("subscribed") is True, number("interval_s"),
                   number("unsubscribed_s"), offset_s,
                   None if up_s is None or not math.isfinite(up_s) else up_s,
                   tuple(str(o)[:200] for o in others[:10]) if isinstance(others, list) else (),
                   _fingerprint(said.get("scripts")), said.get("taking_back") is True,
                   evicts[:40] if isinstance(evicts := said.get("server_evicts"), str) else "",
                   _fingerprint(said.get("settings")))

    @property
    def silent(self) -> bool:
        """Not heard from for three of its heartbeats (10 s at least): stopped, or stuck."""
        return self.age_s > max(10.0, 3 * (self.interval_s or 0))

    def as_dict(self) -> dict[str, Any]:
        return {"replica": self.replica_id, "age_s": round(self.age_s, 1),
                "lag_s": None if self.lag_s is None else round(self.lag_s, 2),
                "subscribed": self.subscribed, "silent": self.silent,
                "unsubscribed_s": None if self.unsubscribed_s is None
                else round(self.unsubscribed_s, 1),
                "clock_offset_s": None if self.clock_offset_s is None
                else round(self.clock_offset_s, 3),
                "up_s": None if self.up_s is None else round(self.up_s, 1),
                "other_pools": list(self.other_pools), "scripts": self.scripts,
                "taking_back": self.taking_back, "server_evicts": self.server_evicts,
                "settings": self.settings}

    def describe(self) -> str:
        if self.silent:
            return f"{self.replica_id} silent for {self.age_s:.0f}s"
        lag = "?" if self.lag_s is None else f"{self.lag_s:.1f}s"
        listening = "" if self.subscribed else ", not subscribed"
        if self.unsubscribed_s:  # events published then did not reach it
            listening += f", unsubscribed {self.unsubscribed_s:.1f}s in all"
        if self.clock_offset_s is not None and abs(self.clock_offset_s) > CLOCK_OFFSET_WARN_S:
            listening += (f", clock {abs(self.clock_offset_s):.1f}s "
                          f"{'ahead of' if self.clock_offset_s > 0 else 'behind'} the server's")
        if self.up_s is not None:  # beside when the pool's state began, after a loss
            listening += f", up {duration_text(self.up_s)}"
        if self.other_pools:
            listening += f", another pool on its server: {', '.join(self.other_pools)}"
        if self.taking_back:  # a review: status showed nothing of the hold
            listening += ", no decision until the Node API lists the nodes it takes back"
        if self.server_evicts:
            listening += (f", its server may evict the pool's keys (maxmemory-policy "
                          f"{self.server_evicts})")
        return f"{self.replica_id} (lag {lag}{listening})"


def finite_number(value: object) -> float | None:
    """A value read from JSON (anything: a hand may have written it) as a finite float, or
    None: not a number, a bool, NaN or an infinity, or an integer too long for a float (JSON
    bounds none, and a hand-edited one of 400 digits stopped the gauges)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


#: the last decision's numbers exported as `provisioner_last_decision` (Snapshot.last_decision)
DECISION_NUMBERS = ("target", "keep", "spare")
#: the forecast policy's terms behind its target, in a decision's numbers as `forecast`
#: (lua/includes/policy.lua): connects forecast over the lead time, of them from users not
#: browsing yet, the panic factor on those, the running sessions' frees, the frees of sessions
#: begun within the lead time, the buffer and its z, and the lead time in seconds
FORECAST_TERMS = ("connects", "not_browsing_yet", "panic", "frees", "frees_of_new_sessions",
                  "buffer", "z", "lead_time_s")


@dataclass(frozen=True)
class ScalingTotals:
    """What scaling did over the pool's life (scale_decide and reap_idle's counters): creates,
    split by why they were reserved, terminations, and how far the target moved. A target that
    rises by more than a node per connect boots nodes the connects do not use."""

    creates: int  # create reservations
    on_rise: int  # ... reserved because the target rose in that tick (up to the rise)
    to_refill: int  # ... reserved to refill spare used up under a target that did not rise
    terminations: int  # terminations started (idle, stuck boots, retries)
    raised: int  # the target's rises, summed
    lowered: int  # the target's falls, summed
    failed: int = 0  # ... of the creates, those the Node API certainly did not make
    #: ... those whose node had an id the pool cannot take (made, and deleted at once)
    unusable: int = 0
    #: ... those never sent, their reservation lapsed before the call began
    withdrawn: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def describe(self) -> str:
        """One line for an operator."""
        failed = "".join(f"; {n} {said}" for n, said in (
            (self.failed, "failed at the Node API"),
            (self.unusable, "made with an id the pool cannot take, and deleted"),
            (self.withdrawn, "never sent, their reservation lapsed or too short for the "
                             "call")) if n)
        return (f"scaling: {self.creates} creates ({self.on_rise} on a rise of the target, "
                f"{self.to_refill} to refill spare used{failed}), {self.terminations} "
                f"terminations; the target raised by {self.raised} and lowered by "
                f"{self.lowered} in all")


@dataclass(frozen=True)
class ForecastCheck:
    """The forecast's check of itself (lua/includes/policy.lua check_forecast), summed over the
    pool's life: back-to-back horizons, each comparing the connects forecast at its start with
    those that came; and the same from every tick (check_sliding), overlapping."""

    checks: int
    expected: float  # connects forecast, summed over the checks
    seen: int  # connects that came
    sq_error: float  # sum of (seen - forecast)^2 over the checks
    variance: float  # sum of the forecast's variances over the checks
    above_buffer: int  # checks whose connects came above forecast + buffer_sd deviations
    above_poisson: float  # how many a Poisson count of each forecast's mean would give
    #: the buffer_sd of the latest check: a setting, not a sum (kept as `forecast_check_sd`)
    buffer_sd: float = field(metadata={"stored": "forecast_check_sd", "setting": True})
    sliding_checks: int = 0  # ticks whose forecast's lead time has passed
    sliding_above: int = 0  # of those, the ones whose connects came above forecast + buffer_sd
    sliding_above_poisson: float = 0.0  # how many a Poisson count of each mean would give
    sliding_summed: int = 0  # ticks in the sums below (all but those queued by old scripts)
    sliding_came: int = 0  # connects that came, summed over the ticks' lead times
    sliding_came_sq: int = 0  # their squares, summed
    sliding_sq_error: float = 0.0  # sum of (came - forecast)^2 over the ticks
    sliding_frees_forecast: float = 0.0  # frees forecast within their lead times, summed
    sliding_frees_came: int = 0  # releases that came within them, summed

    @classmethod
    def from_stats(cls, stat: Callable[[str], int],
                   fstat: Callable[[str], float]) -> ForecastCheck:
        """Read from the stats hash (`stat` for counts, `fstat` for sums; the keys as
        `_check_fields` names them)."""
        values: dict[str, Any] = {name: (stat if counted else fstat)(key)
                                  for name, key, counted in _check_fields()}
        return cls(**values)

    def quantities(self) -> dict[str, float]:
        """Every summed figure, by the label Prometheus exports it under (`checks` as
        `horizons`; a setting such as `buffer_sd` is not a sum, and is left out)."""
        return {"horizons" if f.name == "checks" else f.name: getattr(self, f.name)
                for f in fields(self) if not f.metadata.get("setting")}

    @property
    def seen_ratio(self) -> float | None:
        """Connects that came over those forecast: 1 if the forecast's mean is right."""
        return self.seen / self.expected if self.expected > 0 else None

    @property
    def spread_ratio(self) -> float | None:
        """Squared errors over the forecast's variances, summed over the checks: 1 if its
        spread is right."""
        return self.sq_error / self.variance if self.variance > 0 else None

    @property
    def sliding_skill(self) -> float | None:
        """1 - the ticks' squared error over that of a constant forecast at the mean of the
        connects that came: 0 if the forecast tells no more than the long-run mean, negative if
        less, 1 if exact. None until two ticks are checked and their connects differ."""
        n = self.sliding_summed
        spread = self.sliding_came_sq - self.sliding_came ** 2 / n if n > 1 else 0.0
        return 1 - self.sliding_sq_error / spread if spread > 1e-9 else None

    @property
    def frees_ratio(self) -> float | None:
        """Releases that came over the frees forecast, from every tick: 1 if the frees model is
        right, above 1 if the target counts on too few frees (and holds more than it needs)."""
        forecast = self.sliding_frees_forecast
        return self.sliding_frees_came / forecast if forecast > 0 else None

    @property
    def above_share(self) -> float | None:
        return self.above_buffer / self.checks if self.checks else None

    def as_dict(self) -> dict[str, Any]:
        """The sums (floats to 2 places; settings as set) and the ratios (to 4)."""
        types = get_type_hints(type(self))
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            is_sum = types[f.name] is float and not f.metadata.get("setting")
            out[f.name] = round(value, 2) if is_sum else value
        for name in ("seen_ratio", "spread_ratio", "above_share", "sliding_skill",
                     "frees_ratio"):
            ratio = getattr(self, name)
            out[name] = None if ratio is None else round(ratio, 4)
        return out

    def describe(self) -> str:
        """One line for an operator."""
        return "; ".join(self.describe_parts())

    def describe_parts(self) -> list[str]:
        """The line's parts: the back-to-back horizons, then (once a tick's lead time has
        passed) the check from every tick, for a view that shows them on lines of their own."""
        if not self.checks:
            return ["forecast check: no horizon checked yet"]
        parts = [f"forecast check: {self.checks} horizons, {self.seen} connects came for "
                 f"{self.expected:.1f} forecast ({self.seen_ratio or 0:.2f}x); squared error "
                 f"{self.spread_ratio or 0:.2f}x the forecast's variance; {self.above_buffer} "
                 f"above forecast + {self.buffer_sd:g} sd, {self.above_poisson:.1f} if Poisson"]
        if self.sliding_checks:
            tick = (f"from every tick: {self.sliding_above} of {self.sliding_checks} above, "
                    f"{self.sliding_above_poisson:.1f} if Poisson")
            if self.sliding_skill is not None:
                tick += f", skill {self.sliding_skill:.2f} against a constant forecast"
            parts.append(tick)
            if self.frees_ratio is not None:
                parts.append(f"frees came {self.frees_ratio:.2f}x the forecast")
        return parts


@cache
def _check_fields() -> tuple[tuple[str, str, bool], ...]:
    """ForecastCheck's fields as the stats hash stores them: (name, stored key, is a count).
    The back-to-back check's are stored as `forecast_<field>` (or under the name their metadata
    gives), the check from every tick's under their own names. Worked out once: every tick reads
    them for the gauges."""
    def stored(f: Field[Any]) -> str:
        if "stored" in f.metadata:
            return str(f.metadata["stored"])
        return f.name if f.name.startswith("sliding_") else f"forecast_{f.name}"
    types = get_type_hints(ForecastCheck)
    return tuple((f.name, stored(f), types[f.name] is int) for f in fields(ForecastCheck))


ScriptObserver = Callable[[str, float], None]
T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    """One transition to run: the script, its ARGV, and how its reply reads."""

    name: str
    args: tuple[object, ...]
    parse: Callable[[Any], T]


def _activity(reply: Any) -> ActivityResult:
    [result] = _activities(reply)
    if isinstance(result, ResponseError):
        raise result
    return result


def _activities(reply: Any) -> list[ActivityResult | ResponseError]:
    """One result per event of a record_activity call; an event the server refused is the
    error it raised (the script's {-1, message})."""
    return [ResponseError(as_text(n)) if int(code) == -1
            else ActivityResult(Activity(int(code)), int(n))
            for code, n in zip(reply[::2], reply[1::2], strict=True)]


def _allocation(reply: Any) -> AllocateResult:
    code, node, position = reply[:3]
    resumed = len(reply) > 3 and int(reply[3]) == 1
    return AllocateResult(Allocation(int(code)), as_text(node), int(position), resumed)


def _release(reply: Any) -> ReleaseResult:
    return ReleaseResult(Release(int(reply[0])), as_text(reply[1]), _served(reply[2:]))


def _drain(reply: Any) -> DrainResult:
    user = as_text(reply[2]) if len(reply) > 2 else ""
    return DrainResult(Drain(int(reply[0])), as_text(reply[1]), user, _served(reply[3:]))


def _node_status(reply: Any) -> NodeStatusResult:
    return NodeStatusResult(NodeStatusOutcome(int(reply[0])), as_text(reply[1]),
                            as_text(reply[2]), _served(reply[3:]))


@dataclass(frozen=True)
class Heartbeat:
    """What a heartbeat (lua/heartbeat.lua) answers."""

    replicas: int  # heard from within forget_ms
    forgotten: int  # older ones this call forgot
    epoch: str  # the pool's (if it had none: the server's time and the token given)
    server_ms: int  # the server's time
    #: the pool's heartbeats with this one, and when the count began (the server's ms, as
    #: text): of the same beginning, and no more than a replica's last heartbeat got, the state
    #: is an older copy; a count deleted or edited by hand begins again, with a new beginning
    count: int
    count_since: str


@dataclass(frozen=True)
class GapJudged:
    """What judge_gap (lua/judge_gap.lua) found of a gap in which a replica could not reach the
    server: whether the server served the other replicas meanwhile, and the figures behind it."""

    verdict: str  # 'pause' (it served no one), 'served' (it served others) or 'unknown'
    beats: int  # the heartbeats in the span judged
    span_ms: int  # the span judged: the gap less its edges
    needed_ms: int  # the span it takes to tell: twice the longest heartbeat interval
    beats_before: int  # the heartbeats in that length before the gap
    gap_ms: int  # from when the first unanswered try was sent to the question, server's clock
    #: why the beats cannot vouch for the pool: a replica that applies events and keeps none
    #: (heartbeats off, a release before `beats`); '' if they can
    unvouched: str = ""


#: How many times a call is made while the server answers that it does not hold the script
#: (each time redis-py loads it first): a SCRIPT FLUSH that lands between a load and a call.
NOSCRIPT_TRIES = 3


class Scripts:
    """The pool's transitions, bound to one Redis client and one pool."""

    def __init__(self, redis: aioredis.Redis, keys: PoolKeys,
                 observe: ScriptObserver | None = None) -> None:
        self.redis = redis
        self.keys = keys
        # Encoded once: every call sends the whole vector.
        self._vector = [key.encode() for key in keys.vector()]
        self._scripts: dict[str, AsyncScript] = {
            name: redis.register_script(load_source(name)) for name in SCRIPT_NAMES
        }
        self._observe = observe

    async def _call(self, name: str, *args: object) -> Any:
        started = time.perf_counter()
        call: Callable[..., Awaitable[Any]] = (
            functools.partial(read_only, self.redis, self._scripts[name])
            if writes_nothing(name) else self._scripts[name])
        try:
            for _ in range(NOSCRIPT_TRIES - 1):
                # redis-py loads a script the server does not hold and calls it once more; a
                # SCRIPT FLUSH between the two (another client's) failed the call. A script the
                # server did not hold did not run, so it is safe to call again.
                with contextlib.suppress(NoScriptError):
                    return await call(keys=self._vector, args=list(args))
            return await call(keys=self._vector, args=list(args))
        finally:
            if self._observe is not None:
                self._observe(name, time.perf_counter() - started)

    async def queue(self, pipe: Any, name: str, *args: object) -> None:
        """Queue a script call on a pipeline (bulk loads: benchmarks and tests)."""
        call: Callable[..., Awaitable[Any]] = self._scripts[name]
        await call(keys=self._vector, args=list(args), client=pipe)

    async def run(self, call: Call[T]) -> T:
        """One transition, as `call` describes it."""
        return call.parse(await self._call(call.name, *call.args))

    async def run_many(self, calls: Sequence[Call[Any]]) -> list[Any]:
        """Several transitions in one round trip, in order: each script is atomic as ever, and
        they run one after another as separate calls would (not as one transaction). Each item
        is the call's result, or the exception its script raised. A failure of the connection
        itself raises."""
        if len(calls) == 1:
            try:
                return [await self.run(calls[0])]
            except ResponseError as exc:
                return [exc]
        started = time.perf_counter()
        async with self.redis.pipeline(transaction=False) as pipe:
            for call in calls:
                await self.queue(pipe, call.name, *call.args)
            replies = await pipe.execute(raise_on_error=False)
        if self._observe is not None:
            share = (time.perf_counter() - started) / len(calls)
            for call in calls:
                self._observe(call.name, share)
        results: list[Any] = []
        for call, reply in zip(calls, replies, strict=True):
            if not isinstance(reply, Exception):
                try:
                    reply = call.parse(reply)
                except ResponseError as exc:  # a script's own error reply, read as such
                    reply = exc
            results.append(reply)
        return results

    def record_activity_call(self, now_ms: int, user_id: str, ts_ms: int, window_ms: int,
                             threshold: int, cap: int) -> Call[ActivityResult]:
        one = self.record_activities_call(now_ms, [(user_id, ts_ms)], window_ms, threshold, cap)
        return Call(one.name, one.args, _activity)

    def record_activities_call(self, now_ms: int, events: Sequence[tuple[str, int]],
                               window_ms: int, threshold: int,
                               cap: int) -> Call[list[ActivityResult | ResponseError]]:
        """Several activity events (user id, timestamp ms) in one script call, applied in order
        as one call each would apply them; one result per event, or the error the server raised
        for it (that event alone fails)."""
        if not events:
            raise ValueError("record_activities_call needs at least one event")
        args: list[object] = [now_ms, window_ms, threshold, cap]
        for user_id, ts_ms in events:
            args += (user_id, ts_ms)
        return Call("record_activity", tuple(args), _activities)

    async def record_activity(self, now_ms: int, user_id: str, ts_ms: int, window_ms: int,
                              threshold: int, cap: int) -> ActivityResult:
        return await self.run(self.record_activity_call(now_ms, user_id, ts_ms, window_ms,
                                                        threshold, cap))

    def allocate_call(self, now_ms: int, user_id: str, replica: str = "",
                      log_len: int = 1000, mark: str = "") -> Call[AllocateResult]:
        """A connect; a miss is logged to the decisions stream (at most `log_len` entries) with
        the pool's last decision before it, under `replica`. `mark`: the replica's mark of the
        call (`Replica._marks`), so that the call made again after a lost reply is not applied
        again."""
        return Call("allocate", (now_ms, user_id, replica, log_len, mark), _allocation)

    async def allocate(self, now_ms: int, user_id: str, replica: str = "",
                       log_len: int = 1000) -> AllocateResult:
        return await self.run(self.allocate_call(now_ms, user_id, replica, log_len))

    def release_call(self, now_ms: int, user_id: str, by: str = "", log_len: int = 1000,
                     expected: str = "", session_ms: int | None = None,
                     mark: str = "") -> Call[ReleaseResult]:
        """A disconnect; or, with `by`, an operator's release of the user, logged to the
        decisions stream (at most `log_len` entries) under that name, and refused (CHANGED) if
        `expected` ('node:ID', 'waiting' or 'nothing': what the operator confirmed) is not so
        now, or if the session confirmed began at `session_ms` and the one now did not.
        `mark`: a replica's mark of a disconnect's call, as for `allocate_call`."""
        args: tuple[object, ...] = (now_ms, user_id, by, log_len, expected)
        if session_ms is not None or mark:
            args += ("" if session_ms is None else session_ms,)
        if mark:
            args += (mark,)
        return Call("release", args, _release)

    async def release(self, now_ms: int, user_id: str, by: str = "", log_len: int = 1000,
                      expected: str = "", session_ms: int | None = None) -> ReleaseResult:
        return await self.run(self.release_call(now_ms, user_id, by, log_len, expected,
                                                session_ms))

    async def drain_node(self, now_ms: int, node_id: str, by: str, log_len: int = 1000,
                         expected: str = "", at_once: bool = False,
                         session_ms: int | None = None, cancel: bool = False,
                         run: str = "", last: bool = False) -> DrainResult:
        """An operator's drain of a node (lua/drain_node.lua), logged to the decisions stream
        under `by`; refused (CHANGED) if `expected` ('ready', 'booting' or 'allocated:USER':
        what the operator confirmed) is not so now, or if the session confirmed began at
        `session_ms` and the one now did not; `at_once`: an allocated node's session ends now,
        its user back at the head of the queue; `cancel`: the mark of a node in a session
        taken back instead; `run`: a replace run's, refused (NOT_HELD) unless it holds the
        pool's spare (lua/hold_spare.lua); `last`: the node is of that run's last batch, and
        its drain takes the hold one spare lower."""
        how = "cancel" if cancel else "now" if at_once else ""
        return await self.run(Call("drain_node", (
            now_ms, node_id, by, log_len, expected, how,
            "" if session_ms is None else session_ms, run, "last" if last else ""), _drain))

    async def hold_spare(self, now_ms: int, mode: str, run: str, extra: int = 1,
                         lease_ms: int = HOLD_LEASE_MS) -> tuple[Hold, str]:
        """`provisioner replace`'s hold of `extra` spare nodes above the pool's keep level
        (lua/hold_spare.lua): mode 'take', 'renew' (only the run's own), 'keep' (as renew,
        never more than it holds) or 'release' (run '' lets go of any run's); what it did,
        and the run that held it before ('' if none)."""
        reply = await self.run(Call("hold_spare", (now_ms, mode, extra, run, lease_ms),
                                    lambda r: r))
        return Hold(int(reply[0])), as_text(reply[1])

    def apply_node_status_call(self, now_ms: int, node_id: str, status: str, *,
                               listed: bool = False) -> Call[NodeStatusResult]:
        """A node's status; `listed`: read from the Node API's list, not received (a ready
        found that way teaches no boot time)."""
        args = (now_ms, node_id, status, "listed") if listed else (now_ms, node_id, status)
        return Call("apply_node_status", args, _node_status)

    async def apply_node_status(self, now_ms: int, node_id: str, status: str, *,
                                listed: bool = False) -> NodeStatusResult:
        return await self.run(self.apply_node_status_call(now_ms, node_id, status,
                                                          listed=listed))

    async def register_node(self, now_ms: int, reservation: str, node_id: str,
                            asked_ms: int | None = None) -> RegisterResult:
        args: list[object] = [now_ms, reservation, node_id]
        if asked_ms is not None:
            args.append(asked_ms)
        code, state = await self._call("register_node", *args)
        return RegisterResult(Registration(int(code)), as_text(state))

    async def cancel_create(self, reservation: str, why: str = "failed") -> bool:
        """Give a create reservation back: `failed` (no node came of its POST), `unusable`
        (a node whose id the pool cannot take, deleted) or `withdrawn` (its POST not sent)."""
        if why not in ("failed", "unusable", "withdrawn"):
            raise ValueError(f"unknown reason to cancel a create {why!r}")
        return bool(await self._call("cancel_create", reservation, why))

    async def confirm_terminate(self, now_ms: int, node_id: str, outcome: str,
                                next_deadline_ms: int) -> bool:
        if outcome not in ("sent", "gone", "failed"):
            raise ValueError(f"unknown terminate outcome {outcome!r}")
        return bool(await self._call("confirm_terminate", now_ms, node_id, outcome,
                                     next_deadline_ms))

    async def scale_decide(self, policy_args: Sequence[object]) -> Decision:
        reply = await self._call("scale_decide", *policy_args)
        if int(reply[0]) == -1:
            return Decision(won=False, epoch_changed=True)
        if int(reply[0]) == 0:
            return Decision(won=False, held_ahead=len(reply) > 1)
        return Decision(True, as_text(reply[1]), json.loads(as_text(reply[2])),
                        [as_text(r) for r in reply[3:]])

    async def reap_idle(self, policy_args: Sequence[object]) -> list[Termination]:
        reply = await self._call("reap_idle", *policy_args)
        return [Termination(as_text(reply[i]), as_text(reply[i + 1]))
                for i in range(0, len(reply), 2)]

    async def load_model(self, now_ms: int, fields: Mapping[str, float],
                         replace: bool = False) -> ModelLoad:
        """Replace the pool's learned model with `fields` (lua/load_model.lua): all of them or,
        if any is refused, none; a model the pool learned itself only with `replace`."""
        args: list[object] = [now_ms, "1" if replace else "0"]
        for name, value in fields.items():
            args += [name, repr(float(value))]
        reply = await self._call("load_model", *args)
        if int(reply[0]) == 1:
            return ModelLoad(True, int(reply[1]))
        return ModelLoad(False, 0, as_text(reply[1]), [as_text(x) for x in reply[2:]])

    async def model_view(self, policy_args: Sequence[object]) -> dict[str, Any]:
        """What the pool has learned, as the forecast reads it (lua/model_view.lua)."""
        view: dict[str, Any] = json.loads(as_text(await self._call("model_view", *policy_args)))
        return view

    async def read_model(self) -> dict[str, str]:
        """The pool's model hash as it is (one HGETALL: a consistent read)."""
        raw = await self.redis.hgetall(self.keys.key("model"))
        return {as_text(k): as_text(v) for k, v in raw.items()}

    async def learned_fields(self, policy_args: Sequence[object]) -> list[str]:
        """The names of the model's fields the forecast learns, as the scripts list them
        (model_view's `learned_fields`): what an export writes and load_model accepts."""
        return list((await self.model_view(policy_args))["learned_fields"])

    async def heartbeat(self, replica_id: str, info: Mapping[str, Any], forget_ms: int,
                        token: str = "") -> Heartbeat:
        """Record that a replica runs and what it says (lua/heartbeat.lua), stamped by the
        server's clock, and count the heartbeat."""
        reply = await self._call("heartbeat", replica_id, json.dumps(info), forget_ms,
                                 token or secrets.token_hex(6))
        return Heartbeat(int(reply[0]), int(reply[1]), as_text(reply[2]), int(reply[3]),
                         int(reply[4]), as_text(reply[5]))

    async def judge_gap(self, began_ms: int, start_edge_ms: int,
                        end_edge_ms: int) -> GapJudged:
        """Whether the server served the pool's other replicas since `began_ms` (its clock),
        as their heartbeats say (lua/judge_gap.lua)."""
        reply = await self._call("judge_gap", began_ms, start_edge_ms, end_edge_ms)
        beats, span_ms, needed_ms, before, gap_ms = (int(value) for value in reply[1:6])
        return GapJudged(as_text(reply[0]), beats, span_ms, needed_ms, before, gap_ms,
                         as_text(reply[6]))

    async def leave(self, replica_id: str) -> None:
        """A replica stopping cleanly leaves the pool's list of replicas (lua/heartbeat.lua)."""
        await self._call("heartbeat", replica_id, "{}", 0, "-", "leaving")

    async def replicas(self) -> list[ReplicaSeen]:
        """The replicas the pool has heard from, the most recent first (at most 50), aged by
        the server's clock, which stamps their heartbeats."""
        return (await self.replicas_and_epoch())[0]

    async def replicas_and_epoch(self) -> tuple[list[ReplicaSeen], str, int]:
        """The replicas (as `replicas`), the pool's epoch (empty before any heartbeat), and the
        server's time (ms) they are judged by, read at once, in a transaction: the heartbeats
        and the epoch are stamped by that clock (lua/heartbeat.lua)."""
        def reads(pipe: Any) -> None:
            pipe.zrevrange(self.keys.key("replicas"), 0, 49, withscores=True)
            pipe.hgetall(self.keys.key("replica_info"))
            pipe.get(self.keys.key("epoch"))
            pipe.time()

        seen, info, epoch, (seconds, micros) = await read_at_once(self.redis, reads)
        server_ms = seconds * 1000 + micros // 1000
        said = {as_text(k): as_text(v) for k, v in info.items()}
        out = []
        for member, score in seen:
            replica_id = as_text(member)
            try:
                details = jsontext.loads(said.get(replica_id, "{}"))
            except ValueError:
                details = {}
            # a score no heartbeat writes (inf, from another hand) reads as never heard from
            heard_ms = score if math.isfinite(score) else -math.inf
            age_ms = server_ms - heard_ms
            out.append(ReplicaSeen.of(replica_id, int(min(age_ms, 10**15)), details, server_ms))
        return out, as_text(epoch), server_ms

    async def snapshot(self, now_ms: int, window_ms: int) -> Snapshot:
        reply = await self._call("snapshot", now_ms, window_ms)
        counts = {k: int(v) for k, v in json.loads(as_text(reply[0])).items()}
        flat = [as_text(x) for x in reply[1:]]
        return Snapshot(counts, dict(zip(flat[::2], flat[1::2], strict=True)))


#: How the service's client and `as_text` turn bytes that are not UTF-8 into text and back.
ID_BYTES = "surrogateescape"


async def clear_pool(redis: aioredis.Redis, keys: PoolKeys) -> None:
    """Remove every key of a pool (a benchmark's pool before and after its run): one SCAN."""
    async for key in redis.scan_iter(match=keys.pattern(), count=1000):
        await redis.unlink(key)


async def read_at_once(redis: aioredis.Redis, queue: Callable[[Any], object]) -> list[Any]:
    """The replies of the reads `queue` puts on a pipeline, read in one transaction: one
    instant of the pool. A server out of memory refuses the transaction, reads and all (Redis
    7.0 refuses every command queued in a MULTI then; a helper's audit found `status`,
    `nodes`, `users`, `decisions` and `check` all refused): they are read again without it.
    The scripts' writes are refused too meanwhile, so the pool stands still, and that view is
    the operator's when it matters most."""
    try:
        async with redis.pipeline(transaction=True) as pipe:
            queue(pipe)
            return list(await pipe.execute())
    except OutOfMemoryError:
        pass
    async with redis.pipeline(transaction=False) as pipe:
        queue(pipe)
        return list(await pipe.execute())


def as_text(value: Any) -> str:
    """A reply value as text: bytes decoded, None as the empty string. Bytes that are not UTF-8
    (only a hand edit writes them) become lone surrogates, which a client made with
    `encoding_errors=ID_BYTES` sends back as the same bytes."""
    if isinstance(value, bytes):
        return value.decode(errors=ID_BYTES)
    return "" if value is None else str(value)
