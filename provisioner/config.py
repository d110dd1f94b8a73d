"""Pool and service settings, validated at start with a clear message."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, unquote_plus, urlsplit

from provisioner.keys import POOL_NAME

if TYPE_CHECKING:
    import redis.asyncio as aioredis


class ConfigError(ValueError):
    """One or more settings are invalid; the message lists every problem."""


def number(value: object) -> str:
    """A number as a message shows it: 86400, not 86400.0; 0.001; nan."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class Problem:
    """What is wrong with one setting, in parts, so that each caller names the setting as its
    user wrote it. str() names it as the settings do: the field (`idle_timeout_s must be in [0,
    86400]`, what `bench --set` and a pool's published settings are written in) or the words of
    `label`; `said_of` puts another name in its place (`run`: the option and its env var).

    `rule` is what the value must be, in the field's unit, or what is wrong with it ("cannot be
    parsed: ..."); a field it compares with is written `{name}` in it, and `others` holds each
    such field's value."""

    setting: str
    rule: str
    others: tuple[tuple[str, object], ...] = ()
    #: said after the rule and its unit: "(0 disables reconciliation)"
    note: str = ""
    label: str = ""

    @property
    def unit(self) -> str:
        """The field's unit, by its name: `_s`, seconds."""
        return "s" if self.setting.endswith("_s") else ""

    def __str__(self) -> str:
        said = self.rule.format(**{name: name for name, _ in self.others})
        return f"{self.label or self.setting} {said}{' ' + self.note if self.note else ''}"

    def said_of(self, subject: str, got: str, others: Mapping[str, str]) -> str:
        """The problem of the setting called `subject`, which was given `got`; `others` names
        each other field in the rule (an option, or its value where no option sets it)."""
        parts = [subject, self.rule.format(**others)]
        parts += [part for part in (self.unit, self.note) if part]
        return " ".join(parts) + f": got {got}"


def _range(config: object, name: str, low: float | str, high: float | str, *,
           low_open: bool = False, note: str = "", label: str = "") -> Problem | None:
    """The problem of field `name` if its value is not in [low, high] ((low, high] with
    `low_open`), else None: each range is written once, and checked and said from the same
    numbers. A bound given as a name is that field's value. Every range is closed above, so nan
    and inf fail it."""
    value = getattr(config, name)
    others: list[tuple[str, object]] = []

    def bound(given: float | str) -> tuple[float, str]:
        if isinstance(given, str):
            others.append((given, getattr(config, given)))
            return getattr(config, given), "{" + given + "}"
        return given, number(given)

    (low_value, low_said), (high_value, high_said) = bound(low), bound(high)
    if (low_value < value if low_open else low_value <= value) and value <= high_value:
        return None
    return Problem(name, f"must be in {'(' if low_open else '['}{low_said}, {high_said}]",
                   tuple(others), note, label)


def _off_or_range(config: object, name: str, low: float, high: float, *, note: str,
                  label: str) -> Problem | None:
    """As `_range`, for a setting that 0 turns off: 0, or a value in [low, high]."""
    value = getattr(config, name)
    if value == 0 or (low <= value <= high):
        return None
    return Problem(name, f"must be 0 or in [{number(low)}, {number(high)}]", (), note, label)


def _one_of(config: object, name: str, choices: tuple[str, ...], label: str = "") -> Problem | None:
    if getattr(config, name) in choices:
        return None
    said = " or ".join(choices) if len(choices) == 2 else f"one of {', '.join(choices)}"
    return Problem(name, f"must be {said}", label=label)


#: The longest heartbeat interval taken (see ServiceConfig.check).
MAX_HEARTBEAT_INTERVAL_S = 20.0

#: The most nodes a pool may be set to hold: far above any GPU fleet, far below where the
#: scripts' numbers lose integer precision.
MAX_NODES_LIMIT = 100_000

#: PoolConfig.scaling_policy: the forecast (base-stock over the boot lead time), or the first
#: release's heuristic
SCALING_POLICIES = ("forecast", "heuristic")


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

    def check(self) -> list[Problem]:
        """Every setting out of its range, and what is wrong together."""
        # Every range is closed above, so nan and inf fail it too (an infinite timeout cannot
        # become the scripts' milliseconds; a pool of 10^14 nodes overflows their numbers).
        found = [
            _range(self, "min_ready", 0, MAX_NODES_LIMIT),
            _range(self, "max_nodes", 1, MAX_NODES_LIMIT),
            None if self.min_ready <= self.max_nodes else Problem(
                "min_ready", "must not exceed {max_nodes}", (("max_nodes", self.max_nodes),)),
            _range(self, "idle_timeout_s", 0, 86400),
            # The scripts count in milliseconds: a timeout under one would be 0, a boot timed
            # out on the tick it starts (found by a fuzz of the settings).
            _range(self, "boot_timeout_s", 0.001, 86400),
            _range(self, "tick_interval_s", 0.05, 600),
            _range(self, "activity_window_s", 1, 86400),
            _range(self, "engaged_threshold", 1, "max_events_per_user"),
            _range(self, "conversion", 0, 1),
            _range(self, "create_timeout_s", 0.001, 86400),
            _range(self, "delete_timeout_s", 0.001, 86400),
            _range(self, "max_batch", 1, 1000),
            _range(self, "max_events_per_user", 1, 10000),
            _range(self, "decision_log_len", 10, 1_000_000),
            _one_of(self, "scaling_policy", SCALING_POLICIES),
            _range(self, "buffer_sd", 0, 10),
            _range(self, "surge_buffer_sd", 0, 10),
            _range(self, "learning_half_life_s", 10, 30 * 86400),
            _range(self, "boot_prior_s", 1, 3600),
            _range(self, "keep_window_s", 0, 86400),
            _range(self, "new_session_frees", 0, 1),
            _range(self, "overdue_boots", 0, 1),
            _range(self, "uncredited_exposure", 0, 1),
            _range(self, "estimation_error", 0, 4),
        ]
        return [problem for problem in found if problem is not None]

    def problems(self) -> list[str]:
        """What `check` finds, each naming its field."""
        return [str(problem) for problem in self.check()]

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

    def digest(self) -> str:
        """12 hex digits of these settings, alike for alike values: what a replica's heartbeat
        says of the settings it runs, so `status` can tell replicas of one pool that run
        different ones (a drill: the replica whose tick fired first decided with its own, and
        nothing said the two differed)."""
        import hashlib
        import json

        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _redis_url_reason(url: str) -> str | None:
    """Why the Redis client cannot use `url` (its own parser's reason), said of the URL
    ("cannot be parsed: ..."), or None: the client would otherwise raise it when the command
    first connects, as a traceback."""
    from redis.asyncio import ConnectionPool
    from redis.exceptions import RedisError

    if run_on := _run_on_reason(url):
        return run_on
    try:
        # What the commands' clients do with the URL, short of connecting: parse it, then make
        # a connection of its options. The parser passes an option it does not know
        # (?socket_timout=5) on to the connection, which is refused only there.
        ConnectionPool.from_url(url).make_connection()  # type: ignore[no-untyped-call]
    except ValueError as exc:
        return f"cannot be parsed: {exc}"
    except TypeError as exc:
        unknown = re.search(r"argument '([^']+)'", str(exc))
        return ("names an option the Redis client does not take: "
                f"{unknown.group(1) if unknown else str(exc)!r}")
    except RedisError as exc:  # an option's value the client refuses (?protocol=4)
        return f"cannot be used: {exc}"
    # The client takes a database that is not a number (redis://host/one) as none, database 0:
    # a pool would run, or be inspected, where nobody meant.
    parts = urlsplit(url)
    if parts.scheme.lower() in ("redis", "rediss") and "db" not in parse_qs(parts.query):
        database = unquote(parts.path).strip("/")  # as the client reads it
        if database and not (database.isascii() and database.isdigit()):
            return f"names a database that is not a number: {database!r} (redis://HOST:PORT/N)"
    return None


# The query options whose values a message shows: those the Redis client parses as numbers,
# booleans or names (redis.connection's URL_QUERY_ARGUMENT_PARSERS), and those it passes on as
# text that are no secret: a name, a user (shown in the userinfo too), the TLS files' paths
# (hidden, "cannot reach Redis at rediss://h/0?ssl_ca_certs=***: ... No such file or
# directory" named no file). Any other value, a password's (`ssl_password` too), a Node API
# token's or one under a misspelt name (`?pasword=`, which the client refuses, naming it), is
# shown as `***`.
_SHOWN_OPTIONS = frozenset((
    "db", "health_check_interval", "legacy_responses", "max_connections", "protocol",
    "retry_on_error", "retry_on_timeout", "socket_connect_timeout", "socket_keepalive",
    "socket_read_size", "socket_timeout", "ssl_check_hostname", "ssl_exclude_verify_flags",
    "ssl_include_verify_flags", "ssl_min_version", "ssl_validate_ocsp",
    "ssl_validate_ocsp_stapled", "timeout", "client_name", "ssl_cert_reqs", "username",
    "ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_ciphers"))


def _query_shown(query: str) -> str:
    """A URL's query with each value as `***` but those of `_SHOWN_OPTIONS`: a name read
    unquoted, as the Redis client's parse_qs reads it (`pass%77ord=` is hidden too). A ';'
    parts its options as an '&' does (as parse_qs did before Python 3.9.2): the client reads
    `?db=1;password=s3cret` as one db, and refuses it, and it was shown whole. An item with
    no '=' is all value (a secret pasted in, `?s3cret`), and is shown as `***` unless it names
    one of those options."""
    def shown(pair: re.Match[str]) -> str:
        name, equals, _ = pair[0].partition("=")
        if unquote_plus(name).lower() in _SHOWN_OPTIONS:
            return pair[0]
        return f"{name}=***" if equals else "***"
    return re.sub(r"[^&;]+", shown, query)


def _authority(rest: str) -> tuple[str, str]:
    """A URL after its '://' parted as the clients part it: its authority, up to the first
    '/', '?' or '#', and what follows."""
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    return rest[:end], rest[end:]


def _password_runs_on(authority: str, tail: str) -> bool:
    """Whether the URL's password holds a '/', '?' or '#' not percent-encoded (a base64
    password's '/'): the clients end the authority there, at a ':' followed by no port, and
    an '@' comes after it. Its start is then read as the port, and quoted by the client's
    error ("Port could not be cast to integer value as 's3cret'")."""
    if "@" in authority or "@" not in tail or authority.startswith("["):
        return False
    _, colon, port = authority.partition(":")
    return bool(colon) and not (port.isascii() and port.isdigit())


#: What a URL setting's message says of a password the clients cannot read, instead of the
#: client's error, which quotes the password's start as a port.
_RUN_ON_PASSWORD = ("cannot be parsed: its password holds a '/', '?' or '#', which must be "
                    "percent-encoded (%2F, %3F, %23)")


def _run_on_reason(url: str) -> str | None:
    _, sep, rest = url.partition("://")
    return _RUN_ON_PASSWORD if sep and _password_runs_on(*_authority(rest)) else None


def redis_refused(exc: BaseException) -> bool:
    """Whether the server answered and refused (a database index, an ACL, a key's type, the
    credentials, its maxclients, a dataset still loading), rather than was out of reach.
    redis-py files the credentials, a full server and one loading as connection errors."""
    from redis.exceptions import (
        AuthenticationError,
        AuthorizationError,
        BusyLoadingError,
        ExternalAuthProviderError,
        ResponseError,
    )

    return (isinstance(exc, ResponseError | AuthenticationError | AuthorizationError
                       | ExternalAuthProviderError | BusyLoadingError) or _full(exc))


def redis_trouble_word(exc: BaseException) -> str:
    """What a live view (`status --watch`, the dev stack's) says of a reading that failed: a
    server reached that refused it (a key's type, an ACL, the credentials, its maxclients) is
    not out of reach."""
    return "Redis refused" if redis_refused(exc) else "Redis unreachable"


def _full(exc: BaseException) -> bool:
    """A server at its maxclients: MaxClientsReachedError where redis-py has it, a plain
    ConnectionError of the server's words before."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    return isinstance(exc, RedisConnectionError) and str(exc).startswith(
        "max number of clients reached")


def _has_credentials(url: str) -> bool:
    """Whether `url` gives the client a user or a password (in its userinfo or its query)."""
    from redis.connection import parse_url

    try:
        parsed = parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError:
        return True  # not to be said "gives none" on a guess
    return bool(parsed.get("username") or parsed.get("password"))


def redis_trouble(url: str, exc: BaseException) -> str:
    """What a command says of a Redis it could not use: a server that answered and refused (a
    database index, an ACL, a key's type, the credentials, its maxclients) is not out of reach.
    redis-py files a wrong password (WRONGPASS, NOAUTH), a full server and one still loading as
    connection errors; said "cannot reach", they sent the operator to the network."""
    from redis.exceptions import (
        AuthenticationError,
        AuthorizationError,
        BusyLoadingError,
        ExternalAuthProviderError,
    )

    shown = shown_url(url)
    if isinstance(exc, AuthenticationError | AuthorizationError | ExternalAuthProviderError):
        if not _has_credentials(url):
            return f"Redis at {shown} asks for credentials, and the URL gives none: {exc}"
        return f"Redis at {shown} refused the credentials: {exc}"
    if _full(exc):
        return (f"Redis at {shown} refused the connection: {exc} (its maxclients: the "
                "connections of other clients fill it)")
    if isinstance(exc, BusyLoadingError):
        return f"Redis at {shown} answered, and is still loading its data: {exc}"
    if redis_refused(exc):
        return f"Redis at {shown} refused: {exc}"
    if _answer_late(exc):
        return (f"Redis at {shown} took the connection and did not answer in time: {exc} (a "
                "server paused or stalled, or busy with a long command; or the network)")
    return f"cannot reach Redis at {shown}: {str(exc) or type(exc).__name__}"


def _answer_late(exc: BaseException) -> bool:
    """A server connected to that did not answer within the client's timeout ("Timeout reading
    from ..."): said "cannot reach" of a paused server, it sent the operator to the network
    alone (an operator's walkthrough). A timeout connecting is the network's, or no server's."""
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return isinstance(exc, RedisTimeoutError) and "connecting" not in str(exc)


def shown_url(url: str) -> str:
    """`url` with its password as `***`, what a message or a log line may show of it: the
    userinfo's after its first ':' (its authority read as the clients read it, up to the first
    '/', '?' or '#', its userinfo up to the last '@') and every value of its query but the
    Redis client's options that are no secret (`_query_shown`). Anything else, and a text that
    is not a URL, as it is."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, tail = _authority(rest)
    if _password_runs_on(authority, tail):
        user = authority.split(":", 1)[0]
        return shown_url(f"{scheme}://{user}:***@{rest[rest.rfind('@') + 1:]}")
    userinfo, at, host = authority.rpartition("@")
    if at and ":" in userinfo:
        authority = f"{userinfo.split(':', 1)[0]}:***@{host}"
    before, fragment_sep, fragment = tail.partition("#")
    path, query_sep, query = before.partition("?")
    if query_sep:
        tail = f"{path}?{_query_shown(query)}{fragment_sep}{fragment}"
    return f"{scheme}://{authority}{tail}"


def _url_label(kind: str, url: str) -> str:
    """How a message names a URL setting and its value: `redis url 'redis://:***@h/0'`."""
    return f"{kind} url {shown_url(url)!r}"


def redis_url_problem(url: str) -> str | None:
    """Why the Redis client cannot use `url`, naming it (`shown_url`), or None."""
    reason = _redis_url_reason(url)
    return f"{_url_label('redis', url)} {reason}" if reason else None


#: Most connections one process's client opens to its server (the client's own default)...
REDIS_CONNECTIONS = 100
#: ... and how long a command waits for one of them while all are in use, before it fails.
REDIS_CONNECTION_WAIT_S = 10.0


def redis_client(url: str, **options: Any) -> aioredis.Redis:
    """A client whose commands wait, up to REDIS_CONNECTION_WAIT_S, for one of its
    REDIS_CONNECTIONS connections while all are in use. The client's default pool refuses a
    command at once then ("Too many connections"): a burst of creates at the mock answered 503
    with Redis well (a review), and a replica's 400 creates, under a second's CLIENT PAUSE,
    failed to record the nodes they had made. A `?max_connections=` in the URL still decides.
    `options`: the client's own (`health_check_interval`, ...)."""
    from redis.asyncio import BlockingConnectionPool, Redis

    return Redis.from_pool(BlockingConnectionPool.from_url(
        url, max_connections=REDIS_CONNECTIONS, timeout=REDIS_CONNECTION_WAIT_S, **options))


def redis_url_option(value: str | None) -> str | None:
    """A typer callback: a --redis-url the Redis client cannot parse is a bad option."""
    problem = redis_url_problem(value) if value else None
    if problem:
        import typer

        raise typer.BadParameter(problem)
    return value


def _node_api_url_reason(url: str) -> str | None:
    """What stops `url` naming a host and port, said of the URL, or None: the client would
    fail on every call, or stop the replica with a traceback, otherwise."""
    if run_on := _run_on_reason(url):
        return run_on
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- parsing it is the check (a port out of range or not a number)
    except ValueError as exc:
        return f"cannot be parsed: {exc}"
    if not parts.hostname:
        return "names no host"
    # The client adds /api/nodes to the URL: after a query, every call would go to a path of
    # the query's (a review: POST /v1?token=…/api/nodes, and a DELETE to the API's base).
    if parts.query or parts.fragment or url.rstrip("/").endswith(("?", "#")):
        return ("has a query or a fragment: the calls are made at its path + /api/nodes, and "
                "would go elsewhere (give the API's base, scheme://host:port[/prefix])")
    return None


#: What `listenable` refusing a host says, less its closing parenthesis (each option adds its
#: own last words: `run`'s port is an option of its own).
NOT_LISTENABLE = ("must be an address or a host name (0.0.0.0: every interface; an IPv6 "
                  "address without brackets, ::1")


def listenable(host: str) -> bool:
    """Whether the HTTP server could be told to listen on `host` as given: an IPv4 or IPv6
    address (a scope too, fe80::1%eth0) or a name the resolver would be asked for. A ':' is an
    IPv6 address's alone ([::1] and HOST:PORT are not looked up as meant), and a name's labels
    are 1-63 characters (the resolver's idna codec raised UnicodeError, a traceback, at the
    listen, after Redis was reached)."""
    import ipaddress

    if not host or len(host) > 253 or any(c.isspace() or c in "/@?#[]" for c in host):
        return False
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True


def _as_rule(reason: str) -> str:
    """A reason that may quote anything (a URL, a client's error), as a Problem's rule."""
    return reason.replace("{", "{{").replace("}", "}}")


def _url_problem(setting: str, kind: str, url: str, schemes: tuple[str, ...], said_so: str,
                 reason: Callable[[str], str | None]) -> Problem | None:
    """The problem of a URL setting: a scheme not among `schemes` (`said_so`), else what
    `reason` finds, or None."""
    if not url.startswith(schemes):
        return Problem(setting, f"must start with {said_so}", label=_url_label(kind, url))
    said = reason(url)
    return Problem(setting, _as_rule(said), label=_url_label(kind, url)) if said else None


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
    #: how long a batch of events the server refuses for now (out of memory, read-only, a
    #: script running long, still loading) is tried again, from its reading, before it is
    #: dropped (one it cannot be reached for, UNREACHABLE_HOLD_S at most), and how many
    #: messages the listener reads ahead of those it applies meanwhile (service.py,
    #: `Replica.listen`)
    event_hold_s: float = 300.0
    event_backlog: int = 100_000

    def check(self) -> list[Problem]:
        """Every setting that cannot be used."""
        found: list[Problem | None] = [
            _url_problem("redis_url", "redis", self.redis_url,
                         ("redis://", "rediss://", "unix://"), "redis://, rediss:// or unix://",
                         _redis_url_reason),
            _url_problem("node_api_url", "node api", self.node_api_url, ("http://", "https://"),
                         "http(s)://", _node_api_url_reason),
        ]
        if not POOL_NAME.match(self.pool):
            found.append(Problem("pool", "must be 1-64 characters of letters, digits, _.-",
                                 label=f"pool {self.pool!r}"))
        if not listenable(self.http_host):
            found.append(Problem("http_host", f"{NOT_LISTENABLE}; no port, --http-port is)",
                                 label=f"http host {self.http_host!r}"))
        found += [
            _range(self, "http_port", 0, 65535, note="(0 disables the HTTP endpoint)",
                   label="http port"),
            _one_of(self, "log_format", ("text", "json"), label="log format"),
            _one_of(self, "log_level", LOG_LEVELS, label="log level"),
        ]
        if not 0 < len(self.replica_id) <= 64 or ":" in self.replica_id:
            found.append(Problem("replica_id", "must be 1-64 characters without ':'",
                                 label="replica id"))
        found += [
            _range(self, "api_timeout_s", 0, 600, low_open=True, label="api timeout"),
            _range(self, "api_retries", 1, 10, label="api retries"),
            # A reconciliation is one GET of every node, and its turn a lock of whole
            # milliseconds (a review: 0.0004 s was taken, and every turn's lock refused).
            _off_or_range(self, "reconcile_interval_s", 1, 86400,
                          note="(0 disables reconciliation)", label="reconcile interval"),
            # Under a third of the minute the CLI's `drain` and `replace` take a replica to be
            # silent after, and far under the 10 minutes the others forget it in, with the
            # mark that keeps its calls from being applied twice (a review: 900 s was taken,
            # and a live replica forgotten by another's heartbeat).
            _off_or_range(self, "heartbeat_interval_s", 0.1, MAX_HEARTBEAT_INTERVAL_S,
                          note="(0 disables heartbeats)", label="heartbeat interval"),
            _range(self, "max_event_lag_s", 0, 3600, low_open=True, label="max event lag"),
            # 0 drops a batch at its first refusal; an hour past which an event applied is
            # more likely to mislead than to help (a connect of a user long gone).
            _range(self, "event_hold_s", 0, 3600, label="event hold"),
            # Its floor is one batch read (LISTEN_BATCH); its top a bound on memory still.
            _range(self, "event_backlog", 200, 10_000_000, label="event backlog"),
            # No option sets these three, so their problems name the fields. An age or a skew of 0
            # drops every activity event a moment off this replica's clock, a nan one every
            # event. An event older than the activity window (a day at most) is stale to
            # record_activity anyway, so the age's top only keeps it finite; a skew keeps a
            # user's events from the future in the window until then, so it stays small.
            _range(self, "max_event_age_s", 0, 30 * 86400, low_open=True),
            _range(self, "max_clock_skew_s", 0, 3600, low_open=True),
            # 0 cancels the loops and Node API calls in flight at once (each step is atomic or
            # repeated by another replica); the grace is waited once, for loops and calls.
            _range(self, "shutdown_grace_s", 0, 600),
        ]
        return [problem for problem in found if problem is not None]

    def problems(self) -> list[str]:
        """What `check` finds, each in the settings' own words."""
        return [str(problem) for problem in self.check()]

    def validate(self) -> ServiceConfig:
        found = self.problems()
        if found:
            raise ConfigError("invalid service settings: " + "; ".join(found))
        return self
