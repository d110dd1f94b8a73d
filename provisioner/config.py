"""Pool and service settings, validated at start with a clear message."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import asdict, dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

from provisioner.keys import POOL_NAME


class ConfigError(ValueError):
    """One or more settings are invalid; the message lists every problem."""


#: The most nodes a pool may be set to hold: far above any GPU fleet, far below where the
#: scripts' numbers lose integer precision.
MAX_NODES_LIMIT = 100_000

@dataclass(frozen=True)
class PoolConfig:
    """How one pool scales. Every replica of a pool should run with the same values."""

    min_ready: int = 1
    max_nodes: int = 50
    idle_timeout_s: float = 60.0
    boot_timeout_s: float = 600.0
    tick_interval_s: float = 1.0
    activity_window_s: float = 120.0
    engaged_threshold: int = 3
    conversion: float = 0.5
    create_timeout_s: float = 60.0
    delete_timeout_s: float = 60.0
    max_batch: int = 20
    max_events_per_user: int = 100
    decision_log_len: int = 1000
    #: "forecast" (base-stock over the boot lead time) or "heuristic" (the first release's)
    scaling_policy: str = "forecast"
    #: the forecast's safety buffer, in standard deviations of the net demand
    buffer_sd: float = 2.4
    #: the buffer while arrivals surge (twice the rate seen so far or more, beyond chance)
    surge_buffer_sd: float = 4.5
    #: how fast the forecast forgets: half-life of its learned chances and rates
    learning_half_life_s: float = 1800.0
    #: boot time assumed until the pool has seen a boot
    boot_prior_s: float = 60.0
    #: scale-down hysteresis: idle nodes are reaped only beyond the highest target of this long
    keep_window_s: float = 300.0
    #: the share of the frees of sessions that begin within the lead time that the target's
    #: mean counts (1: all, the default; 0: none, the release before; the buffer stays on the
    #: gross connects either way)
    new_session_frees: float = 1.0
    #: how far the sample boots running longer than the mean boot time lengthen the lead time
    #: (0: not at all, the mean of the finished boots, as released; 1: each counts as if it
    #: ended now)
    overdue_boots: float = 0.0
    #: forecast: the share (0-1) of the last horizon's browsing the chances discount as not yet
    #: credited, since a connect within H of it may still come (0: none, as released; 1: half
    #: of it, the share a constant hazard leaves uncredited on average)
    uncredited_exposure: float = 0.0
    #: forecast: the weight (0-4) in the buffer of the learned chances' own estimation error,
    #: shared by each cell's users (0: left out, as released; 1: as the learned counts give it)
    estimation_error: float = 0.0

    def problems(self) -> list[str]:
        found: list[str] = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                found.append(message)

        # Every range is closed above, so nan and inf fail it too (an infinite timeout cannot
        # become the scripts' milliseconds; a pool of 10^14 nodes overflows their numbers).
        need(0 <= self.min_ready <= MAX_NODES_LIMIT, f"min_ready must be in [0, {MAX_NODES_LIMIT}]")
        need(1 <= self.max_nodes <= MAX_NODES_LIMIT, f"max_nodes must be in [1, {MAX_NODES_LIMIT}]")
        need(self.min_ready <= self.max_nodes, "min_ready must not exceed max_nodes")
        need(0 <= self.idle_timeout_s <= 86400, "idle_timeout_s must be in [0, 86400]")
        # The scripts count in milliseconds: a timeout under one would be 0, a boot timed out on
        # the tick it starts (found by a fuzz of the settings).
        need(0.001 <= self.boot_timeout_s <= 86400, "boot_timeout_s must be in [0.001, 86400]")
        need(0.05 <= self.tick_interval_s <= 600, "tick_interval_s must be in [0.05, 600]")
        need(1 <= self.activity_window_s <= 86400, "activity_window_s must be in [1, 86400]")
        need(1 <= self.engaged_threshold <= self.max_events_per_user,
             "engaged_threshold must be in [1, max_events_per_user]")
        need(0 <= self.conversion <= 1, "conversion must be in [0, 1]")
        need(0.001 <= self.create_timeout_s <= 86400,
             "create_timeout_s must be in [0.001, 86400]")
        need(0.001 <= self.delete_timeout_s <= 86400,
             "delete_timeout_s must be in [0.001, 86400]")
        need(1 <= self.max_batch <= 1000, "max_batch must be in [1, 1000]")
        need(1 <= self.max_events_per_user <= 10000, "max_events_per_user must be in [1, 10000]")
        need(10 <= self.decision_log_len <= 1_000_000,
             "decision_log_len must be in [10, 1000000]")
        need(self.scaling_policy in ("forecast", "heuristic"),
             "scaling_policy must be forecast or heuristic")
        need(0 <= self.buffer_sd <= 10, "buffer_sd must be in [0, 10]")
        need(0 <= self.surge_buffer_sd <= 10, "surge_buffer_sd must be in [0, 10]")
        need(10 <= self.learning_half_life_s <= 30 * 86400,
             "learning_half_life_s must be in [10, 2592000]")
        need(1 <= self.boot_prior_s <= 3600, "boot_prior_s must be in [1, 3600]")
        need(0 <= self.keep_window_s <= 86400, "keep_window_s must be in [0, 86400]")
        need(0 <= self.new_session_frees <= 1, "new_session_frees must be in [0, 1]")
        need(0 <= self.overdue_boots <= 1, "overdue_boots must be in [0, 1]")
        need(0 <= self.uncredited_exposure <= 1, "uncredited_exposure must be in [0, 1]")
        need(0 <= self.estimation_error <= 4, "estimation_error must be in [0, 4]")
        return found

    def validate(self) -> PoolConfig:
        found = self.problems()
        if found:
            raise ConfigError("invalid pool settings: " + "; ".join(found))
        return self

    @property
    def window_ms(self) -> int:
        return int(self.activity_window_s * 1000)

    @property
    def interval_ms(self) -> int:
        return max(1, int(self.tick_interval_s * 1000))

    def policy_args(self, now_ms: int, replica: str,
                    creates_held_to: int | None = None, epoch: str = "") -> list[object]:
        """ARGV for scale_decide and reap_idle, in the order of lua/includes/policy.lua;
        `creates_held_to`: the most creates this replica may make now, below `max_batch` (the
        Node API is failing), or None; `epoch`: the pool's epoch as this replica last saw it,
        on which scale_decide decides nothing if the pool holds another, or "" (none seen)."""
        args: list[object] = [
            now_ms,
            replica,
            self.interval_ms,
            self.min_ready,
            self.max_nodes,
            self.window_ms,
            repr(float(self.conversion)),
            int(self.idle_timeout_s * 1000),
            int(self.boot_timeout_s * 1000),
            int(self.create_timeout_s * 1000),
            int(self.delete_timeout_s * 1000),
            self.max_batch,
            self.decision_log_len,
            self.scaling_policy,
            repr(float(self.buffer_sd)),
            int(self.learning_half_life_s * 1000),
            int(self.boot_prior_s * 1000),
            int(self.keep_window_s * 1000),
            repr(float(self.surge_buffer_sd)),
            repr(float(self.new_session_frees)),
            repr(float(self.overdue_boots)),
            repr(float(self.uncredited_exposure)),
            repr(float(self.estimation_error)),
        ]
        if creates_held_to is not None or epoch:
            args.append("" if creates_held_to is None else creates_held_to)
        if epoch:
            args.append(epoch)
        return args

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def redis_url_problem(url: str) -> str | None:
    """Why the Redis client cannot use `url` (its own parser's reason), or None: the client
    would otherwise raise it when the command first connects, as a traceback."""
    from redis.asyncio import ConnectionPool
    from redis.exceptions import RedisError

    try:
        # What the commands' clients do with the URL, short of connecting: parse it, then make
        # a connection of its options. The parser passes an option it does not know
        # (?socket_timout=5) on to the connection, which is refused only there.
        ConnectionPool.from_url(url).make_connection()  # type: ignore[no-untyped-call]
    except ValueError as exc:
        return f"redis url {url!r} cannot be parsed: {exc}"
    except TypeError as exc:
        unknown = re.search(r"argument '([^']+)'", str(exc))
        return (f"redis url {url!r}: the Redis client takes no option "
                f"{unknown.group(1) if unknown else str(exc)!r}")
    except RedisError as exc:  # an option's value the client refuses (?protocol=4)
        return f"redis url {url!r} cannot be used: {exc}"
    # The client takes a database that is not a number (redis://host/one) as none, database 0:
    # a pool would run, or be inspected, where nobody meant.
    parts = urlsplit(url)
    if parts.scheme.lower() in ("redis", "rediss") and "db" not in parse_qs(parts.query):
        database = unquote(parts.path).strip("/")  # as the client reads it
        if database and not (database.isascii() and database.isdigit()):
            return (f"redis url {url!r}: the database, {database!r}, is not a number "
                    "(redis://HOST:PORT/N)")
    return None


def redis_url_option(value: str | None) -> str | None:
    """A typer callback: a --redis-url the Redis client cannot parse is a bad option."""
    problem = redis_url_problem(value) if value else None
    if problem:
        import typer

        raise typer.BadParameter(problem)
    return value


def _node_api_url_problems(url: str) -> list[str]:
    """What stops `url` naming a host and port: the client would fail on every call, or stop
    the replica with a traceback, otherwise."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- parsing it is the check (a port out of range or not a number)
    except ValueError as exc:
        return [f"node api url {url!r} cannot be parsed: {exc}"]
    if not parts.hostname:
        return [f"node api url {url!r} names no host"]
    return []


#: How often a replica reconciles the pool against the Node API's list, by default.
RECONCILE_INTERVAL_S = 30.0


@dataclass(frozen=True)
class ServiceConfig:
    """Where one replica connects and how it reports."""

    redis_url: str
    node_api_url: str
    pool: str = "default"
    http_port: int = 9100
    http_host: str = "0.0.0.0"
    replica_id: str = field(default_factory=default_replica_id)
    log_format: str = "text"
    log_level: str = "INFO"
    max_event_age_s: float = 86400.0
    max_clock_skew_s: float = 300.0
    reconcile_interval_s: float = RECONCILE_INTERVAL_S
    api_timeout_s: float = 10.0
    api_retries: int = 3
    shutdown_grace_s: float = 5.0
    #: how often the replica heartbeats: records itself in the pool and probes its listener's
    #: lag (0 disables both); and the lag past which it warns and reports itself unready
    #: (service.py, `Replica.heartbeat`)
    heartbeat_interval_s: float = 2.0
    max_event_lag_s: float = 5.0

    def problems(self) -> list[str]:
        found: list[str] = []
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            found.append(f"redis url {self.redis_url!r} must start with redis://, rediss:// "
                         "or unix://")
        elif problem := redis_url_problem(self.redis_url):
            found.append(problem)
        if not self.node_api_url.startswith(("http://", "https://")):
            found.append(f"node api url {self.node_api_url!r} must start with http(s)://")
        else:
            found.extend(_node_api_url_problems(self.node_api_url))
        if not POOL_NAME.match(self.pool):
            found.append(f"pool {self.pool!r} must be 1-64 characters of letters, digits, _.-")
        if not 0 <= self.http_port <= 65535:
            found.append("http port must be in [0, 65535] (0 disables the HTTP endpoint)")
        if self.log_format not in ("text", "json"):
            found.append("log format must be text or json")
        if self.log_level not in LOG_LEVELS:
            found.append(f"log level must be one of {', '.join(LOG_LEVELS)}")
        if not 0 < len(self.replica_id) <= 64 or ":" in self.replica_id:
            found.append("replica id must be 1-64 characters without ':'")
        if not 0 < self.api_timeout_s <= 600:
            found.append("api timeout must be in (0, 600]")
        if not 1 <= self.api_retries <= 10:
            found.append("api retries must be in [1, 10]")
        if not 0 <= self.reconcile_interval_s <= 86400:
            found.append("reconcile interval must be in [0, 86400] (0 disables reconciliation)")
        if not 0 <= self.heartbeat_interval_s <= 3600:
            found.append("heartbeat interval must be in [0, 3600] (0 disables heartbeats)")
        if not 0 < self.max_event_lag_s <= 3600:
            found.append("max event lag must be in (0, 3600]")
        return found

    def validate(self) -> ServiceConfig:
        found = self.problems()
        if found:
            raise ConfigError("invalid service settings: " + "; ".join(found))
        return self
