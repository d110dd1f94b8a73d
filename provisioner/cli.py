"""The `provisioner` command line: a thin layer over the library."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import faulthandler
import getpass
import inspect
import json
import os
import re
import signal
import sys
import time
import types
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, NamedTuple, TypeVar

import redis.asyncio as aioredis
import typer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from provisioner import mock_node_api, simulator, view
from provisioner.bench import cli as bench_cli
from provisioner.clock import OffsetClock, WallClock, server_now_ms
from provisioner.config import (
    PoolConfig,
    Problem,
    ServiceConfig,
    default_replica_id,
    number,
    redis_trouble,
    redis_trouble_word,
    redis_url_option,
    shown_url,
)
from provisioner.events import ID_PATTERN, ID_RULE
from provisioner.keys import PoolKeys
from provisioner.logs import setup_logging
from provisioner.terminal import SafeConsole, outside, printable

app = typer.Typer(
    name="provisioner",
    help="Predictive GPU node provisioning with its whole state in Redis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = SafeConsole()
errors = SafeConsole(stderr=True)
_warned: set[tuple[str, ...]] = set()
T = TypeVar("T")

RedisUrl = Annotated[str, typer.Option("--redis-url", envvar="PROVISIONER_REDIS_URL",
                                       callback=redis_url_option,
                                       help="Redis URL, e.g. redis://localhost:6379/0")]
# `run` checks its URL with the rest of its settings, to name every problem at once
RunRedisUrl = Annotated[str, typer.Option("--redis-url", envvar="PROVISIONER_REDIS_URL",
                                          help="Redis URL, e.g. redis://localhost:6379/0")]
Pool = Annotated[str, typer.Option("--pool", envvar="PROVISIONER_POOL",
                                   help="Pool name; every key carries it as a hash tag")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables")]
Limit = Annotated[int, typer.Option(min=1, max=100_000, help="Most rows")]
Yes = Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation")]
By = Annotated[str, typer.Option(
    envvar="PROVISIONER_OPERATOR",
    help="Who does it, for the decisions log (default: the login name)")]
DEFAULTS = PoolConfig()
SERVICE_FIELDS = frozenset(f.name for f in dataclasses.fields(ServiceConfig))


def _fail(message: str) -> typer.Exit:
    # On stderr: stdout is what `| jq` and the scripts reading a command's output take.
    errors.print(f"[red]error:[/red] {shown(message)}")
    return typer.Exit(2)


def shown(text: str) -> str:
    """`text` as one line of a message: Rich's markup escaped, and every character a terminal
    acts on, line breaks too, written as its escape (a model file's field name
    `"x\\npool default starts from …"` printed a line of its own)."""
    return escape(printable(text))


class _Option(NamedTuple):
    """A command's option that sets a setting: its parameter's name, flag and env var."""

    name: str
    flag: str
    envvar: str | None

    def __str__(self) -> str:
        return f"{self.flag} ({self.envvar})" if self.envvar else self.flag


def _options_of(ctx: typer.Context, *kinds: type) -> dict[str, _Option]:
    """The option that sets each field of the dataclasses `kinds` that the command's options
    set, read from the options themselves: an option sets the field of its own name, or of its
    name and `_s` (`--idle-timeout`, in seconds as its help says, sets `idle_timeout_s`, in
    seconds). Every option of the command must set one."""
    fields = {field.name for kind in kinds for field in dataclasses.fields(kind)}
    found: dict[str, _Option] = {}
    for param in ctx.command.params:
        name = param.name or ""
        field = next((f for f in (name, f"{name}_s") if f in fields), None)
        if field is None:
            raise TypeError(f"the option {name!r} of {ctx.info_name} sets no setting")
        envvar = param.envvar if isinstance(param.envvar, str) else None
        flag = max((opt for opt in param.opts if opt.startswith("--")), key=len, default=name)
        found[field] = _Option(name, flag, envvar)
    return found


def _by_options(ctx: typer.Context, options: dict[str, _Option],
                problems: list[Problem], used: Mapping[str, object] | None = None) -> list[str]:
    """`problems` as the command's user gave the settings: each names the option that set it
    and its env var, and the value given (`--idle-timeout (PROVISIONER_IDLE_TIMEOUT) must be in
    [0, 86400] s: got 999999`), not the field; a setting no option sets keeps the field's name,
    or is said by its value."""
    said = []
    for problem in problems:
        option = options.get(problem.setting)
        if option is None:
            said.append(str(problem))
            continue
        given = ctx.params[option.name]  # as typed: `run` upper-cases --log-level after it
        got = _given(given)
        if given == "" and used and used.get(problem.setting, "") != "":
            # not given, and its default was checked (`run`'s replica id, HOSTNAME-PID)
            got += f" (the default: {_given(used[problem.setting])})"
        others = {name: f"{options[name].flag} ({number(value)})" if name in options
                  else number(value) for name, value in problem.others}
        said.append(problem.said_of(str(option), got, others))
    return said


def _given(value: object) -> str:
    """A value as given, for a message: a text quoted (an empty one seen), and cut short."""
    if not isinstance(value, str):
        return number(value)
    value = shown_url(value)  # a URL's password is not shown
    return repr(value) if len(value) <= 40 else f"{value[:40]!r}... ({len(value)} characters)"


@app.command()
def run(
    ctx: typer.Context,
    redis_url: RunRedisUrl,
    node_api_url: Annotated[str, typer.Option(
        "--node-api-url", envvar="PROVISIONER_NODE_API_URL",
        help="Base URL of the Node Management API")],
    pool: Pool = "default",
    http_port: Annotated[int, typer.Option(
        "--http-port", envvar="PROVISIONER_HTTP_PORT",
        help="Port of /metrics, /healthz, /readyz (0 disables)")] = 9100,
    http_host: Annotated[str, typer.Option(
        "--http-host", envvar="PROVISIONER_HTTP_HOST",
        help="Address /metrics, /healthz and /readyz listen on: 0.0.0.0 every interface (a "
        "container's, for Prometheus to scrape), 127.0.0.1 this host only")] = "0.0.0.0",
    replica_id: Annotated[str, typer.Option(
        "--replica-id", envvar="PROVISIONER_REPLICA_ID",
        help="Name of this replica in logs and decisions, its own (default: HOSTNAME-PID)")
    ] = "",
    min_ready: Annotated[int, typer.Option(
        envvar="PROVISIONER_MIN_READY", help="Floor of the target of spare nodes (ready + "
        "booting + creating - waiting) and of the ready nodes the reaper leaves")
    ] = DEFAULTS.min_ready,
    max_nodes: Annotated[int, typer.Option(
        envvar="PROVISIONER_MAX_NODES", help="Most nodes that may exist at once")
    ] = DEFAULTS.max_nodes,
    idle_timeout: Annotated[float, typer.Option(
        envvar="PROVISIONER_IDLE_TIMEOUT", help="Seconds a ready node may idle before it may "
        "be reaped (only beyond the keep level, the highest target of --keep-window)")
    ] = DEFAULTS.idle_timeout_s,
    boot_timeout: Annotated[float, typer.Option(
        envvar="PROVISIONER_BOOT_TIMEOUT", help="Seconds after which a boot is stuck and the "
        "node terminated (or 3 learned mean boots, where that is longer)"),
    ] = DEFAULTS.boot_timeout_s,
    tick_interval: Annotated[float, typer.Option(
        envvar="PROVISIONER_TICK_INTERVAL", help="Seconds between scaling decisions (one per "
        "interval across all replicas)")] = DEFAULTS.tick_interval_s,
    activity_window: Annotated[float, typer.Option(
        envvar="PROVISIONER_ACTIVITY_WINDOW", help="Seconds of activity that count")
    ] = DEFAULTS.activity_window_s,
    engaged_threshold: Annotated[int, typer.Option(
        envvar="PROVISIONER_ENGAGED_THRESHOLD",
        help="Activities within the window that make a user engaged")
    ] = DEFAULTS.engaged_threshold,
    conversion: Annotated[float, typer.Option(
        envvar="PROVISIONER_CONVERSION",
        help="heuristic: expected share of engaged users who connect")] = DEFAULTS.conversion,
    scaling_policy: Annotated[str, typer.Option(
        envvar="PROVISIONER_SCALING_POLICY",
        help="forecast (base-stock over the boot time, learned online) or heuristic")
    ] = DEFAULTS.scaling_policy,
    buffer_sd: Annotated[float, typer.Option(
        envvar="PROVISIONER_BUFFER_SD",
        help="forecast: safety buffer in standard deviations of the demand")
    ] = DEFAULTS.buffer_sd,
    surge_buffer_sd: Annotated[float, typer.Option(
        envvar="PROVISIONER_SURGE_BUFFER_SD",
        help="forecast: safety buffer while arrivals surge (twice the rate seen so far, "
             "beyond chance)")
    ] = DEFAULTS.surge_buffer_sd,
    learning_half_life: Annotated[float, typer.Option(
        envvar="PROVISIONER_LEARNING_HALF_LIFE",
        help="forecast: seconds after which learned chances and rates weigh half")
    ] = DEFAULTS.learning_half_life_s,
    boot_prior: Annotated[float, typer.Option(
        envvar="PROVISIONER_BOOT_PRIOR",
        help="forecast: boot time assumed until one is seen, seconds")] = DEFAULTS.boot_prior_s,
    keep_window: Annotated[float, typer.Option(
        envvar="PROVISIONER_KEEP_WINDOW",
        help="Seconds of scale-down hysteresis: idle nodes are reaped only beyond the highest "
        "target of this long")] = DEFAULTS.keep_window_s,
    new_session_frees: Annotated[float, typer.Option(
        envvar="PROVISIONER_NEW_SESSION_FREES",
        help="forecast: share (0-1) of the frees of sessions that begin within the boot time "
        "that the target's mean counts (1, the default; 0, the release before)")
    ] = DEFAULTS.new_session_frees,
    overdue_boots: Annotated[float, typer.Option(
        envvar="PROVISIONER_OVERDUE_BOOTS",
        help="forecast: how far (0-1) sample boots running longer than the mean boot time "
        "lengthen the lead time (0, the default: not at all; 1: each as if it ended now)")
    ] = DEFAULTS.overdue_boots,
    uncredited_exposure: Annotated[float, typer.Option(
        envvar="PROVISIONER_UNCREDITED_EXPOSURE",
        help="forecast: how far (0-1) the chances discount the last horizon's browsing, whose "
        "connects may still come (0, the default: not at all; 1: by the half a constant "
        "hazard leaves uncredited)")
    ] = DEFAULTS.uncredited_exposure,
    estimation_error: Annotated[float, typer.Option(
        envvar="PROVISIONER_ESTIMATION_ERROR",
        help="forecast: weight (0-4) in the buffer of the learned chances' own estimation "
        "error, shared by each cell's users (0, the default: left out; 1: as learned)")
    ] = DEFAULTS.estimation_error,
    create_timeout: Annotated[float, typer.Option(
        envvar="PROVISIONER_CREATE_TIMEOUT",
        help="Seconds a create reservation waits for its POST before it expires; at least 5 "
        "s longer than a create's longest call (--api-timeout times its tries, and their "
        "pauses)")
    ] = DEFAULTS.create_timeout_s,
    delete_timeout: Annotated[float, typer.Option(
        envvar="PROVISIONER_DELETE_TIMEOUT",
        help="Seconds to wait for 'terminated' before a DELETE is sent again")
    ] = DEFAULTS.delete_timeout_s,
    max_batch: Annotated[int, typer.Option(
        envvar="PROVISIONER_MAX_BATCH", help="Most creates or terminations per decision")
    ] = DEFAULTS.max_batch,
    reconcile_interval: Annotated[float, typer.Option(
        envvar="PROVISIONER_RECONCILE_INTERVAL",
        help="Seconds between reconciliations with GET /api/nodes (0 disables; else 1 at "
        "least)")] = 30.0,
    api_timeout: Annotated[float, typer.Option(
        envvar="PROVISIONER_API_TIMEOUT", help="Node API request timeout, seconds")] = 10.0,
    heartbeat_interval: Annotated[float, typer.Option(
        envvar="PROVISIONER_HEARTBEAT_INTERVAL",
        help="Seconds between heartbeats: the replica records itself in the pool (`status` "
        "lists the replicas), probes how far its listener is behind the events, and sees a loss of "
        "the pool's state in Redis (0 disables all three; else 0.1-20)")
    ] = 2.0,
    max_event_lag: Annotated[float, typer.Option(
        envvar="PROVISIONER_MAX_EVENT_LAG",
        help="Seconds behind the events past which the replica warns and /readyz fails")
    ] = 5.0,
    event_hold: Annotated[float, typer.Option(
        envvar="PROVISIONER_EVENT_HOLD",
        help="Seconds from its reading that a batch of events the server refuses for now (out "
        "of memory, read-only) is tried again before it is dropped (0-3600); one it cannot be "
        "reached for, 10 s at most")
    ] = 300.0,
    event_backlog: Annotated[int, typer.Option(
        envvar="PROVISIONER_EVENT_BACKLOG",
        help="Most messages read and not yet applied that the listener holds; past it the "
        "server holds the rest, up to its pub/sub output-buffer limit (200-10000000)")
    ] = 100_000,
    log_format: Annotated[str, typer.Option(
        envvar="PROVISIONER_LOG_FORMAT", help="text or json")] = "text",
    log_level: Annotated[str, typer.Option(
        envvar="PROVISIONER_LOG_LEVEL", help="DEBUG, INFO, WARNING, ERROR")] = "INFO",
) -> None:
    """Run one replica: listeners, scaling ticker, reconciliation, /metrics and health."""
    from provisioner.service import CannotListen, serve

    # Each option sets the setting of its name (`_options_of`), so the two cannot part: a
    # problem is said of the option that set it.
    options = _options_of(ctx, ServiceConfig, PoolConfig)
    given = {field: ctx.params[option.name] for field, option in options.items()}
    given.update(replica_id=replica_id or default_replica_id(), log_level=log_level.upper())
    service = ServiceConfig(**{f: v for f, v in given.items() if f in SERVICE_FIELDS})
    pool_config = PoolConfig(**{f: v for f, v in given.items() if f not in SERVICE_FIELDS})
    # Every problem of both at once: a second start should not find the next one.
    found = (_by_options(ctx, options, service.check() + pool_config.check(), given)
             + _together(service, pool_config, options))
    if found:
        raise _fail("invalid settings: " + "; ".join(found))
    setup_logging(service.log_format, service.log_level)
    try:
        asyncio.run(serve(service, pool_config))
    except CannotListen as exc:
        raise _fail(f"cannot run: {exc.strerror} ({options['http_host']}, "
                    f"{options['http_port']})") from None
    except (RedisConnectionError, RedisTimeoutError, ResponseError) as exc:
        raise _fail(f"cannot run: {redis_trouble(service.redis_url, exc)}") from None
    except (OSError, RedisError) as exc:
        raise _fail(f"cannot run: {exc}") from None


def _no_pool(pool: str, yet: str = "") -> str:
    """What `check`, `status`, `nodes` and `users` say of a pool the server holds no state of."""
    return (f"no pool {pool!r} on this server{' ' + yet if yet else ''}: nothing under "
            f"{PoolKeys(pool).base} (a misspelt --pool, another database, or a pool not "
            "started)")


def _together(service: ServiceConfig, pool: PoolConfig,
              options: dict[str, _Option]) -> list[str]:
    """What the service's and the pool's settings get wrong only together, said of the
    `options` that set them; nothing of the settings it reads that are out of their own ranges
    (named on their own, by the configs' own checks, asked of those settings alone)."""
    from provisioner.nodeapi import longest_create_s

    alone = ServiceConfig("redis://localhost/0", "http://localhost",
                          api_timeout_s=service.api_timeout_s,
                          api_retries=service.api_retries).problems()
    if alone or PoolConfig(create_timeout_s=pool.create_timeout_s).problems():
        return []
    from provisioner.service import CREATE_SLACK_S

    longest = longest_create_s(service.api_timeout_s, service.api_retries)
    # Compared to the digits said: 23.700000000000003 + 5 refused 28.7 (a review).
    if pool.create_timeout_s >= float(f"{longest + CREATE_SLACK_S:.12g}"):
        return []
    return [f"{options['create_timeout_s']} must be at least {CREATE_SLACK_S:g} s longer than a "
            f"create's longest call to the Node API, {longest:.12g} s ({service.api_retries} "
            f"tries of {options['api_timeout_s'].flag}, {number(service.api_timeout_s)} s, and "
            f"the pauses between them): got {number(pool.create_timeout_s)}; a reservation that "
            "lapses while its POST may still make the node lets the pool make it again, and a "
            "create with less left than the call's longest is not sent"]


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, while the block runs: `docker stop`
    and `kill` of a command run in a container, its PID 1, which ignores a signal it has no
    handler for (Docker kills it 10 s later)."""
    before = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _with_redis(url: str, work: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    try:
        # Connects on first use. What is not UTF-8 (a hand edit) is shown replaced, not fatal.
        client = aioredis.Redis.from_url(url, decode_responses=True, encoding_errors="replace")
    except ValueError as exc:
        raise _fail(f"bad Redis URL {shown_url(url)!r}: {exc}") from None

    async def go() -> T:
        try:
            return await work(client)
        finally:
            await client.aclose()

    try:
        return asyncio.run(go())
    except ResponseError as exc:  # reached, and refused: a script's error, a wrong key type
        hint = ("; a key of the pool holds another type than its own: `provisioner check` "
                "names it" if "WRONGTYPE" in str(exc) else "")
        said = str(exc).rstrip(". ") if hint else str(exc)
        raise _fail(f"Redis at {shown_url(url)} refused: {said}{hint}") from None
    except (OSError, RedisError) as exc:
        raise _fail(redis_trouble(url, exc)) from None


def _pool_keys(pool: str) -> PoolKeys:
    """The pool's keys, or a clear error for a pool name no key can carry."""
    try:
        return PoolKeys(pool)
    except ValueError as exc:
        raise _fail(str(exc)) from None


async def _published_config(client: aioredis.Redis, keys: PoolKeys) -> PoolConfig:
    """The pool settings the replicas last published, or the defaults if none did; a value
    that cannot be used is named on stderr and left at its default."""
    config, problems = view.config_from_redis(await client.hgetall(keys.config))
    if problems and tuple(problems) not in _warned:  # once, not on every refresh of --watch
        _warned.add(tuple(problems))
        errors.print(f"[yellow]warning:[/yellow] the pool's published settings "
                     f"({keys.config}) have values that cannot be used, defaults are used "
                     f"for them: {escape('; '.join(problems))}")
    return config or DEFAULTS


def _say_if_other_release(replicas: list[Any], pool: str, doing: str) -> None:
    """Warn (once a run) when the pool's running replicas run another release of the scripts
    than this CLI: `doing` is what that means for the command (README, "Upgrading")."""
    from provisioner.scripts import scripts_fingerprint

    theirs = view.other_release(replicas)
    if theirs is None or ("release", theirs) in _warned:
        return
    _warned.add(("release", theirs))
    errors.print(f"[yellow]warning:[/yellow] this CLI runs release {scripts_fingerprint()} of "
                 f"the scripts, and no running replica of pool {escape(pool)} does (they run "
                 f"{theirs}): {doing} (README, \"Upgrading\")")


async def _replicas_seen(client: aioredis.Redis, pool: str) -> list[Any] | None:
    """The replicas the pool has heard from; None if the list is broken by hand (a look it
    costs, not the repair)."""
    from provisioner.scripts import Scripts

    try:
        return await Scripts(client, PoolKeys(pool)).replicas()
    except ResponseError:
        return None


async def _replicas_release(client: aioredis.Redis, pool: str,
                            doing: str) -> list[Any] | None:
    """Warn if no running replica runs this CLI's release (`_say_if_other_release`); the
    replicas read for it, as `_replicas_seen`."""
    replicas = await _replicas_seen(client, pool)
    if replicas is not None:
        _say_if_other_release(replicas, pool, doing)
    return replicas


async def _before_writing(client: aioredis.Redis, pool: str, doing: str, *,
                          no_pool: str | None = "nothing was changed") -> list[Any] | None:
    """What an operator's command that writes does first: exit 2, before anything is written,
    if the server holds no state of the pool, saying so and then `no_pool` (None: a pool not
    there yet is the command's to start, `model import --new-pool`; a misspelt --pool had
    `drain` say only "unknown to the pool" of each node, and `release` "holds nothing" of each
    user: an operator's walkthrough), or if the connection's Redis user may not run every
    command the pool's scripts call (an ACL without XADD, or without PUBLISH on user:*; Redis
    undoes nothing a script wrote before a command it refused, and a drain so refused left a
    user waiting while nodes were ready and its node in no state: a review); then
    `_replicas_release`."""
    from provisioner.scripts import CommandsRefused, commands_refused

    if no_pool is not None and not await view.pool_exists(client, pool):
        raise _fail(f"{_no_pool(pool)}: {no_pool}")
    if denied := await commands_refused(client, PoolKeys(pool)):
        raise _fail(str(CommandsRefused(denied, "nothing was changed (use a user allowed them, "
                                                "as the replicas' is)")))
    return await _replicas_release(client, pool, doing)


def _heard_lately(replicas: list[Any] | None) -> bool:
    """Whether a replica sent a heartbeat in the last minute (a list broken by hand is taken
    for yes: the operator's command is not held up by it)."""
    return replicas is None or any(r.age_s < 60 for r in replicas)


#: What a CLI of another release than the replicas does, command by command.
WRITES_WITH_OWN = "what this command writes, it writes with this CLI's scripts"
READS_WITH_OWN = "what it shows is read by this CLI's scripts"
DRAINS_WITH_OWN = (WRITES_WITH_OWN + "; a node in a session is terminated when it ends only by "
                   "replicas of this release or later (one of an earlier release frees it)")


async def _window_ms(client: aioredis.Redis, pool: str) -> int:
    return (await _published_config(client, PoolKeys(pool))).window_ms


class _ReaderGone(Exception):
    """What read the output stopped reading (`status --watch | head -n 1`): the end of a
    watch, not an error, and not the OSError of a server that cannot be reached."""


def _stdout_to_devnull() -> None:
    # Python flushes stdout once more on its way out; into the closed pipe that is another
    # BrokenPipeError, written on stderr.
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)


@app.command()
def status(
    redis_url: RedisUrl,
    pool: Pool = "default",
    watch: Annotated[bool, typer.Option(
        "--watch", "-w", help="Refresh every second (into a pipe or with --json: a reading a "
        "second, appended)")] = False,
    as_json: Json = False,
) -> None:
    """Pool state: nodes by state, users, hits and misses, recent scaling decisions."""
    _pool_keys(pool)

    said_missing = False

    async def read(client: aioredis.Redis) -> view.PoolView:
        nonlocal said_missing
        if not said_missing and not await view.pool_exists(client, pool):
            said_missing = True  # once: a pool about to start has no state yet either
            errors.print(f"[yellow]warning:[/yellow] {escape(_no_pool(pool, 'yet'))}")
        # The server's clock, as the replicas' are measured against: a CLI host running
        # ahead read no user active and every session minutes longer (a review).
        reading = await view.read_view(client, pool, await server_now_ms(client),
                                       await _window_ms(client, pool))
        _say_if_other_release(reading.replicas, pool, READS_WITH_OWN)
        return reading

    if not watch:
        pool_view = _with_redis(redis_url, read)
        if as_json:
            typer.echo(json.dumps(pool_view.as_dict(), indent=2))
        else:
            console.print(view.render_view(pool_view))
        return

    def append(reading: view.PoolView | Exception) -> None:
        """No screen to redraw (a pipe, a file), or JSON asked for: each reading written out
        whole as it comes (a JSON object a line with --json)."""
        if isinstance(reading, Exception):  # on stderr, out of the readings' stream
            errors.print(f"{redis_trouble_word(reading)}: {printable(str(reading))}", markup=False,
                         highlight=False, soft_wrap=True)
            return
        try:
            if as_json:
                typer.echo(json.dumps(reading.as_dict()))
            else:
                console.print(view.render_view(reading))
            console.file.flush()
        except BrokenPipeError:
            raise _ReaderGone from None

    async def loop(client: aioredis.Redis) -> None:
        with contextlib.ExitStack() as stack:
            live = stack.enter_context(Live(console=console, auto_refresh=False, screen=False)
                                       ) if console.is_terminal and not as_json else None
            while True:
                reading: view.PoolView | Exception
                try:
                    reading = await read(client)
                except (OSError, RedisError) as exc:
                    reading = exc
                if live is None:
                    append(reading)
                elif isinstance(reading, Exception):
                    # escaped: a socket path or a server's message may hold "[/…]"
                    live.update(f"[red]{redis_trouble_word(reading)}:[/red] "
                                f"{shown(str(reading))}", refresh=True)
                else:
                    live.update(view.render_view(reading), refresh=True)
                await asyncio.sleep(1.0)

    # (SIGTERM as Ctrl-C: a Docker drill's `docker stop` of a watch waited 10 s and killed it)
    with _sigterm_as_ctrl_c():
        try:
            _with_redis(redis_url, loop)
        except KeyboardInterrupt:
            pass
        except _ReaderGone:  # quietly, with the exit 1 of Rich's and click's own broken pipe
            _stdout_to_devnull()
            raise typer.Exit(1) from None


@app.command()
def nodes(redis_url: RedisUrl, pool: Pool = "default", as_json: Json = False,
          limit: Limit = 200) -> None:
    """Live nodes of the pool with their state, user and ages."""
    _pool_keys(pool)
    rows, (total, _, _), now = _with_redis(redis_url, lambda c: _with_sizes(
        c, pool, view.node_rows(c, pool, limit)))
    if as_json:
        typer.echo(json.dumps([_typed(row) for row in rows], indent=2))
        _say_cut(f"nodes of pool {pool}", len(rows), total, limit)
        return
    table = Table(title=f"nodes of pool {pool} ({_counted(len(rows), total, limit)})")
    for column in ("node", "state", "user", "age", "idle for", "origin", "boot sample"):
        # The node id whole (the ends tell nodes apart), the user's folded, never cut short.
        table.add_column(column, no_wrap=column == "node",
                         overflow="fold" if column == "user" else "ellipsis")
    for row in rows:
        idle = ""
        if row.get("state") == "ready":
            idle = _ago(now, view.time_ms(row.get("idle_since_ms")))
        # Text, not markup: a record edited by hand may hold anything, "[/b]" and a terminal's
        # escape sequences among it
        state = row.get("state", "?") + (", drained" if row.get("drain_by") and row.get(
            "state") in ("ready", "booting", "allocated") else "")
        table.add_row(*map(outside, (
            row.get("id", "?"), state, row.get("user", ""),
            _ago(now, view.time_ms(row.get("created_ms"))), idle, row.get("origin", ""),
            "no" if row.get("boot_sample") == "0" else "yes")))
    console.print(table)


async def _with_sizes(client: aioredis.Redis, pool: str,
                      rows: Awaitable[T]) -> tuple[T, tuple[int, int, int], int]:
    """The rows, the pool's sizes, and the server's clock to age them by (not this host's).
    A pool the server holds no state of is warned of on stderr, as `status` warns: its empty
    table read as a pool with no node (a newcomer's walkthrough, `--pool nosuch`). The rows
    are awaited first: a server out of reach failed the pool's check and left them never
    awaited, a RuntimeWarning under the error line (an operator's walkthrough)."""
    shown = await rows
    if not await view.pool_exists(client, pool):
        errors.print(f"[yellow]warning:[/yellow] {escape(_no_pool(pool, 'yet'))}")
    return shown, await view.table_sizes(client, pool), await server_now_ms(client)


def _cut(shown: int, total: int, limit: int) -> bool:
    """Whether --limit left some of a table's `total` rows out."""
    return shown >= limit and total > shown


def _counted(shown: int, total: int, limit: int) -> str:
    """A table's count: its rows, and the pool's own where --limit left some out (the title
    counted the rows alone: "nodes (200)" of a pool of 500)."""
    return f"{shown} of {total}: --limit" if _cut(shown, total, limit) else str(shown)


def _say_cut(what: str, shown: int, total: int, limit: int) -> None:
    """On stderr, where --limit left rows out of a JSON table (its stdout the rows alone, as
    before): the table's title says it, the JSON said nothing."""
    if _cut(shown, total, limit):
        errors.print(f"[yellow]warning:[/yellow] {escape(what)}: "
                     f"{_counted(shown, total, limit)} left the others out")


def _typed(record: dict[str, Any]) -> dict[str, Any]:
    """A node record for JSON: its times and counts as numbers, its flags (boot_sample,
    boot_unlearned) as true/false; a value that does not read as its kind (a hand edit) is
    left as the text it is."""
    typed: dict[str, Any] = {}
    for name, value in record.items():
        if (name.endswith("_ms") or name in ("delete_attempts", "creates_seen")) \
                and isinstance(value, str) and value.lstrip("-").isdigit() and len(value) < 20:
            value = int(value)
        elif name in ("boot_sample", "boot_unlearned") and value in ("0", "1"):
            value = value == "1"
        typed[name] = value
    return typed


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container)
        return "operator"


def _ago(now_ms: float, then_ms: float | None) -> str:
    return "-" if then_ms is None else f"{max(0.0, now_ms - then_ms) / 1000:.0f}s"


def _last_active(now_ms: float, then_ms: float | None) -> str:
    """When a user was last active: `12s ago`, or `-` with no activity in the window."""
    return "-" if then_ms is None else _ago(now_ms, then_ms) + " ago"


@app.command()
def users(redis_url: RedisUrl, pool: Pool = "default", as_json: Json = False,
          limit: Limit = 200) -> None:
    """Waiting users, in the order they will be served (a user whose node died goes back to
    the head of the queue), and users holding a node (the longest session first, with when
    each was last active: a session whose disconnect was lost shows up here)."""
    _pool_keys(pool)
    (waiting, sessions), (_, waiting_total, session_total), now = _with_redis(
        redis_url, lambda c: _with_sizes(c, pool, view.user_rows(c, pool, limit)))

    def seconds(then_ms: int | None) -> float | None:
        # never below 0, as the text's and `status`'s: a replica's clock a little ahead
        return None if then_ms is None else round(max(0, now - then_ms) / 1000, 1)

    if as_json:
        typer.echo(json.dumps({
            "waiting": [{"user_id": u, "waiting_s": seconds(s)} for u, s in waiting],
            "allocated": [{"user_id": s.user, "node_id": s.node,
                           "session_s": seconds(s.allocated_ms),
                           "last_active_s": seconds(s.last_activity_ms)} for s in sessions]},
            indent=2))
        _say_cut(f"waiting users of pool {pool}", len(waiting), waiting_total, limit)
        _say_cut(f"connected users of pool {pool}", len(sessions), session_total, limit)
        return
    table = Table(title=f"waiting users of pool {pool} "
                        f"({_counted(len(waiting), waiting_total, limit)})")
    table.add_column("user", no_wrap=True)
    table.add_column("waiting for")
    for user, since in waiting:
        table.add_row(outside(user), _ago(now, since))
    console.print(table)
    table = Table(title=f"connected users of pool {pool} "
                        f"({_counted(len(sessions), session_total, limit)}), longest first")
    for column in ("user", "node", "session", "last active"):
        table.add_column(column, no_wrap=column == "user",
                         overflow="fold" if column == "node" else "ellipsis")
    for session in sessions:
        table.add_row(outside(session.user), outside(session.node), _ago(now, session.allocated_ms),
                      _last_active(now, session.last_activity_ms))
    console.print(table)


_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_CLOCK = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
WHEN_HELP = ("a time before now (90s, 15m, 2h, 1d), a clock time (10:02 or 10:02:30: the last "
             "before now), or an ISO 8601 time (2026-12-05T10:02, with Z or +01:00 or without: "
             "this machine's local time)")


def when_ms(text: str, now: datetime.datetime, option: str,
            after_ms: int | None = None) -> int:
    """A time as `decisions --since/--until` take it (`WHEN_HELP`), in ms from the epoch (0 for
    any time before it: a stream's ids begin there); `now` is aware. A clock time is the last
    before now, or, given `after_ms` (--until after a --since), the first from then on."""
    text = text.strip()
    try:
        after = None if after_ms is None else datetime.datetime.fromtimestamp(
            after_ms / 1000, datetime.UTC)
        moment = _moment(text, now, after)
        if moment is None:
            raise typer.BadParameter(f"{text!r} is not {WHEN_HELP}", param_hint=option)
        return max(0, round(moment.timestamp() * 1000))
    except (OverflowError, ValueError) as exc:  # 99999999d ago, 25:00, year 1 in local time
        raise typer.BadParameter(f"{text!r}: {exc}", param_hint=option) from None


def _moment(text: str, now: datetime.datetime,
            after: datetime.datetime | None = None) -> datetime.datetime | None:
    """The aware time `text` names (`WHEN_HELP`), or None if it is none of its forms."""
    if ago := _AGO.fullmatch(text):
        return now - datetime.timedelta(seconds=float(ago[1]) * _UNIT_S[ago[2]])
    if clock := _CLOCK.fullmatch(text):
        wall = (now if after is None else after).astimezone().replace(
            tzinfo=None, hour=int(clock[1]), minute=int(clock[2]), second=int(clock[3] or 0),
            microsecond=0)
        # Each in its own offset, not now's: on a day the clocks change, one on the other side
        # of the change was an hour off.
        if after is None:
            # The last such time: 23:50 asked at 00:10 is yesterday's; a time shown twice
            # (02:30 as the clocks go back) the later.
            return max(moment for day in (wall, wall - datetime.timedelta(days=1))
                       for fold in (0, 1) if (moment := day.replace(fold=fold).astimezone()) <= now)
        # The first from `after` on: --until 10:03 after --since 10:01 asked at 10:02 is
        # today's, not yesterday's (refused as before --since); 00:05 after 23:50 tomorrow's.
        return min(moment for day in (wall, wall + datetime.timedelta(days=1))
                   for fold in (0, 1) if (moment := day.replace(fold=fold).astimezone()) >= after)
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.astimezone()  # naive: this machine's local time


def _local_time(ms: int | None) -> str:
    if ms is None:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))
    except (OverflowError, OSError, ValueError):  # a `now` edited by hand
        return str(ms)


@app.command()
def decisions(
    redis_url: RedisUrl,
    pool: Pool = "default",
    since: Annotated[str | None, typer.Option(
        help=f"Entries written from this time: {WHEN_HELP}")] = None,
    until: Annotated[str | None, typer.Option(
        help="Entries written up to this time, as --since takes it, but a clock time is the "
        "first from --since on where --since is given (default: now)")] = None,
    kind: Annotated[list[str] | None, typer.Option(
        "--kind", help=f"Only entries of this kind (repeatable): {', '.join(view.DECISION_KINDS)}"
    )] = None,
    user: Annotated[str | None, typer.Option(
        help="Only entries about this user: its misses and operators' releases of it")] = None,
    as_json: Json = False,
    limit: Limit = 200,
) -> None:
    """Scaling actions, misses and operators' releases and drains in a span of time, each with
    its reason and numbers: why nodes were booted at 10:02 is `--since 10:01 --until 10:03
    --kind scale_up`, why a user waited `--user ID --kind miss`. The stream keeps about the
    last 1,000 entries; a span it no longer holds says what it does."""
    _pool_keys(pool)
    kinds = frozenset(kind or ())
    if unknown := sorted(kinds - set(view.DECISION_KINDS)):
        raise typer.BadParameter(f"{', '.join(map(repr, unknown))}: not a kind of decision "
                                 f"({', '.join(view.DECISION_KINDS)})", param_hint="--kind")
    if user is not None and not ID_PATTERN.match(user):  # none the service takes is
        raise typer.BadParameter(f"{user[:40]!r} is not a user id ({ID_RULE})",
                                 param_hint="--user")
    now = datetime.datetime.now(datetime.UTC)
    start = None if since is None else when_ms(since, now, "--since")
    end = None if until is None else when_ms(until, now, "--until", start)
    if start is not None and end is not None and start > end:
        raise typer.BadParameter(f"{since!r} is after --until {until!r}", param_hint="--since")

    async def read(client: aioredis.Redis) -> view.DecisionSpan | None:
        if not await view.pool_exists(client, pool):
            return None
        return await view.decision_rows(client, pool, start, end, kinds, limit, user)

    span = _with_redis(redis_url, read)
    if span is None:
        raise _fail(_no_pool(pool))
    if as_json:
        typer.echo(json.dumps({
            "decisions": [view.decision_json(entry) for entry in span.entries],
            "more": span.more, "stream_length": span.length,
            "stream_from_ms": span.held[0] if span.held else None,
            "stream_to_ms": span.held[1] if span.held else None}, indent=2))
        return
    what = ("entries" if not kinds else " and ".join(sorted(kinds)) + " entries") + (
        "" if user is None else f" about user {user}")
    since_shown = "the first" if start is None else _local_time(start)
    until_shown = "now" if end is None else _local_time(end)
    table = Table(title=f"{what} of pool {pool}, {since_shown} to {until_shown} "
                        f"({time.strftime('%Z')}): {len(span.entries)}"
                        f"{' and more: --limit' if span.more else ''}")
    for column in ("time", "replica", "kind", "acted", "reason"):
        table.add_column(column, no_wrap=column == "time",
                         overflow="fold" if column == "reason" else "ellipsis")
    for entry in span.entries:
        table.add_row(*map(outside, (_entry_time(entry), entry.get("replica", ""),
                                     entry.get("kind", ""), entry.get("acted", ""),
                                     entry.get("reason", ""))))
    console.print(table)
    if not span.entries:
        held = ("the stream is empty" if span.held is None else
                f"the stream holds {span.length} entries, written from "
                f"{_local_time(span.held[0])} to {_local_time(span.held[1])}")
        filters = [f for f, given in (("--kind", kinds), ("--user", user is not None)) if given]
        none = (f"none in that span of the {' and '.join(filters)} asked" if filters
                else "none in that span")
        console.print(outside(f"{none}: {held}"))


#: How far a replica's time of deciding may be from the server's time of writing before the
#: table shows both: as far as ProvisionerClockOffset allows.
CLOCKS_APART_MS = 2000


def _entry_time(entry: dict[str, str]) -> str:
    """When an entry was decided, by the replica's clock; and by the server's, which the span
    is selected by, where a replica's clock off by more than CLOCKS_APART_MS puts the two
    apart (an entry asked for from 10:01 would show 10:11 with no word why): the time
    written alone on the same day, else with its date (a clock a day ahead showed tomorrow's
    10:00:00 "(written 10:00:00)")."""
    written = view.written_ms(entry["id"])
    decided = view.time_ms(entry.get("now"))
    if decided is None:  # taken away by a hand: the server's
        return _local_time(written)
    if written is not None and abs(decided - written) > CLOCKS_APART_MS:
        shown, written_shown = _local_time(decided), _local_time(written)
        if shown[:11] == written_shown[:11]:  # the same day: its time alone
            written_shown = written_shown[11:]
        return f"{shown} (written {written_shown})"
    return _local_time(decided)


def _operator_args(ids: list[str], kind: str, by: str) -> tuple[list[str], str]:
    """An operator's command's ids and name, checked before anything is read: each id once (a
    user named twice to `release` was released once, and the second said the state had
    changed since it was shown, exit 1), each one the service would accept from an event (no
    other could be in the pool); `by` stripped, else the login name, at most 64 printable
    characters. Exit 2 naming what is wrong."""
    ids = list(dict.fromkeys(ids))
    bad = [one for one in ids if not ID_PATTERN.match(one)]
    if bad:
        raise _fail(f"not a {kind} id ({ID_RULE}): "
                    f"{', '.join(repr(one[:40]) for one in bad[:5])}"
                    + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    by = by.strip() or _login_name()
    if len(by) > 64 or not by.isprintable():
        raise _fail("--by must be at most 64 printable characters")
    return ids, by


def _done_part_way(redis_url: str, work: Callable[[aioredis.Redis], Awaitable[T]],
                   done: Mapping[str, object], asked: list[str], shown_by: str) -> T:
    """`_with_redis(redis_url, work)`, where Ctrl-C or SIGTERM between its calls exits 130
    saying which of the ids `asked` are `done` so far, and that the one under way may have
    been: each is its own transition, and one stopped part way had said nothing of those made.
    So does a server lost under way (exit 2, after its error): a reply that did not come in
    time is of a script a frozen server runs when it wakes (a review's drill)."""
    lost = False

    async def watched(client: aioredis.Redis) -> T:
        nonlocal lost
        try:
            return await work(client)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            lost = True
            raise

    def say(what: str) -> None:
        made = [one for one in asked if one in done]
        rest = [one for one in asked if one not in done]
        errors.print(shown(f"{what} {len(made)} of {len(asked)}: "
                           f"{', '.join(made) or 'none'} done; "
                           + (f"{rest[0]} may or may not have been, " if rest else "")
                           + (f"{', '.join(rest[1:])} not; " if rest[1:] else "")
                           + f"`provisioner {shown_by}` shows each"))

    with _sigterm_as_ctrl_c():
        try:
            return _with_redis(redis_url, watched)
        except KeyboardInterrupt:
            say("stopped after")
            raise typer.Exit(130) from None
        except typer.Exit:
            if lost:
                say("cut off from the server after")
            raise


def _confirm(question: str, done: str, does: str) -> None:
    """Ask `question`; not confirmed, or no one to answer (a script, no input), exit 2 saying
    nothing was `done`, and that --yes `does` without asking."""
    try:
        confirmed = typer.confirm(question)
    except typer.Abort:
        raise _fail(f"not confirmed (no answer): nothing {done}; --yes {does} without "
                    "asking") from None
    if not confirmed:
        raise _fail(f"not confirmed: nothing {done}")


@app.command()
def release(
    user_ids: Annotated[list[str], typer.Argument(
        metavar="USER...", help="Users whose sessions to end, as their disconnects would")],
    redis_url: RedisUrl,
    pool: Pool = "default",
    by: By = "",
    yes: Yes = False,
) -> None:
    """End sessions whose user:disconnect was lost: each user's node goes back to the pool (or
    to the oldest waiting user), or a waiting user leaves the queue, exactly as a disconnect
    would; each release is logged to the decisions stream under --by. Exits 1 if a user held
    nothing, 2 if not confirmed or the server holds no pool of that name. A user still
    connected loses their node: check `provisioner users` first."""
    keys = _pool_keys(pool)
    user_ids, by = _operator_args(user_ids, "user", by)

    # What each user was shown as holding, passed to the script: a session begun, or a node
    # handed out, while the prompt waited is not released on the strength of the old state. A
    # session is known by its node and when it began: a user who disconnects and connects again
    # meanwhile may be handed the same node.
    as_seen: dict[str, tuple[str, int | None]] = {}

    async def held(client: aioredis.Redis) -> dict[str, str]:
        await _before_writing(client, pool, WRITES_WITH_OWN)
        waiting, sessions = await view.user_rows(client, pool, limit=10**9)
        now = await server_now_ms(client)
        found: dict[str, str] = {}
        mine = [s for s in sessions if s.user in user_ids]
        began = await client.zmscore(keys.key("sessions"), [s.user for s in mine]) if mine else []
        for s, start in zip(mine, began, strict=True):
            drained = await client.hexists(keys.node(s.node), "drain_by")
            found[s.user] = (f"holds node {s.node} (session {_ago(now, s.allocated_ms)}, "
                             f"last active {_last_active(now, s.last_activity_ms)}"
                             + (", drained: it ends with the session" if drained else "") + ")")
            as_seen[s.user] = (f"node:{s.node}", None if start is None else int(start))
        for u, since in waiting:
            if u in user_ids:
                found[u] = f"waits (for {_ago(now, since)})"
                as_seen[u] = ("waiting", None)
        return found

    state = _with_redis(redis_url, held)
    for user in user_ids:
        console.print(f"{shown(user)}: {shown(state.get(user, 'holds nothing'))}")
    if not state:
        raise typer.Exit(1)
    if not yes:
        # exit 2, not the exit 1 of a user who held nothing
        _confirm(f"Release {len(state)} user(s) of pool {pool}?", "released", "releases")

    from provisioner.scripts import Release, ReleaseResult, Scripts

    done: dict[str, ReleaseResult] = {}
    # The waiting users leave the queue first: a node a named session frees goes to the
    # oldest waiting user, and one named here has left too (the node would go to them,
    # and their own release would then be refused as changed since it was shown).
    order = sorted(user_ids, key=lambda user: as_seen.get(user, ("",))[0] != "waiting")

    async def go(client: aioredis.Redis) -> dict[str, ReleaseResult]:
        scripts = Scripts(client, keys)
        now = await server_now_ms(client)
        for user in order:
            expected, session_ms = as_seen.get(user, ("nothing", None))
            done[user] = await scripts.release(now, user, by, expected=expected,
                                               session_ms=session_ms)
        return done

    outcomes = _done_part_way(redis_url, go, done, order, "users")
    nothing = False
    for user in user_ids:
        outcome = outcomes[user]
        if outcome.code is Release.RELEASED:
            whom = (f"to waiting user {outcome.served[0].user_id}" if outcome.served
                    else "back to the ready list")
            console.print(f"[green]released[/green] {shown(user)}: node "
                          f"{shown(outcome.node_id)} {shown(whom)}")
        elif outcome.code is Release.DRAINED:
            console.print(f"[green]released[/green] {shown(user)}: node "
                          f"{shown(outcome.node_id)} terminating, as it was drained during the "
                          "session; a replica sends its DELETE at its next tick")
        elif outcome.code is Release.ABANDONED:
            console.print(f"[green]released[/green] {shown(user)}: left the waiting queue")
        elif outcome.code is Release.STALE:
            console.print(f"[green]released[/green] {shown(user)}: a stale allocation of node "
                          f"{shown(outcome.node_id)} dropped (its record is not this user's "
                          "session): no node freed")
        elif outcome.code is Release.CHANGED:
            nothing = True
            now_holds = (f"holds node {outcome.node_id}" if outcome.node_id
                         else "waits or holds nothing")
            console.print(f"{shown(user)}: changed since it was shown (now {shown(now_holds)}): "
                          "nothing done; look again with `provisioner users`")
        else:
            nothing = True
            console.print(f"{shown(user)}: held nothing, nothing done")
    if nothing:
        raise typer.Exit(1)


@app.command()
def drain(
    node_ids: Annotated[list[str], typer.Argument(
        metavar="NODE...", help="Nodes to take out of the pool")],
    redis_url: RedisUrl,
    pool: Pool = "default",
    at_once: Annotated[bool, typer.Option(
        "--now", help="End a session on the node now: its user goes back to the head of the "
        "waiting queue, as when a node dies (without it, the node goes when its session "
        "ends)")] = False,
    cancel: Annotated[bool, typer.Option(
        "--cancel", help="Take back the drain of nodes in a session: each goes back to the "
        "pool when its session ends (a node terminating already cannot come back)")] = False,
    by: By = "",
    yes: Yes = False,
) -> None:
    """Take nodes out of the pool (one that misbehaves, or for maintenance): a ready or
    booting node is terminated now, a replica sending its DELETE at its next tick, and the
    forecast boots a replacement if its target wants one; a node in a session is terminated
    when the session ends (--now: at once). Each drain is logged to the decisions stream under
    --by. --cancel takes back the drain of a node still in its session. Exits 1 if a node was
    not drained (unknown, ending already, drained already in its session, or changed since it
    was shown; with --cancel, not drained in a session), 2 if not confirmed or the server
    holds no pool of that name."""
    keys = _pool_keys(pool)
    node_ids, by = _operator_args(node_ids, "node", by)
    if cancel and at_once:
        raise _fail("--cancel takes a drain back; --now ends a session: give one of them")

    # What each node was shown as, and when the session shown began (passed to the script,
    # which refuses a drain of a node whose state is another by then: a node handed to a user
    # while the prompt waited, or a session begun since on the same node).
    as_seen: dict[str, str] = {}
    session_began: dict[str, int] = {}

    async def states(client: aioredis.Redis) -> dict[str, str]:
        from provisioner.scripts import as_text

        await _before_writing(client, pool, DRAINS_WITH_OWN)
        now = await server_now_ms(client)
        found = {}
        for node in node_ids:
            record = {as_text(k): as_text(v)
                      for k, v in (await client.hgetall(keys.node(node))).items()}
            state = record.get("state", "")
            if state in ("ready", "booting"):
                since = record.get("idle_since_ms" if state == "ready" else "created_ms")
                found[node] = (f"{state} ({'idle' if state == 'ready' else 'booting'} for "
                               f"{_ago(now, view.time_ms(since))})")
                if cancel and "drain_by" in record:
                    # a mark a replica of an earlier release left on a node it freed
                    found[node] += ", drained when a session on it ends"
                    as_seen[node] = state
                elif cancel:
                    found[node] += ": not drained, nothing to take back"
                else:
                    as_seen[node] = state
            elif state == "allocated":
                user = record.get("user", "")
                held = await client.hget(keys.key("alloc"), user) if user else None
                if held is None or as_text(held) != node:
                    user = ""
                began = await client.zscore(keys.key("sessions"), user) if user else None
                if began is not None:
                    session_began[node] = int(began)
                found[node] = (f"in the session of user {user} (for "
                               f"{_ago(now, view.time_ms(record.get('allocated_ms')))})"
                               + (", drained already when it ends" if record.get("drain_by")
                                  else "") if user else "allocated, with no session of its user")
                if not cancel or "drain_by" in record:
                    as_seen[node] = f"allocated:{user}"
                else:
                    found[node] += ": not drained, nothing to take back"
            else:
                found[node] = (f"{state}: nothing to {'take back' if cancel else 'drain'}"
                               if state else "unknown to the pool")
        return found

    shown_states = _with_redis(redis_url, states)
    for node in node_ids:
        console.print(f"{shown(node)}: {shown(shown_states[node])}")
    if not as_seen:
        raise typer.Exit(1)
    if not yes:
        in_session = sum(seen.startswith("allocated:") for seen in as_seen.values())
        what = (" (ending their sessions now)" if at_once else
                " (those in a session when it ends)") if in_session else ""
        if cancel:
            _confirm(f"Take back the drain of {len(as_seen)} node(s) of pool {pool}?",
                     "taken back", "takes them back")
        else:
            _confirm(f"Drain {len(as_seen)} node(s) of pool {pool}{what}?", "drained",
                     "drains")

    from provisioner.scripts import Drain, DrainResult, Scripts

    done: dict[str, DrainResult] = {}

    async def go(client: aioredis.Redis) -> tuple[dict[str, DrainResult], bool]:
        scripts = Scripts(client, keys)
        now = await server_now_ms(client)
        for node, expected in as_seen.items():
            done[node] = await scripts.drain_node(now, node, by, expected=expected,
                                                  at_once=at_once,
                                                  session_ms=session_began.get(node),
                                                  cancel=cancel)
        return done, _heard_lately(await _replicas_seen(client, pool))

    outcomes, heard = _done_part_way(redis_url, go, done, list(as_seen), "nodes")
    undrained = len(node_ids) > len(outcomes)
    for node, outcome in outcomes.items():
        if outcome.code is Drain.DRAINING:
            back = (f"; user {outcome.user} back at the head of the queue" if outcome.user
                    else "")
            served = (f", served node {outcome.served[0].node_id}" if outcome.served
                      and outcome.served[0].user_id == outcome.user else "")
            console.print(f"[green]drained[/green] {shown(node)}: terminating (it was "
                          f"{shown(outcome.state)}){shown(back + served)}; a replica sends its "
                          "DELETE at its next tick")
        elif outcome.code is Drain.MARKED:
            console.print(f"[green]drained[/green] {shown(node)}: terminated when the session "
                          f"of user {shown(outcome.user)} ends")
        elif outcome.code is Drain.CANCELLED:
            console.print(f"[green]taken back[/green] {shown(node)}: " + (
                f"back to the pool when the session of user {shown(outcome.user)} ends"
                if outcome.user else "it stays in the pool"))
        elif outcome.code is Drain.CHANGED:
            undrained = True
            console.print(f"{shown(node)}: changed since it was shown (now "
                          f"{shown(outcome.state or 'unknown')}): nothing done; look again "
                          "with `provisioner nodes`")
        elif outcome.user and not cancel:
            undrained = True
            console.print(f"{shown(node)}: drained already, terminated when the session of "
                          f"user {shown(outcome.user)} ends; nothing done"
                          + (" (--now ends it now)" if not at_once else ""))
        else:
            undrained = True
            console.print(f"{shown(node)}: {shown(outcome.state or 'unknown')}, nothing done")
    if not heard and any(o.code is Drain.DRAINING for o in outcomes.values()):
        console.print(f"[yellow]no replica of pool {shown(pool)} has sent a heartbeat in the "
                      "last minute: the DELETEs go out at the next tick of one[/yellow]")
    if undrained:
        raise typer.Exit(1)


@app.command()
def replace(
    redis_url: RedisUrl,
    pool: Pool = "default",
    cutoff: Annotated[str, typer.Option(
        help="Go on with the run that printed this (COUNT@EPOCH: the pool's create count "
        "when it began; default: every node the pool holds now)")] = "",
    at_once: Annotated[int, typer.Option(
        min=1, max=1000, help="Most ready nodes drained together, and the spare nodes the "
        "pool holds above its keep level while it runs, booted before each batch goes")] = 1,
    max_unavailable: Annotated[int, typer.Option(
        min=0, max=1000, help="Ready nodes the run may take the pool below its own keep "
        "level before their replacements are ready (never its last ready node), each batch "
        "waiting for it to meet that level again: faster, at that many fewer ready nodes; "
        "needed at max_nodes, which leaves no room for the spare")] = 0,
    wait_limit: Annotated[float, typer.Option(
        min=1, max=86_400, help="Seconds with the old nodes unchanged (a boot that never "
        "ends, no replica deciding, a pool held short) before it stops, exit 1")] = 600.0,
    cancel: Annotated[bool, typer.Option(
        "--cancel", help="Stop a run going on (its hold of spare nodes let go) and take back "
        "the drains runs placed under --by on old nodes still in a session: each goes back "
        "to the pool when its session ends")] = False,
    by: By = "",
    yes: Yes = False,
) -> None:
    """Replace every node of the pool in turn (a new node image, a driver update), a few at a
    time: a node in a session is drained in it (terminated when it ends); while it runs the pool
    holds --at-once spare nodes above its keep level, and ready nodes are drained --at-once at a
    time, only while the pool's ready nodes meet the level it keeps them at, so each batch is
    booted before it goes (--max-unavailable lets that many go first); a node booting, once
    ready. Stop it (Ctrl-C, SIGTERM) and run it
    again with the --cutoff it printed to go on. Exits 0 when no old node is ready or booting
    (those in a session go when it ends, the last replacements boot); 1 if the old nodes stood
    still for --wait-limit seconds, no replica runs, or the pool's state was lost meanwhile; 2
    if not confirmed, the pool has no epoch, or Redis could not be reached."""
    from provisioner import replace as rolling
    from provisioner.scripts import HOLD_LEASE_MS

    keys = _pool_keys(pool)
    _, by = _operator_args([], "node", by)
    given = None
    if cutoff:
        try:
            given = rolling.Cutoff.parse(cutoff)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--cutoff") from None

    async def plan(client: aioredis.Redis) -> tuple[rolling.Cutoff, rolling.Cutoff,
                                                    list[rolling.OldNode], bool]:
        heard = _heard_lately(await _before_writing(client, pool, DRAINS_WITH_OWN))
        now = await rolling.cutoff_now(client, keys)
        chosen = given or now
        return chosen, now, await rolling.old_nodes(client, keys, chosen), heard

    chosen, now, old, heard = _with_redis(redis_url, plan)
    epoch, now_creates = now.epoch, now.creates
    if not epoch:
        raise _fail(f"pool {pool} has no epoch (no replica of a release since 296bf1d has "
                    "sent a heartbeat): a run could not tell a state lost meanwhile; nothing "
                    "drained")
    if chosen.epoch != epoch:
        raise _fail(f"--cutoff {chosen} is of the pool's state begun as {chosen.epoch}; it "
                    f"holds {epoch} now (lost and begun again since, its create "
                    "count with it): run it without --cutoff")
    if chosen.creates > now_creates:
        # A run never printed one: the nodes made after its start, its own replacements among
        # them, would be taken for old, drained, and made again without end (a review).
        raise _fail(f"--cutoff {chosen} counts {chosen.creates} creates, and pool {pool} has "
                    f"made {now_creates} in that state: no run printed it (a typo?); give "
                    "the one the run printed, or none; nothing drained")
    resume = f"--cutoff {chosen}"
    console.print(f"nodes of pool {shown(pool)} of its first {chosen.creates} creates, and "
                  f"any it adopted ({shown(resume)}):")
    if cancel:
        _take_back_replace(redis_url, keys, chosen, old, by + rolling.TAG, yes, pool)
        return
    counts = {state: sum(n.state == state for n in old)
              for state in ("ready", "booting", "allocated")}
    to_mark = sum(1 for n in old if n.state == "allocated" and n.user and not n.drained_by)
    console.print(f"  {counts['ready']} ready, {counts['booting']} booting, "
                  f"{counts['allocated']} in a session ({to_mark} to drain in it)")
    if not counts["ready"] and not counts["booting"] and not to_mark:
        console.print("nothing to replace")
        return
    if not heard:
        errors.print(f"[red]error:[/red] no replica of pool {shown(pool)} has sent a heartbeat "
                     "in the last minute: nothing would send the DELETEs or boot the "
                     "replacements; nothing drained")
        raise typer.Exit(1)
    if not yes:
        below = (f", the pool up to {max_unavailable} below its keep level before their "
                 "replacements are ready" if max_unavailable else "")
        _confirm(f"Replace them, {at_once} ready node(s) at a time{below}?", "drained",
                 "replaces them")

    def say(line: str) -> None:
        console.print(f"{time.strftime('%H:%M:%S')} {shown(line)}")

    outcome = rolling.Outcome(done=False)

    async def go(client: aioredis.Redis) -> rolling.Outcome:
        return await rolling.replace_nodes(client, keys, chosen, by=by, at_once=at_once,
                                           max_unavailable=max_unavailable,
                                           wait_limit_s=wait_limit, say=say, outcome=outcome)

    def so_far() -> str:
        return (f"drained {len(outcome.drained)} ready node(s) and {len(outcome.marked)} in a "
                "session")

    stopped = (f"run it again with {resume} to go on; the nodes drained in their sessions "
               f"so far end with them (--cancel {resume} takes that back)")
    # SIGTERM stops it as Ctrl-C does (`docker stop` of a run in a container, its PID 1,
    # which ignores a signal it has no handler for: a review's run drained three more nodes
    # in the 10 s before the KILL, and said nothing of where it stopped).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        _with_redis(redis_url, go)
    except KeyboardInterrupt:
        console.print(f"{so_far()}; stopped: {stopped}")
        raise typer.Exit(130) from None
    except typer.Exit:  # Redis gone or refusing, said on stderr
        errors.print(f"{so_far()}; stopped: {stopped}")
        if outcome.hold_left:
            errors.print(f"its hold of {at_once} spare node(s) could not be let go: the pool "
                         f"holds them until its lease ends, within {HOLD_LEASE_MS // 1000} s "
                         f"(`replace --cancel {resume}` lets go of it at once)")
        raise
    console.print(so_far())
    if outcome.lost:
        errors.print("[red]error:[/red] the pool's state was lost and begun again while it "
                     "ran (a new epoch): the nodes adopted since are no longer told apart by "
                     "their creates; stopped; run it again without --cutoff")
        raise typer.Exit(1)
    if outcome.taken_back is not None:
        who = (f"taken over by another run ({outcome.taken_back})" if outcome.taken_back
               else "let go by replace --cancel, or lost as its lease ended while the server "
               "refused its writes" if outcome.lapsed else "let go by replace --cancel")
        # Not `stopped`'s "--cancel takes that back": a cancel may have done so already.
        errors.print(f"[red]error:[/red] its hold of spare nodes was {who}: stopped; run it "
                     f"again with {resume} to go on")
        raise typer.Exit(1)
    if not outcome.done:
        errors.print(f"[red]error:[/red] the old nodes stood still for {wait_limit:.0f}s "
                     f"while it waited for {shown(outcome.waited_for)}: stopped; run it again "
                     f"with {resume} to go on")
        raise typer.Exit(1)
    left = len(outcome.in_sessions)
    console.print("[green]done[/green]: no old node is ready or booting (the last "
                  "replacements are the pool's to boot)" + (
                      f"; {left} in a session, each terminated when its session ends"
                      if left else ""))


def _take_back_replace(redis_url: str, keys: PoolKeys, cutoff: Any, old: list[Any], tag: str,
                       yes: bool, pool: str) -> None:
    """`replace --cancel`: let go of a run's hold of spare nodes, so that a run going on stops
    (lua/hold_spare.lua), then take back the drains placed under `tag` on old nodes still in
    a session, by any run of this cutoff or an earlier one. Exit 1 if one could not be (its
    session ended meanwhile)."""
    from provisioner import replace as rolling
    from provisioner.scripts import Drain, Hold, Scripts

    def drained(nodes: list[Any]) -> list[Any]:
        return [n for n in nodes if n.state == "allocated" and n.user and n.drained_by == tag]

    marked = drained(old)
    console.print(f"  {len(marked)} in a session drained by {shown(tag)}")
    if not yes:
        _confirm(f"Stop a run going on, and take back the drain of {len(marked)} node(s) of "
                 f"pool {pool}?", "taken back", "takes them back")

    async def go(client: aioredis.Redis) -> tuple[bool, list[tuple[str, str]], int]:
        scripts = Scripts(client, keys)
        let_go, _ = await scripts.hold_spare(await server_now_ms(client), "release", "")
        # A run going on stops at its next round, and every mark it makes from now is
        # refused (drain_node.lua, NOT_HELD); those it made before are read again (a
        # review's cancel, made while a run went on, was undone by the run within 2 s, and a
        # cancel that waited for the run's round instead missed the marks of a slow one).
        nodes = drained(await rolling.old_nodes(client, keys, cutoff))
        now = await server_now_ms(client)
        kept: list[tuple[str, str]] = []  # each drain not taken back, with its node's state
        for n in nodes:
            result = await scripts.drain_node(now, n.node, tag, expected=f"allocated:{n.user}",
                                              session_ms=n.session_ms, cancel=True)
            if result.code is not Drain.CANCELLED:
                kept.append((n.node, result.state or "gone"))
        return let_go is Hold.RELEASED, kept, len(nodes)

    stopped, kept, tried = _with_redis(redis_url, go)
    if stopped:
        console.print("a run's hold of spare nodes let go: a run going on stops")
    for node, state in kept:
        console.print(f"{shown(node)}: not taken back, now {shown(state)} (its session ended "
                      "before the cancel, or it changed)")
    console.print(f"[green]taken back[/green] {tried - len(kept)} of {tried}: each goes back to "
                  "the pool when its session ends")
    if kept:
        raise typer.Exit(1)


@app.command()
def check(redis_url: RedisUrl, pool: Pool = "default") -> None:
    """Verify the pool's invariants (exit 1 and list what is wrong if any is broken; exit 2
    if the server holds no state of the pool: a misspelt --pool passed as healthy)."""
    _pool_keys(pool)

    async def go(client: aioredis.Redis) -> list[str] | None:
        if not await view.pool_exists(client, pool):
            return None
        return await view.check_invariants(client, pool)

    problems = _with_redis(redis_url, go)
    if problems is None:
        raise _fail(_no_pool(pool))
    if problems:
        for problem in problems:
            console.print(f"[red]x[/red] {shown(problem)}")
        raise typer.Exit(1)
    console.print("[green]ok[/green]: every invariant holds")


@app.command()
def reconcile(
    ctx: typer.Context,
    redis_url: RedisUrl,
    node_api_url: Annotated[str, typer.Option(
        "--node-api-url", envvar="PROVISIONER_NODE_API_URL",
        help="Base URL of the Node Management API")],
    pool: Pool = "default",
) -> None:
    """Repair the pool against GET /api/nodes once: adopt unknown nodes, end vanished ones.
    Exits 2 if the Node API gives no node list, or if the server holds no state of the pool (a
    misspelt --pool would take every node into a pool no replica runs; a replica takes the
    Node API's nodes in itself before its first decision)."""
    from provisioner.nodeapi import HttpNodeApi
    from provisioner.service import Replica

    # The replica's warnings (each node adopted or ended) as the service writes them, what a
    # terminal acts on in an id escaped: Python's last-resort handler wrote them raw.
    setup_logging(level="WARNING")
    service = ServiceConfig(redis_url, node_api_url, pool=pool)
    found = _by_options(ctx, _options_of(ctx, ServiceConfig), service.check())
    if found:
        raise _fail("invalid service settings: " + "; ".join(found))

    async def go(client: aioredis.Redis) -> tuple[dict[str, Any] | None, float]:
        """The repairs' counts (None: no node list), and the pool's create timeout."""
        await _before_writing(client, pool, WRITES_WITH_OWN, no_pool=(
            "nothing was compared (a replica started on the pool takes the Node API's nodes "
            "in before its first decision)"))
        api = HttpNodeApi(node_api_url)
        try:
            config = await _published_config(client, PoolKeys(pool))
            # The server's clock, as `drain` and `release` stamp by: from a host minutes off
            # the replicas', the create timeout's grace was judged by the host's, and a node
            # booted seconds before was declared terminated (a review).
            clock = OffsetClock(await server_now_ms(client) - WallClock().now_ms())
            replica = Replica(client, service, config, api, clock=clock)
            counts = await replica.reconcile()
            await replica.drain(10.0)
            return None if counts is None else dict(counts), config.create_timeout_s
        finally:
            await api.aclose()

    counts, grace_s = _with_redis(redis_url, go)
    if counts is None:
        raise _fail(f"the Node API at {shown_url(node_api_url)} gave no node list (unreachable, "
                    "an error, or no GET /api/nodes): nothing was compared")
    typer.echo(json.dumps(counts))
    from provisioner.service import LEFT_FOR_LATER

    if counts.get(LEFT_FOR_LATER):
        errors.print(f"{counts[LEFT_FOR_LATER]} node(s) the Node API does not list were left, "
                     f"as younger than the pool's create timeout ({grace_s:g}s: a create "
                     "perhaps still on its way); a reconciliation after it judges them")


@app.command()
def dev(
    ctx: typer.Context,
    redis_url: Annotated[str, typer.Option(
        "--redis-url", envvar="PROVISIONER_REDIS_URL", callback=redis_url_option,
        help="Use this Redis; by default a private server is started")] = "",
    replicas: Annotated[int, typer.Option(min=1, max=16, help="Service replicas to start")] = 2,
    boot_delay: Annotated[str, typer.Option(
        callback=mock_node_api.boot_delay_option, help="Mock boot delay spec")
    ] = "lognormal:20:45",
    arrival_rate: Annotated[float, typer.Option(
        min=0.01, max=100_000, help="Simulated users per minute")] = 20.0,
    mock_options: Annotated[str, typer.Option(
        metavar="OPTIONS", help="Further options of the mock Node API, in one quoted word "
        "(see `provisioner mock-node-api --help`): '--latency 3 --answer-latency 6'")] = "",
    simulate_options: Annotated[str, typer.Option(
        metavar="OPTIONS", help="Further options of the simulator, in one quoted word (see "
        "`provisioner simulate --help`): '--session 120' or '--trace FILE --speed 10'")] = "",
) -> None:
    """The whole local stack: server, mock Node API, simulator, replicas, live status view."""
    from provisioner.devstack import options_passed_on, run_stack

    mock, _ = options_passed_on(mock_options, "mock-node-api", mock_node_api.command,
                                "--mock-options")
    simulate, parsed = options_passed_on(simulate_options, "simulate", simulator.command,
                                         "--simulate-options")
    # With a trace, what the simulator would refuse once started (from its log): a synthetic
    # option given with it, or the stack's own --arrival-rate, which is then not passed on.
    try:
        simulator.synthetic_options_refused(parsed)
    except typer.BadParameter as exc:
        raise typer.BadParameter(f"simulate: {exc.format_message()}",
                                 param_hint="--simulate-options") from None
    rate: float | None = arrival_rate
    if parsed.params.get("trace") is not None:
        if simulator.option_given(ctx, "arrival_rate"):
            raise simulator.not_with_a_trace("arrival_rate")
        rate = None
    raise typer.Exit(run_stack(redis_url=redis_url or None, replicas=replicas,
                               boot_delay=boot_delay, arrival_rate=rate, mock=mock,
                               simulate=simulate))


model_app = typer.Typer(
    help="The pool's learned model (chances, boot time, release rate): export it to a file, "
    "import it into a new pool or after a data loss.", no_args_is_help=True)


@model_app.command("show")
def model_show(redis_url: RedisUrl, pool: Pool = "default", as_json: Json = False) -> None:
    """What the pool has learned, as the forecast reads it: each cell's chance of a connect
    within the horizon, the users not browsing yet's, the boot time, sessions, arrivals."""
    from provisioner.scripts import Scripts

    keys = _pool_keys(pool)

    async def read(client: aioredis.Redis) -> dict[str, Any]:
        if not await view.pool_exists(client, pool):  # the priors, shown as `status` warns
            errors.print(f"[yellow]warning:[/yellow] {escape(_no_pool(pool))}: what follows "
                         "is the priors alone")
        config = await _published_config(client, keys)
        await _replicas_release(client, pool, READS_WITH_OWN)
        return await Scripts(client, keys).model_view(
            config.policy_args(await server_now_ms(client), "cli"))

    learned = _with_redis(redis_url, read)
    if as_json:
        typer.echo(json.dumps(learned, indent=2))
        return
    console.print(view.render_model(pool, learned))


@model_app.command("export")
def model_export(
    redis_url: RedisUrl,
    pool: Pool = "default",
    out: Annotated[Path | None, typer.Option(
        "--out", dir_okay=False, help="File to write (default: standard output)")] = None,
) -> None:
    """Write what the pool has learned as a provisioner-model/1 JSON file."""
    from provisioner.model import model_document
    from provisioner.scripts import Scripts

    keys = _pool_keys(pool)

    async def read(client: aioredis.Redis) -> tuple[dict[str, str], list[str], int]:
        await _replicas_release(client, pool, READS_WITH_OWN)  # on stderr: stdout is the file
        scripts, now = Scripts(client, keys), await server_now_ms(client)
        raw = await scripts.read_model()
        if not raw:
            return raw, [], now
        return raw, await scripts.learned_fields(PoolConfig().policy_args(now, "cli")), now

    raw, learned, now = _with_redis(redis_url, read)
    if not raw:
        raise _fail(f"pool {pool} has no model: it has not decided yet, or the pool name is "
                    "wrong")
    document = model_document(raw, learned, pool, now)
    text = json.dumps(document, indent=1) + "\n"
    if out is None:
        typer.echo(text, nl=False)
    else:
        try:
            out.write_text(text)
        except OSError as exc:  # a raw "FileNotFoundError: …" before (an operator's walkthrough)
            raise _fail(f"cannot write {out}: {exc.strerror or exc}; nothing written") from None
        console.print(f"{len(document['fields'])} learned fields of pool {pool} written to "
                      f"{escape(str(out))}")
    if document.get("skipped"):
        errors.print("[yellow]left out, not non-negative numbers:[/yellow] "
                     + escape(", ".join(document["skipped"])))


@model_app.command("import")
def model_import(
    model_file: Annotated[Path, typer.Argument(
        metavar="FILE", exists=True, dir_okay=False,
        help="A provisioner-model/1 JSON file, as `model export` writes it")],
    redis_url: RedisUrl,
    pool: Pool = "default",
    replace: Annotated[bool, typer.Option(
        "--replace", help="Replace a model the pool has learned itself (refused otherwise)")]
    = False,
    new_pool: Annotated[bool, typer.Option(
        "--new-pool", help="Start a pool the server holds no state of yet (refused otherwise: "
        "a misspelt --pool)")] = False,
) -> None:
    """Start the pool from a model exported by `model export`: every field is checked, and
    all are written or none."""
    from provisioner.model import ModelFileError, read_model_file
    from provisioner.scripts import Scripts

    keys = _pool_keys(pool)
    try:
        fields = read_model_file(model_file)
    except (ModelFileError, OSError) as exc:
        raise _fail(f"model file: {exc}") from None  # _fail escapes it
    async def load(client: aioredis.Redis) -> Any:
        # A misspelt --pool was started from the file in silence, and `check` then took the
        # name for a pool's (a review, following "When Redis loses the pool's state").
        await _before_writing(client, pool, WRITES_WITH_OWN, no_pool=None if new_pool else (
            "nothing imported; to start a new pool from the file, add --new-pool"))
        return await Scripts(client, keys).load_model(await server_now_ms(client), fields,
                                                      replace)

    result = _with_redis(redis_url, load)
    if not result.loaded:
        for problem in result.problems:
            console.print(f"[red]x[/red] {shown(problem)}")
        raise _fail(f"pool {pool}: {result.reason}")
    console.print(f"pool {pool} starts from {escape(str(model_file))}: {result.fields} learned "
                  "fields")


app.add_typer(model_app, name="model")
app.command("mock-node-api")(mock_node_api.command)
app.command("simulate")(simulator.command)
app.add_typer(bench_cli.app, name="bench")


def _one_line_summaries(typer_app: typer.Typer) -> None:
    """Each command's line in its group's list: its docstring's first paragraph on one line.
    (Rich help keeps the docstring's line breaks there, which the list's column then wraps
    again, mid-sentence.)"""
    for command in typer_app.registered_commands:
        doc = inspect.getdoc(command.callback) if command.callback else None
        if command.short_help is None and doc:
            command.short_help = " ".join(doc.split("\n\n")[0].split())
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _one_line_summaries(group.typer_instance)


_one_line_summaries(app)


def main() -> None:
    """The `provisioner` command. What the environment refuses (a file or folder, a port, a
    server that cannot be reached) is one error line and exit 2, not a traceback."""
    _stacks_on_sigusr1()
    try:
        app()
    except (OSError, RedisError) as exc:
        errors.print(f"[red]error:[/red] {shown(f'{type(exc).__name__}: {exc}')}")
        raise SystemExit(2) from None


def _stacks_on_sigusr1() -> None:
    """`kill -USR1 PID` writes every thread's Python stack to the process's stderr (a
    replica's log), then each asyncio task's awaits (`_tasks_to_stderr`): what a process that
    seems stuck is doing, read without stopping it. The threads' stacks not where stderr has
    no file descriptor (a caller's captured stream) or none at all (`2>&-`: faulthandler
    raises RuntimeError, and every command exited 1 saying nothing): there is nowhere to
    write, and the command runs as it would without."""
    if not hasattr(signal, "SIGUSR1"):
        return
    try:
        signal.signal(signal.SIGUSR1, _tasks_to_stderr)
    except ValueError:  # not the main thread (an embedding): faulthandler's dump alone
        chained = False
    else:
        chained = True  # faulthandler's dump first, then the tasks
    with contextlib.suppress(OSError, ValueError, AttributeError, RuntimeError):
        faulthandler.register(signal.SIGUSR1, all_threads=True, chain=chained)


def _tasks_to_stderr(_signum: int, frame: types.FrameType | None) -> None:
    """Each task of the asyncio loop running in the main thread, and the awaits it is
    suspended in, innermost last: a thread's stack shows an idle loop's select alone (a
    review), and a hang of an asyncio process is in an await. The task the signal came in
    (running, so suspended in none) by the calls from its coroutine to the code interrupted:
    its awaits told its first frame alone, and a clean clone's CI, whose signal came while the
    watch drew its table, did not find the watch's loop. Never raises into the code it
    interrupted: what cannot be written is dropped."""
    out = sys.stderr
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no loop runs now
        return
    try:
        lines = []
        running = asyncio.current_task(loop)
        for task in asyncio.all_tasks(loop):
            calls = _calls(task.get_coro(), frame) if task is running else []
            if calls:
                lines.append(f"Task {task.get_name()} (running now, most recent call last):")
                lines.extend(f"  {where}" for where in calls)
                continue
            lines.append(f"Task {task.get_name()} (most recent await last):")
            lines.extend(f"  {where}" for where in _awaits(task.get_coro()))
        if out is not None:
            out.write("\n".join(lines) + "\n")
            out.flush()
    except Exception:  # a signal handler: never into the code it interrupted
        pass


def _frame_of(coro: object) -> types.FrameType | None:
    """A coroutine's (or generator's) own frame; None once it has finished."""
    return getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)


def _where(frame: types.FrameType) -> str:
    """A frame as a traceback's line names it."""
    return f'File "{frame.f_code.co_filename}", line {frame.f_lineno}, in {frame.f_code.co_name}'


def _calls(coro: object, frame: types.FrameType | None) -> list[str]:
    """The frames from a running coroutine's own to `frame` (where the signal came), outermost
    first; none if `frame` is not within it."""
    top = _frame_of(coro)
    found: list[str] = []
    while frame is not None and len(found) < 200:
        found.append(_where(frame))
        if frame is top:
            return found[::-1]
        frame = frame.f_back
    return []


def _awaits(coro: object) -> list[str]:
    """Where a coroutine and those it awaits are suspended, outermost first."""
    found: list[str] = []
    while coro is not None and len(found) < 100:
        frame = _frame_of(coro)
        if frame is not None:
            found.append(_where(frame))
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return found


if __name__ == "__main__":  # pragma: no cover
    main()
