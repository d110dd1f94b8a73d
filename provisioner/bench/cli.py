"""`provisioner bench`: replay recorded traces through the shipped service and the baselines."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated

import typer
from redis.exceptions import RedisError
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from provisioner import mock_node_api
from provisioner.bench import service_policy
from provisioner.bench.bar import strict
from provisioner.bench.baselines import (
    BASELINE_NAMES,
    RATE_ORACLE,
    REFERENCE_ORACLE,
    STATIC_BEST,
    policy_factory,
)
from provisioner.bench.cut import CutResult
from provisioner.bench.loop import LoopResult
from provisioner.bench.pause import PauseResult
from provisioner.bench.soak import Sample, SoakResult, soak_summary
from provisioner.bench.suite import (
    REFERENCE,
    PolicyFactory,
    Row,
    check_reference,
    draw_fields,
    markdown_table,
    pareto_plot,
    run_suite,
)
from provisioner.bench.trace import (
    TIMESTAMP_SLACK_S,
    Trace,
    TraceError,
    load_trace,
    mean_lead_s,
    trace_header,
)
from provisioner.bench.world import PolicyViolation, run_replay_world
from provisioner.config import MAX_NODES_LIMIT, PoolConfig, redis_trouble, redis_url_option
from provisioner.model import ModelFileError, model_document, read_model_file
from provisioner.redis_server import private_server
from provisioner.terminal import SafeConsole

app = typer.Typer(help="Replay recorded traces on virtual time and score the policies.",
                  no_args_is_help=True)
console = SafeConsole()
#: Errors and warnings: on stderr, so what a command prints on stdout (--json, a table) stays
#: what a pipe reads
errors = SafeConsole(stderr=True)
SERVICE = service_policy.NAME


def _red(said: object) -> None:
    """`said` on stderr in red, as text: an error quotes a trace's line, a path or a name, any of
    which may hold what rich reads as markup ("a[/]b" raised MarkupError, "[bold]x" lost its
    brackets)."""
    errors.print(escape(str(said)), style="red")


RedisUrl = Annotated[str | None, typer.Option(
    "--redis-url", callback=redis_url_option, help="Server for the service's scripts (default: "
    "a private one, started and stopped by the command). Replays publish user:allocated on "
    "it: never a production server.")]


@contextlib.contextmanager
def _server(url: str | None) -> Iterator[str]:
    """The server a command runs its scripts on: `url`, or a private one for the command's
    length. A server given that refuses or cannot be reached is one line naming it (its
    password hidden), exit 2: as `provisioner status` says it, not a bare exception."""
    if url:
        try:
            yield url
        except RedisError as exc:
            errors.print(f"[red]error:[/red] {escape(redis_trouble(url, exc))}")
            raise typer.Exit(2) from None
        return
    with private_server() as server:
        yield server.url


BootOffset = Annotated[int, typer.Option(
    min=0, help="Start each trace's boot-delay sequence at this index: the same users against "
    "another draw of boot delays (0: as recorded)")]
WarmUp = Annotated[int, typer.Option(
    min=0, max=100, help="Play each trace this many times, unscored, before the scored play: the "
    "policy meets the traffic warm, as a service that has been running does (0: from a cold "
    "start)")]

Settings = Annotated[list[str] | None, typer.Option(
    "--set", metavar="NAME=VALUE",
    help="Override a pool setting of the service for this run (repeatable), e.g. buffer_sd=1.5")]


def parse_settings(pairs: list[str] | None) -> dict[str, object]:
    """`name=value` pairs as typed PoolConfig fields; a clear error for anything else."""
    types = {f.name: f.type for f in dataclasses.fields(PoolConfig)}
    out: dict[str, object] = {}
    for pair in pairs or []:
        name, sep, raw = pair.partition("=")
        if not sep or name not in types or name == "max_nodes":
            raise typer.BadParameter(f"{pair!r}: expected NAME=VALUE with NAME one of "
                                     f"{', '.join(n for n in types if n != 'max_nodes')}",
                                     param_hint="--set")
        kind = {"int": int, "float": float}.get(str(types[name]), str)
        try:
            out[name] = kind(raw)
        except ValueError:
            raise typer.BadParameter(f"{pair!r}: {name} takes a {kind.__name__}",
                                     param_hint="--set") from None
    problems = dataclasses.replace(PoolConfig(), **out).problems()  # type: ignore[arg-type]
    if problems:
        raise typer.BadParameter("; ".join(problems), param_hint="--set")
    return out


def service_pool(trace: Trace, settings: dict[str, object] | None = None) -> PoolConfig:
    """The service's defaults (with any `--set` overrides), `max_nodes` set to the environment's
    quota from the trace header (a quota, not a policy parameter), within the range the service
    takes: FORMAT.md bounds no quota, and a trace of 0 (every create fails) or of more than
    MAX_NODES_LIMIT was refused as a bad `--set` none was given. The world holds the creates to
    the trace's own quota whatever the pool's: at 0 the service's creates fail, as they would
    live against such an API, and no trace's replay comes near MAX_NODES_LIMIT nodes."""
    return dataclasses.replace(PoolConfig(), max_nodes=min(max(trace.max_nodes, 1),
                                                           MAX_NODES_LIMIT),
                               **(settings or {}))  # type: ignore[arg-type]


def _settings_problem(trace: Trace, settings: dict[str, object]) -> str | None:
    """What the service would refuse in its settings with this trace's quota, or None: the
    service does not start with `min_ready` above `max_nodes`, and a replay should not either
    (it ran, the scripts capping the creates at the quota)."""
    problems = service_pool(trace, settings).problems()
    if not problems:
        return None
    return (f"{trace.name}: with the trace's quota, max_nodes={trace.max_nodes}: "
            + "; ".join(problems))


def _service_factory(url: str, settings: dict[str, object], timeline_s: float | None = None,
                     model: dict[str, float] | None = None) -> PolicyFactory:
    return lambda trace: service_policy.ServicePolicy(url, service_pool(trace, settings),
                                                      timeline_s=timeline_s, model=model)


def _factories(names: list[str], url: str, settings: dict[str, object] | None = None,
               timeline_s: float | None = None,
               model: dict[str, float] | None = None) -> dict[str, PolicyFactory]:
    factories: dict[str, PolicyFactory] = {}
    for name in names:
        if name == SERVICE:
            factories[name] = _service_factory(url, settings or {}, timeline_s, model)
        else:
            try:
                factories[name] = policy_factory(name)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="--policy") from None
    return factories


def _trace_paths(directory: Path) -> list[Path]:
    """The traces of a folder, as `bench suite` and `bench oracle-bar` take them."""
    paths = sorted(directory.glob("*.jsonl.gz")) + sorted(directory.glob("*.jsonl"))
    if not paths:
        raise typer.BadParameter(f"no *.jsonl.gz traces in {directory}")
    return paths


def _load(path: Path) -> Trace:
    try:
        return load_trace(path)
    except TraceError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command()
def replay(
    trace_path: Annotated[Path, typer.Argument(metavar="TRACE", exists=True, dir_okay=False)],
    policy: Annotated[str, typer.Option(
        help=f"`{SERVICE}` (the shipped service), static-K, reactive, keepalive-10m, "
        "seed-count, hybrid-histogram, clairvoyant, or rate-oracle-THETA[-wSECONDS] "
        "(`bench bound`'s bands at one price per miss, per 600 s window or the one given, "
        "replayed)")] = SERVICE,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
    redis_url: RedisUrl = None,
    settings: Settings = None,
    boot_offset: BootOffset = 0,
    warm_up: WarmUp = 0,
    misses_path: Annotated[Path | None, typer.Option(
        "--misses", dir_okay=False, help=f"Write every miss of `{SERVICE}` to this file (JSON "
        "lines: when, the pool's last decision before it, and where the node was missing)")]
    = None,
    timeline_path: Annotated[Path | None, typer.Option(
        "--timeline", dir_okay=False, help=f"Write the pool of `{SERVICE}` window by window to "
        "this file (JSON lines: mean ready, booting, allocated and spare nodes, target and keep "
        "level, the share of ticks in a surge, the creates and counted connects, and the "
        "forecast's terms, as in its decisions' numbers)")] = None,
    timeline_window: Annotated[float, typer.Option(
        min=1.0, max=86_400.0, help="Seconds per --timeline window")] = 600.0,
    append_to: Annotated[Path | None, typer.Option(
        "--append-to", dir_okay=False, help="Add this replay's row to a results.json (created "
        "if missing), as `bench suite` writes them, so single replays go through `bench "
        "compare` and `bench bar`; a row of the same trace and policy there is refused")]
    = None,
    model_path: Annotated[Path | None, typer.Option(
        "--model", exists=True, dir_okay=False, help=f"Start `{SERVICE}` from this learned "
        "model (`provisioner model export`, or --save-model of another replay) instead of "
        "the priors")] = None,
    save_model_path: Annotated[Path | None, typer.Option(
        "--save-model", dir_okay=False, help=f"Write the model `{SERVICE}` learned, at the "
        "end of the replay, as `provisioner model export` does")] = None,
) -> None:
    """Replay one trace under one policy and print FORMAT.md's scores."""
    for path, option, what in ((misses_path, "--misses", "explains its misses"),
                               (timeline_path, "--timeline", "keeps a timeline"),
                               (model_path, "--model", "learns a model"),
                               (save_model_path, "--save-model", "learns a model")):
        if path is not None and policy != SERVICE:
            raise typer.BadParameter(f"only `{SERVICE}` {what}", param_hint=option)
    for path, option in ((misses_path, "--misses"), (timeline_path, "--timeline"),
                         (append_to, "--append-to"), (save_model_path, "--save-model")):
        if path is not None and not path.absolute().parent.is_dir():  # refused now, not after
            raise typer.BadParameter(f"{path.parent} is not a folder", param_hint=option)
    model = None
    if model_path is not None:
        try:
            model = read_model_file(model_path)
        except ModelFileError as exc:
            raise typer.BadParameter(str(exc), param_hint="--model") from None
    overrides = parse_settings(settings)
    if overrides and policy != SERVICE:
        raise typer.BadParameter(f"only `{SERVICE}` takes the service's settings",
                                 param_hint="--set")
    trace = _load(trace_path)
    off, activities, worst = trace.timestamps_off()
    if off:  # replayed all the same: a trace's clock is the traffic the service is given
        typer.echo(f"note: {off} of {activities} activity timestamps are more than "
                   f"{TIMESTAMP_SLACK_S:g} s from epoch + t, where FORMAT.md puts them (up to "
                   f"{worst:.0f} s): the service is given them as they are, and places its "
                   "users' browsing by them; the baselines read none", err=True)
    trace = trace.with_boot_offset(boot_offset).warmed_up(warm_up)
    if policy == SERVICE and (problem := _settings_problem(trace, overrides)):
        raise typer.BadParameter(problem, param_hint="--set")
    if append_to is not None:  # refused now, not after the replay, if it can be
        _rows_to_append_to(append_to, trace.name, policy)
    started = time.monotonic()
    with _server(redis_url) as url:
        timeline_s = timeline_window if timeline_path is not None else None
        replayed = _factories([policy], url, overrides, timeline_s, model)[policy](trace)
        try:
            board = run_replay_world(trace, replayed).board
        except PolicyViolation as exc:
            _red(f"policy {policy} broke the rules: {exc}")
            raise typer.Exit(2) from None
        except service_policy.ModelRefused as exc:
            _red(f"--model {model_path}: the pool refused it: {exc}")
            raise typer.Exit(2) from None
    scores = board.close()
    wall_s = time.monotonic() - started
    # Diagnostics go to stderr: with --json, stdout holds the scores alone.
    typer.echo(board.node_time().describe(), err=True)
    typer.echo(board.given_up(mean_lead_s(trace.boot_delays, trace.api_latency_s)).describe(),
               err=True)
    typer.echo(board.unserved().describe(), err=True)
    if isinstance(replayed, service_policy.ServicePolicy):
        if misses_path is not None:
            _write_misses(misses_path, replayed.misses)
        if timeline_path is not None:
            with timeline_path.open("w") as out:
                for window in replayed.timeline:
                    out.write(json.dumps(window.as_dict()) + "\n")
            typer.echo(f"timeline: {len(replayed.timeline)} windows of {timeline_window:g} s "
                       f"written to {timeline_path}", err=True)
        if save_model_path is not None and replayed.final_model is not None:
            save_model_path.write_text(json.dumps(model_document(
                replayed.final_model, replayed.final_learned, trace.name,
                replayed.clock.now_ms()), indent=1) + "\n")
            typer.echo(f"model written to {save_model_path}", err=True)
        if replayed.final_stats is not None:
            typer.echo(replayed.final_stats.scaling().describe()
                       + " (whole replay, warm-up included)", err=True)
        if replayed.forecast_check is not None:
            typer.echo(replayed.forecast_check.describe() + " (whole replay, warm-up included)",
                       err=True)
    if as_json:
        typer.echo(json.dumps(strict(scores.as_dict())))
    else:
        # A trace names itself freely (FORMAT.md): shown as text, not read as rich markup ("a[/]"
        # raised MarkupError after the replay, its scores lost; "[bold]x" was shown as "x").
        table = Table(title=f"{escape(trace.name)} under {policy}")
        table.add_column("score")
        table.add_column("value", justify="right")
        for key, value in scores.as_dict().items():
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
        console.print(table)
    if append_to is not None:
        count = append_row(append_to, {"trace": trace.name, "policy": policy, "detail": "",
                                       "wall_s": wall_s, **scores.as_dict(),
                                       **draw_fields(boot_offset, warm_up)})
        typer.echo(f"row {trace.name} / {policy} added to {append_to} ({count} rows)", err=True)


@contextlib.contextmanager
def _folder_lock(path: Path) -> Iterator[None]:
    """An exclusive lock (flock) on the folder that holds `path`, released on exit: replays
    appending to one file take turns, and no lock file is left behind."""
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def append_row(path: Path, row: dict[str, object]) -> int:
    """Add `row` to the results file `path` and return how many rows it holds now. The file is
    read again under the folder's lock, so a row another replay added meanwhile is kept, and a
    row of the same trace and policy added meanwhile is refused; it is replaced whole (written
    beside it, then renamed), so a reader never sees half a file."""
    with _folder_lock(path):
        rows = _rows_to_append_to(path, str(row["trace"]), str(row["policy"]))
        rows.append(strict(row))
        written = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        written.write_text(json.dumps(rows, indent=1))
        os.replace(written, path)
    return len(rows)


def _rows_to_append_to(path: Path, trace: str, policy: str) -> list[object]:
    """The rows already in `path` (none if it does not exist yet): an unreadable file, or one
    that holds this trace and policy already, is refused."""
    from provisioner.bench.bar import BarError, load_results, rows_by_trace

    if not path.exists():
        return []
    try:
        rows = load_results(path)
        if policy in rows_by_trace(rows, str(path)).get(trace, {}):
            raise BarError(f"{path} has a row of {trace} / {policy} already")
    except BarError as exc:
        raise typer.BadParameter(str(exc), param_hint="--append-to") from None
    return rows


def _write_misses(path: Path, misses: list[service_policy.Miss]) -> None:
    with path.open("w") as out:
        for miss in misses:
            out.write(json.dumps(miss.as_dict()) + "\n")
    scored = [m for m in misses if m.scored]
    kinds = {kind: sum(m.kind == kind for m in scored) for kind in service_policy.MISS_KINDS}
    typer.echo(
        f"{len(scored)} scored misses ({', '.join(f'{n} {k}' for k, n in kinds.items())}), "
        f"{len(misses) - len(scored)} in warm-up plays; written to {path}", err=True)


def _table(rows: list[Row]) -> Table:
    table = Table(title="replay suite")
    for column in ("trace", "policy", "connects", "miss rate", "wait p95 s", "cost ratio",
                   "idle h", "wall s"):
        table.add_column(column, justify="left" if column in ("trace", "policy") else "right")
    for row in rows:
        s = row.scores
        name = f"{row.policy} ({row.detail})" if row.detail else row.policy
        table.add_row(escape(row.trace), name, str(s.connects), f"{s.miss_rate:.2%}",
                      f"{s.wait_p95_s:.0f}", f"{s.cost_ratio:.3f}",
                      f"{s.node_hours - s.busy_hours:.1f}", f"{row.wall_s:.1f}")
    return table


@app.command()
def suite(
    directory: Annotated[Path, typer.Argument(metavar="DIR", exists=True, file_okay=False)],
    policy: Annotated[list[str] | None, typer.Option(
        help="Policies to run (repeatable); default: the service, every baseline and "
        f"{REFERENCE_ORACLE} (a reference told the rates)")] = None,
    out: Annotated[Path, typer.Option(help="Folder for results.md, results.json, pareto.png")]
    = Path("bench-results"),
    redis_url: RedisUrl = None,
    settings: Settings = None,
    warm_up: WarmUp = 0,
    boot_offset: BootOffset = 0,
) -> None:
    """Replay every trace in DIR under every policy; print a table, write Markdown and a plot."""
    paths = _trace_paths(directory)
    names = policy or [SERVICE, *BASELINE_NAMES]
    overrides = parse_settings(settings)
    if overrides and SERVICE not in names:
        raise typer.BadParameter(f"only `{SERVICE}` takes the service's settings, and it is "
                                 "not among the policies", param_hint="--set")
    if SERVICE in names:  # before any replay, not when the suite reaches the trace
        for path in paths:
            try:
                problem = _settings_problem(trace_header(path), overrides)
            except TraceError as exc:
                _red(exc)
                raise typer.Exit(2) from None
            if problem:
                raise typer.BadParameter(problem, param_hint="--set")
    out.mkdir(parents=True, exist_ok=True)
    with _server(redis_url) as url:
        extra = _factories([n for n in names if n != STATIC_BEST], url, overrides)
        ordered = [STATIC_BEST] if STATIC_BEST in names else []
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("replaying", total=len(paths) * len(names))

            def advance(row: Row) -> None:
                progress.update(task, advance=1,
                                description=f"{escape(row.trace)} / {row.policy} "
                                            f"({row.wall_s:.0f}s)")

            try:
                rows = run_suite(paths, ordered, extra_policies=extra, progress=advance,
                                 warm_up=warm_up, boot_offset=boot_offset)
            except (PolicyViolation, TraceError) as exc:  # a trace's line is quoted in it
                _red(exc)
                raise typer.Exit(2) from None
    console.print(_table(rows))
    defaults = {k: v for k, v in PoolConfig().as_dict().items() if k != "max_nodes"}
    shipped = (f"`{SERVICE}` runs the shipped Lua scripts with the service's default settings "
               if not overrides else
               f"`{SERVICE}` runs the shipped Lua scripts with NON-DEFAULT settings "
               f"{overrides} over the defaults ")
    note = (f"{shipped}({', '.join(f'{k}={v}' for k, v in defaults.items())}); max_nodes is "
            "the trace's quota. static-best is the smallest K with miss rate <= 1%, chosen per "
            "trace with hindsight.")
    oracles = [n for n in names if n.startswith(RATE_ORACLE)]
    if oracles:
        note += (f" {', '.join(oracles)}: `bench bound`'s cheapest band per window at that "
                 "price per miss, told each window's connect and free rates (hindsight), "
                 "replayed like the others from an empty pool.")
    note += "\n"
    if warm_up:
        note += (f"\nEvery policy played each trace {warm_up} time(s) unscored before the "
                 "scored play (--warm-up): these are warm figures, not a cold start.\n")
    if boot_offset:
        note += (f"\nEvery trace's boot delays start at index {boot_offset} of its sequence "
                 "(--boot-offset): another draw of boots than the recorded one; static-best "
                 "is chosen on this draw.\n")
    (out / "results.md").write_text(note + "\n" + markdown_table(rows))
    (out / "results.json").write_text(json.dumps(
        [strict({"trace": r.trace, "policy": r.policy, "detail": r.detail, "wall_s": r.wall_s,
                 **r.scores.as_dict(), **draw_fields(boot_offset, warm_up)}) for r in rows],
        indent=1))
    try:
        pareto_plot(rows, out / "pareto.png")
    except ImportError:
        errors.print("[yellow]matplotlib is not installed: no plot (pip install "
                      "'provisioner[bench]')")
    console.print(note)
    console.print(f"wrote {out}/results.md, results.json and pareto.png")


@app.command()
def check(
    directory: Annotated[Path, typer.Argument(metavar="DIR", exists=True, file_okay=False)],
) -> None:
    """Check the simulated world against FORMAT.md's reference table (static-K figures)."""
    try:
        problems = check_reference(directory)
    except TraceError as exc:
        _red(exc)
        raise typer.Exit(2) from None
    for problem in problems:
        _red(problem)
    if problems:
        raise typer.Exit(1)
    console.print(f"the simulator agrees with FORMAT.md on {len(REFERENCE)} traces")


@app.command("tick-cost")
def tick_cost(
    users: Annotated[list[int] | None, typer.Option(
        min=1, max=10_000_000,
        help="Browsing users to load (repeatable); default 10^4, 10^5, 10^6")] = None,
    ticks: Annotated[int, typer.Option(min=5, help="Ticks timed per size")] = 50,
    redis_url: RedisUrl = None,
) -> None:
    """Time one scaling tick (scale_decide + reap_idle), then one arrival's record_activity,
    against 10^4..10^6 browsing users."""
    from provisioner.bench.tickcost import run

    sizes = users or [10_000, 100_000, 1_000_000]
    with _server(redis_url) as url:
        results = run(url, sizes, ticks=ticks)
    server = results[0].server if results else "?"
    table = Table(title=f"one scaling tick and one arrival's activity, round trip from Python, "
                  f"on {server}")
    for column in ("users", "tick median ms", "tick p95 ms", "trimmed per tick",
                   "arrival median ms", "arrival p95 ms", "memory MB", "load s"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(f"{r.users:,}", f"{r.median_ms:.2f}", f"{r.p95_ms:.2f}",
                      f"{r.trimmed_median:.0f}", f"{r.activity_median_ms:.3f}",
                      f"{r.activity_p95_ms:.3f}", f"{r.used_memory_mb:.0f}", f"{r.load_s:.1f}")
    console.print(table)


@app.command("queue-cost")
def queue_cost(
    waiting: Annotated[list[int] | None, typer.Option(
        min=1, max=10_000_000,
        help="Users waiting in the queue (repeatable); default 10, 10^4, 3x10^5")] = None,
    calls: Annotated[int, typer.Option(min=1, max=100_000,
                                       help="Disconnects and misses timed per size")] = 200,
    redis_url: RedisUrl = None,
) -> None:
    """Server time of a waiting user's disconnect and of a miss, against a waiting queue of 10
    to 300,000 users (INFO commandstats, no round trip)."""
    from provisioner.bench.queuecost import run

    sizes = waiting or [10, 10_000, 300_000]
    with _server(redis_url) as url:
        results = run(url, sizes, calls=calls)
    server = results[0].server if results else "?"
    table = Table(title=f"a waiting user's disconnect and a miss, server time a call, on {server}")
    for column in ("users waiting", "disconnect µs", "miss µs"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(f"{r.waiting:,}", f"{r.disconnect_us:.1f}", f"{r.miss_us:.1f}")
    console.print(table)


@app.command()
def ingest(
    messages: Annotated[int, typer.Option(min=1, help="Activity messages to publish")] = 20_000,
    users: Annotated[int, typer.Option(
        min=1, help="Users they come from (one message per user-second, at most 60 s each)")
    ] = 1_000,
    replicas: Annotated[int, typer.Option(
        min=1, max=16, help="Replicas listening, each applying every message")] = 1,
    redis_url: RedisUrl = None,
) -> None:
    """Time the replicas' live listeners applying a burst of user:activity messages: the rate
    the service keeps up with (every replica applies every message; the slowest sets the
    rate), and the server's CPU time per message."""
    from provisioner.bench.ingest import run

    try:
        with _server(redis_url) as url:
            result = run(url, messages, users, replicas)
    except (ValueError, TimeoutError) as exc:
        _red(exc)
        raise typer.Exit(2) from exc
    who = "one replica's listener" if replicas == 1 else f"each of {replicas} replicas' listeners"
    console.print(f"{result.messages:,} activity messages of {result.users:,} users applied by "
                  f"{who} in {result.seconds:.2f} s: {result.per_second:,.0f} a second, on "
                  f"{result.server}; the server's CPU {result.server_us_per_message:.0f} µs a "
                  f"message ({result.duplicates:,} later copies found applied); "
                  f"{result.script_calls:,} script calls, each holding the server "
                  f"{result.ms_per_script_call:.2f} ms on average")


def _stack_options(mock_options: str, json_out: Path | None) -> list[str]:
    """What a command that starts the local stack (`soak`, `loop`) checks before it starts
    anything: the mock Node API's further options, parsed by its own parser (returned, split),
    and the --json file's folder."""
    from provisioner.devstack import options_passed_on

    mock, _ = options_passed_on(mock_options, "mock-node-api", mock_node_api.command,
                                "--mock-options")
    if json_out is not None and not json_out.parent.is_dir():
        raise typer.BadParameter(f"no folder {json_out.parent}", param_hint="--json")
    return mock


def _checkout_option(replicas_from: Path | None) -> None:
    """--replicas-from, refused unless it is a checkout's root."""
    if replicas_from is not None and not (replicas_from / "provisioner" / "__main__.py").is_file():
        raise typer.BadParameter(f"{replicas_from} holds no provisioner package (a checkout's "
                                 "root, with provisioner/ and lua/)", param_hint="--replicas-from")


def _verdict(document: dict[str, object], failed: list[str], json_out: Path | None) -> None:
    """A stack run's end: its figures to --json, what failed on stderr, exit 1 if anything
    did, else 0."""
    if json_out is not None:
        json_out.write_text(json.dumps(document, indent=1) + "\n")
    for line in failed:
        _red(line)
    raise typer.Exit(1 if failed else 0)


@app.command()
def soak(
    minutes: Annotated[float, typer.Option(
        min=0.1, max=10_080, help="How long the traffic runs")] = 30.0,
    every: Annotated[float, typer.Option(
        min=1, max=3600, help="Seconds between samples")] = 30.0,
    replicas: Annotated[int, typer.Option(min=1, max=16, help="Service replicas")] = 2,
    arrival_rate: Annotated[float, typer.Option(
        min=0.01, max=100_000, help="Simulated users per minute")] = 60.0,
    session: Annotated[float, typer.Option(
        min=1, max=86_400, help="The simulated users' mean session, seconds")] = 120.0,
    boot_delay: Annotated[str, typer.Option(
        callback=mock_node_api.boot_delay_option, help="The mock Node API's boot delay spec")
                          ] = "lognormal:20:45",
    seed: Annotated[int, typer.Option(help="Seed of the simulated users")] = 1,
    kill_every: Annotated[float, typer.Option(
        min=0, max=86_400, help="Kill a replica (SIGKILL) and start it again this often, "
        "seconds, in turn (0: never)")] = 0.0,
    refuse_writes_for: Annotated[float, typer.Option(
        min=0, max=86_400, help="Seconds the server refuses every write, as out of memory "
        "(maxmemory 1), once, from --refuse-writes-at (0: never)")] = 0.0,
    refuse_writes_at: Annotated[float, typer.Option(
        min=0, max=604_800, help="Seconds into the run the refusal starts")] = 60.0,
    replicas_from: Annotated[Path | None, typer.Option(
        file_okay=False, exists=True, help="Run the replicas from this checkout (a worktree of "
        "another release: `git worktree add /tmp/before REV`) instead of this one")] = None,
    json_out: Annotated[Path | None, typer.Option(
        "--json", dir_okay=False, help="Also write every sample and the verdict here")] = None,
    mock_options: Annotated[str, typer.Option(
        metavar="OPTIONS", help="Further options of the mock Node API, in one quoted word "
        "(`provisioner dev`'s): '--latency 3 --answer-latency 6 --death-rate 2'")] = "",
) -> None:
    """Run the local stack (private server, mock Node API, replicas, simulator) under steady
    traffic and sample what would grow if something leaked: server memory and keys, every pool
    structure, each process's memory, the invariants, the nodes the API runs against those the
    pool knows; exit 1 if a process stopped, an invariant broke, a log holds a traceback or the
    API and the pool disagree on a node for a minute."""
    from provisioner.bench import soak as soaking

    _checkout_option(replicas_from)
    mock = _stack_options(mock_options, json_out)

    def show(sample: Sample) -> None:
        replicas_mb = [mb for name, mb in sample.rss_mb.items() if name.startswith("replica")]
        checked = (f"{len(sample.problems)} broken" if sample.problems else "ok"
                   ) if sample.checked else "unchecked"
        console.print(
            f"{sample.t_s:6.0f} s  server {sample.memory_mb:.1f} MB, {sample.keys:,} keys  "
            f"browsing {sample.sizes.get('active', 0):,}  sessions "
            f"{sample.sizes.get('sessions', 0):,}  replica RSS {max(replicas_mb, default=0):.0f} MB"
            f"  connects {sample.stats['connects']:,} ({sample.stats['misses']:,} missed)  "
            f"invariants {checked}  nodes: API {sample.api_nodes}, not in the pool "
            f"{len(sample.unknown_to_pool)}, not in the API {len(sample.unknown_to_api)}",
            highlight=False)

    try:
        result = soaking.run(minutes, every, replicas, boot_delay, arrival_rate,
                             ["--session", str(session), "--seed", str(seed)],
                             kill_every=kill_every, on_sample=show,
                             say=lambda line: console.print(line, markup=False), mock=mock,
                             refuse_writes=(refuse_writes_at, refuse_writes_for),
                             replicas_from=replicas_from)
    except RuntimeError as exc:
        _red(exc)
        raise typer.Exit(2) from exc
    console.print(soak_table(result))
    checked = sum(s.checked for s in result.samples)
    console.print(f"invariants checked in {checked} of {len(result.samples)} samples (the others "
                  f"changed under every read), broken in {len(result.broken)}; the API and the "
                  f"pool disagreed on a node in {len(result.disagreed)} samples, for "
                  f"{soaking.LASTING_S:.0f} s "
                  f"or more on {len(result.lasting_disagreements())} nodes", highlight=False)
    if result.kills:
        console.print(f"{result.kills} replica(s) killed and started again", highlight=False)
    if result.refused:
        span = " to ".join(f"{t:.0f} s" for t in result.refused)
        dropped = ", ".join(f"{name} {count:,}" for name, count in result.dropped.items())
        console.print(f"the server refused writes (maxmemory 1) from {span}; events dropped by "
                      f"the replicas over the run: {dropped or 'none answered'}",
                      highlight=False)
    for name, marks in result.logs.items():
        console.print(f"{name}: {marks['traceback']} tracebacks, {marks['error']} errors, "
                      f"{marks['warning']} warnings in its log", highlight=False)
    _verdict(result.as_json(), result.failed, json_out)


@app.command("loop")
def loop_(
    users: Annotated[int, typer.Option(min=1, max=1000, help="Clients looping")] = 1,
    pairs: Annotated[int, typer.Option(
        min=1, max=10_000_000, help="Connect/disconnect pairs each client publishes")] = 24_000,
    rate: Annotated[float, typer.Option(
        min=0.01, max=10_000, help="Pairs a second, each client")] = 200.0,
    order: Annotated[str, typer.Option(
        help="connect-first (a connect and its disconnect back to back) or disconnect-first "
        "(a user in a session dropping and reconnecting; each connects once before the loop "
        "and disconnects once after it)")] = "connect-first",
    fresh: Annotated[bool, typer.Option(
        "--fresh/--warm", help="Start the loop at once, before the pool's first node is ready "
        "(default: once one is)")] = False,
    settle: Annotated[float, typer.Option(
        min=0, max=3600, help="Seconds the pool is followed after the loop")] = 10.0,
    replicas: Annotated[int, typer.Option(min=1, max=16, help="Service replicas")] = 2,
    arrival_rate: Annotated[float, typer.Option(
        min=0.01, max=100_000, help="The simulator's users per minute, beside the loop")] = 20.0,
    seed: Annotated[int, typer.Option(help="Seed of the simulator's users")] = 1,
    boot_delay: Annotated[str, typer.Option(
        callback=mock_node_api.boot_delay_option, help="The mock Node API's boot delay spec")
                          ] = "lognormal:20:45",
    replicas_from: Annotated[Path | None, typer.Option(
        file_okay=False, exists=True, help="Run the replicas from this checkout (a worktree of "
        "another release: `git worktree add /tmp/before REV`) instead of this one")] = None,
    json_out: Annotated[Path | None, typer.Option(
        "--json", dir_okay=False, help="Also write the run's figures here")] = None,
    mock_options: Annotated[str, typer.Option(
        metavar="OPTIONS", help="Further options of the mock Node API, in one quoted word "
        "(`provisioner dev`'s): '--latency 3 --death-rate 2'")] = "",
) -> None:
    """Clients reconnecting in a loop, live: the local stack (private server, mock Node API,
    replicas, simulator) while USERS clients publish connect/disconnect pairs back to back, and
    what the pool did meanwhile: the highest target, the most nodes, the allocations heard for
    the looping users, the connects resumed. Exit 1 if an invariant broke, a process ended
    during the run or a log holds a traceback; 2 if a replica exits as it starts."""
    from provisioner.bench import loop as looping

    if order not in looping.ORDERS:
        raise typer.BadParameter(f"one of {', '.join(looping.ORDERS)}", param_hint="--order")
    _checkout_option(replicas_from)
    mock = _stack_options(mock_options, json_out)
    try:
        result = looping.run(users, pairs, rate, order, fresh, settle, replicas, boot_delay,
                             arrival_rate, seed, mock, replicas_from,
                             say=lambda line: console.print(line, markup=False))
    except RuntimeError as exc:
        _red(exc)
        raise typer.Exit(2) from exc
    except KeyboardInterrupt:
        errors.print("stopped by Ctrl-C, the stack with it; a loop's figures are read at its "
                     "end, so there are none", markup=False)
        raise typer.Exit(130) from None
    console.print(loop_table(result))
    _verdict(result.as_json(), result.failed, json_out)


# The options `pause` and `cut` share: the stack's, as `loop` takes them.
_DrillArrivalRate = Annotated[float, typer.Option(
    min=0.01, max=100_000, help="The simulator's users per minute, beside the drill")]
_DrillSeed = Annotated[int, typer.Option(help="Seed of the simulator's users")]
_DrillBootDelay = Annotated[str, typer.Option(
    callback=mock_node_api.boot_delay_option, help="The mock Node API's boot delay spec")]
_DrillReplicasFrom = Annotated[Path | None, typer.Option(
    file_okay=False, exists=True, help="Run the replicas from this checkout (a worktree of "
    "another release: `git worktree add /tmp/before REV`) instead of this one")]
_DrillJson = Annotated[Path | None, typer.Option(
    "--json", dir_okay=False, help="Also write the run's figures here")]
_DrillMockOptions = Annotated[str, typer.Option(
    metavar="OPTIONS", help="Further options of the mock Node API, in one quoted word "
    "(`provisioner dev`'s): '--latency 3'")]


@app.command()
def pause(
    users: Annotated[int, typer.Option(
        min=1, max=10_000, help="Connects published in one pipeline, each round")] = 30,
    seconds: Annotated[float, typer.Option(
        "--pause", min=0.1, max=3600, help="Seconds the server is stopped (SIGSTOP)")] = 20.0,
    settle: Annotated[float, typer.Option(
        min=1, max=3600, help="Seconds the pool is followed after the server goes on")] = 20.0,
    rounds: Annotated[int, typer.Option(min=1, max=100, help="Pauses, one after another")] = 1,
    replicas: Annotated[int, typer.Option(min=1, max=16, help="Service replicas")] = 2,
    arrival_rate: _DrillArrivalRate = 20.0,
    seed: _DrillSeed = 1,
    boot_delay: _DrillBootDelay = "lognormal:20:45",
    replicas_from: _DrillReplicasFrom = None,
    json_out: _DrillJson = None,
    mock_options: _DrillMockOptions = "",
) -> None:
    """The server paused under a batch of connects, live: the local stack (private server,
    mock Node API, replicas, simulator), USERS connects published in one pipeline and the
    server stopped (SIGSTOP) at once for --pause seconds; then who of those users the pool
    served, put in line, or lost (neither: a connect dropped, its user told nothing), and the
    replicas' gaps by verdict. Exit 1 if a user was lost, an invariant broke, a process ended
    during the run or a log holds a traceback; 2 if the stack does not start."""
    from provisioner.bench import pause as pausing

    _checkout_option(replicas_from)
    mock = _stack_options(mock_options, json_out)
    try:
        result = pausing.run(users, seconds, settle, rounds, replicas, boot_delay, arrival_rate,
                             seed, mock, replicas_from,
                             say=lambda line: console.print(line, markup=False))
    except RuntimeError as exc:
        _red(exc)
        raise typer.Exit(2) from exc
    except KeyboardInterrupt:
        errors.print("stopped by Ctrl-C, the stack with it (the server let go first)",
                     markup=False)
        raise typer.Exit(130) from None
    console.print(pause_table(result))
    _verdict(result.as_json(), result.failed, json_out)


@app.command()
def cut(
    seconds: Annotated[float, typer.Option(
        "--cut", min=0.1, max=3600, help="Seconds replica-2 is cut off (its bytes held both "
        "ways)")] = 20.0,
    settle: Annotated[float, typer.Option(
        min=1, max=3600, help="Seconds the pool is followed after the cut heals")] = 15.0,
    rounds: Annotated[int, typer.Option(min=1, max=100, help="Cuts, one after another")] = 1,
    arrival_rate: _DrillArrivalRate = 20.0,
    seed: _DrillSeed = 1,
    boot_delay: _DrillBootDelay = "lognormal:20:45",
    replicas_from: _DrillReplicasFrom = None,
    json_out: _DrillJson = None,
    mock_options: _DrillMockOptions = "",
) -> None:
    """One replica cut off alone, live: a private server, the mock Node API, two replicas
    (replica-2 through a hop that holds every byte both ways while cut, as a partition holds
    what TCP resends) and the simulator. Each round a user is served, replica-2 is cut off,
    she disconnects and connects again (replica-1 applies it), and the cut heals --cut seconds
    after it began; then whether she kept the node she had since, or a late copy on replica-2
    ended her session or moved her. Exit 1 if a session was ended or moved, an invariant broke,
    a process ended during the run or a log holds a traceback; 2 if the stack does not start."""
    from provisioner.bench import cut as cutting

    _checkout_option(replicas_from)
    mock = _stack_options(mock_options, json_out)
    try:
        result = cutting.run(seconds, settle, rounds, boot_delay, arrival_rate, seed, mock,
                             replicas_from, say=lambda line: console.print(line, markup=False))
    except RuntimeError as exc:
        _red(exc)
        raise typer.Exit(2) from exc
    except KeyboardInterrupt:
        errors.print("stopped by Ctrl-C, the stack with it", markup=False)
        raise typer.Exit(130) from None
    console.print(cut_table(result))
    _verdict(result.as_json(), result.failed, json_out)


def cut_table(result: CutResult) -> Table:
    """A cut drill's rounds: what became of each user's session, and the gaps judged."""
    source = " (replicas from another checkout)" if result.replicas_from else ""
    table = Table(title=f"cut: replica-2 cut off {result.cut_s:g} s{source} on {result.server}")
    for column in ("round", "cut, s", "node since", "at the end", "session",
                   "user:allocated", "gaps judged, each replica"):
        table.add_column(column, justify="left" if column.startswith("gaps") else "right")
    for n, r in enumerate(result.rounds, 1):
        table.add_row(str(n), f"{r.cut_s:.1f}", r.node_since, r.node_after or "none",
                      r.outcome, str(r.allocated_heard), _gaps_cell(r.gaps))
    return table


def _gaps_cell(gaps: dict[str, dict[str, int]]) -> str:
    """Each replica's gaps by verdict, replica-1's first: "pause 1; pause 1" (none: no gap;
    -: no such counter, a release before the verdicts)."""
    return "; ".join((", ".join(f"{judged} {count}" for judged, count in sorted(c.items())
                                if count) or "none") if c else "-" for c in gaps.values())


def pause_table(result: PauseResult) -> Table:
    """A pause drill's rounds: who was served, waiting or lost, and the gaps judged."""
    source = " (replicas from another checkout)" if result.replicas_from else ""
    table = Table(title=f"pause: {result.users} connects, the server stopped "
                        f"{result.pause_s:g} s, {result.replicas} replica(s){source} on "
                        f"{result.server}")
    for column in ("round", "stopped, s", "served", "waiting", "lost", "connects",
                   "gaps judged, each replica"):
        table.add_column(column, justify="left" if column.startswith("gaps") else "right")
    for n, r in enumerate(result.rounds, 1):
        table.add_row(str(n), f"{r.paused_s:.1f}", str(len(r.served)), str(len(r.waiting)),
                      str(len(r.lost)), str(r.connects), _gaps_cell(r.gaps))
    return table


def loop_table(result: LoopResult) -> Table:
    """A loop's run: what was published, what the pool did, what it counted."""
    source = " (replicas from another checkout)" if result.replicas_from else ""
    table = Table(title=f"loop: {result.users} client(s) x {result.pairs:,} pairs {result.order}"
                        f", {result.rate:g}/s, {result.replicas} replica(s){source} on "
                        f"{result.server}, {'fresh' if result.fresh else 'warm'} pool")
    table.add_column("figure")
    table.add_column("value", justify="right")
    heard = sum(result.allocated.values())
    rows = [
        ("the loop took, s", f"{result.seconds:.1f}"),
        ("peak target (before the loop)", f"{result.peak_target:,} ({result.target_before:,})"),
        ("most nodes in the pool (before)", f"{result.peak_nodes:,} ({result.nodes_before:,})"),
        ("most nodes the Node API ran", f"{result.peak_api_nodes:,}"),
        ("user:allocated heard for the loop", f"{heard:,}"),
        ("user:waiting heard for the loop", f"{result.waiting:,}"),
        *((f"{name} (the pool's, during the run)", f"{value:,}")
          for name, value in result.stats.items()),
        ("invariants at the end", "ok" if not result.problems else
         f"{len(result.problems)} broken"),
    ]
    for row in rows:
        table.add_row(*row)
    return table


def soak_table(result: SoakResult) -> Table:
    """Each reading at the start, the half and the end, and its slope over the second half."""
    last = result.samples[-1]
    table = Table(title=f"soak: {result.replicas} replica(s) on {result.server}, "
                        f"{last.t_s / 60:.1f} min, {len(result.samples)} samples")
    for column in ("reading", "first", "at the half", "at the end", "slope /h (2nd half)"):
        table.add_column(column, justify="left" if column == "reading" else "right")
    for reading in soak_summary(result.samples):
        spec = ",.0f" if reading.whole else ",.1f"
        table.add_row(reading.name, *(format(v, spec) for v in reading.values),
                      format(reading.slope_per_hour, "+,.1f"))
    return table


@app.command()
def bound(
    trace_path: Annotated[Path, typer.Argument(metavar="TRACE", exists=True, dir_okay=False)],
    window: Annotated[float, typer.Option(
        min=60.0, max=86_400.0,
        help="Seconds per window whose connect and disconnect rates are taken as known")] = 600.0,
    sim_seconds: Annotated[int, typer.Option(
        min=1_000, help="Length of each stationary run per window and band")] = 50_000,
    miss_rate: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Read the frontier's idle time off at this miss rate")] = 0.01,
    jobs: Annotated[int, typer.Option(min=1, help="Processes")] = 2,
    bands: Annotated[bool, typer.Option(
        "--bands", help="Also print each window's band at the frontier point nearest "
        "--miss-rate")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """The rate-oracle reference: idle time against misses for the best band policy per
    window when every window's rates are known (see provisioner/bench/bound.py)."""
    from provisioner.bench.bound import idle_at, rate_oracle

    trace = _load(trace_path)
    wins, points = rate_oracle(trace, window_s=window, seconds=sim_seconds, jobs=jobs)
    at = idle_at(points, miss_rate)
    if as_json:
        typer.echo(json.dumps({
            "trace": trace.name, "window_s": window, "sim_seconds": sim_seconds,
            "connects": sum(w.connects for w in wins), "miss_rate": miss_rate,
            "idle_hours_at_miss_rate": at,
            "windows": [{"start_s": w.start_s, "length_s": w.length_s,
                         "connects": w.connects, "frees": w.frees} for w in wins],
            "frontier": [{"theta": p.theta, "misses": p.misses, "miss_rate": p.miss_rate,
                          "idle_hours": p.idle_hours,
                          "bands": [{"boot_to": b.boot_to, "reap_above": b.reap_above,
                                     "idle_s": b.idle_s, "idle_hours": round(h, 4)}
                                    for b, h in zip(p.bands, p.window_idle_hours,
                                                    strict=True)]}
                         for p in points]}))
        return
    table = Table(title=f"{escape(trace.name)}: best band per {window:.0f} s window, rates known")
    for column in ("theta", "expected misses", "miss rate", "idle h"):
        table.add_column(column, justify="right")
    for p in points:
        table.add_row(f"{p.theta:g}", f"{p.misses:.1f}", f"{p.miss_rate:.2%}",
                      f"{p.idle_hours:.1f}")
    console.print(table)
    console.print(f"idle at {miss_rate:.1%} misses: "
                  + (f"{at:.1f} h" if at is not None else "outside the frontier"))
    if bands and points:
        near = min(points, key=lambda p: abs(p.miss_rate - miss_rate))
        table = Table(title=f"the band per window at theta {near.theta:g} "
                      f"({near.miss_rate:.2%} misses, {near.idle_hours:.1f} h idle)")
        for column in ("from s", "connects", "frees", "boot below", "reap above",
                       "reap idle >= s", "idle h"):
            table.add_column(column, justify="right")
        for w, b, h in zip(wins, near.bands, near.window_idle_hours, strict=True):
            table.add_row(f"{w.start_s:.0f}", str(w.connects), str(w.frees), str(b.boot_to),
                          str(b.reap_above), f"{b.idle_s:.0f}", f"{h:.2f}")
        console.print(table)


@app.command("oracle-bar")
def oracle_bar(
    directory: Annotated[Path, typer.Argument(metavar="DIR", exists=True, file_okay=False,
                                              help="The traces (*.jsonl.gz), as `bench suite`")],
    results: Annotated[Path, typer.Option(
        exists=True, help="`bench suite`'s results on these traces (a results.json or its "
        "folder): static-best's rows set each trace's limits, and the policy's are judged "
        "beside the oracle")],
    theta: Annotated[list[float] | None, typer.Option(
        help="Prices per miss to judge the oracle at, the same for every trace (repeatable; "
        "a miss is worth 1/theta idle node-hours); default: 0.25, 0.5 and 1")] = None,
    policy: Annotated[str, typer.Option(help="The policy to judge beside it")] = SERVICE,
    window: Annotated[float, typer.Option(
        min=60.0, max=86_400.0,
        help="Seconds per window whose connect and disconnect rates are taken as known")] = 600.0,
    sim_seconds: Annotated[int, typer.Option(
        min=1_000, help="Length of each stationary run per window and band")] = 50_000,
    jobs: Annotated[int, typer.Option(min=1, help="Processes")] = 2,
    fast: Annotated[list[str] | None, typer.Option(
        help="Traces where traffic changes fast, held to half of static-best's idle time "
        "(repeatable); default: spike and diurnal, as issue 4 names them")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Issue 4's bar for `bench bound`'s rate oracle at one price per miss for every trace (one
    configuration): the chance that one draw of each trace meets it, beside the policy's
    verdict on the same replays (see chance_to_meet in provisioner/bench/bound.py)."""
    from provisioner.bench.bar import (
        FAST_CHANGING,
        BarError,
        idle_limit_hours,
        judge,
        load_results,
        rows_by_trace,
    )
    from provisioner.bench.bound import chance_to_meet, rate_oracle

    thetas = sorted(set(theta)) if theta else [0.25, 0.5, 1.0]
    if any(not math.isfinite(t) or t <= 0 for t in thetas):
        raise typer.BadParameter("a price per miss (--theta) must be a finite number > 0")
    fast_traces = tuple(fast) if fast is not None else FAST_CHANGING
    paths = _trace_paths(directory)
    traces = [_load(path) for path in paths]
    try:
        rows = load_results(results)
        by_trace = rows_by_trace(rows, str(results))
        verdicts = {v.trace: v for v in judge(rows, policy=policy, fast=fast_traces,
                                              source=str(results))}
        for trace in traces:
            if STATIC_BEST not in by_trace.get(trace.name, {}):
                raise BarError(f"{results}: no {STATIC_BEST} row for {trace.name} to set "
                               "its limits")
    except BarError as exc:
        _red(exc)
        raise typer.Exit(2) from None
    judged = []  # (trace, connects, idle limit, the policy's verdict, [(point, chance)])
    for trace in traces:
        static = by_trace[trace.name][STATIC_BEST]
        limit = idle_limit_hours(static, trace.name in fast_traces)
        connects = int(static["connects"])
        wins, points = rate_oracle(trace, window_s=window, seconds=sim_seconds, jobs=jobs,
                                   thetas=thetas)
        counted = sum(w.connects for w in wins)
        if counted != connects:
            _red(f"{results}: {trace.name} has {connects} connects and the trace {counted}: not "
                 "the same traffic")
            raise typer.Exit(2)
        judged.append((trace.name, connects, limit, verdicts.get(trace.name),
                       [(p, chance_to_meet(p, connects, limit)) for p in points]))
    mine = [v for *_, v, _ in judged if v is not None]
    met = sum(v.met for v in mine)
    expected = [sum(oracle[i][1] for *_, oracle in judged) for i in range(len(thetas))]
    if as_json:
        typer.echo(json.dumps({
            "directory": str(directory), "results": str(results), "policy": policy,
            "window_s": window, "sim_seconds": sim_seconds,
            "traces": [{"trace": name, "connects": connects,
                        "idle_limit_hours": round(limit, 4),
                        "verdict": None if v is None else v.as_dict(),
                        "oracle": [{"theta": p.theta, "expected_misses": round(p.misses, 4),
                                    "miss_rate": round(p.miss_rate, 6),
                                    "idle_hours": round(p.idle_hours, 4),
                                    "chance_to_meet": round(chance, 4)}
                                   for p, chance in oracle]}
                       for name, connects, limit, v, oracle in judged],
            "policy_met": met, "policy_judged": len(mine),
            "oracle_expected_met": [{"theta": t, "met": round(e, 3)}
                                    for t, e in zip(thetas, expected, strict=True)]}))
        return
    table = Table(title=f"{escape(str(directory))}: {policy} against the rate oracle at one price "
                        "per miss",
                  caption="oracle: expected misses, idle h, chance that one draw meets the bar")
    table.add_column("trace", no_wrap=True)
    table.add_column(policy, justify="right")
    table.add_column("idle h bar", justify="right")
    for t in thetas:
        table.add_column(f"oracle θ={t:g}", justify="right")
    for name, _, limit, v, oracle in judged:
        cell = "—" if v is None else (f"{v.misses}/{v.connects}, {v.idle_hours:.1f} "
                                      + ("met" if v.met else "fails"))
        table.add_row(escape(name), cell, f"{limit:.1f}",
                      *(f"{p.misses:.1f}, {p.idle_hours:.1f}, {chance:.0%}"
                        for p, chance in oracle))
    console.print(table)
    console.print(f"{policy} met on {met} of {len(mine)}; the oracle, in expectation over one "
                  "draw of each: " + ", ".join(f"θ={t:g} {e:.1f}"
                                               for t, e in zip(thetas, expected, strict=True))
                  + f" of {len(judged)}")


def _trace_table(title: str, figures: Sequence[str], last: str) -> Table:
    """A table of `bench bar`'s: the trace, its figures right-aligned, then a verdict. A figure
    too wide for a narrow terminal folds onto a second line; it is never cut short."""
    table = Table(title=title)
    table.add_column("trace", no_wrap=True)
    for column in figures:
        table.add_column(column, justify="right", overflow="fold")
    table.add_column(last, no_wrap=True)
    return table


@app.command()
def bar(
    results: Annotated[list[Path], typer.Argument(
        metavar="RESULTS...", exists=True,
        help="results.json files that `bench suite` wrote, or the folders holding them")],
    policy: Annotated[str, typer.Option(help="The policy to judge")] = SERVICE,
    fast: Annotated[list[str] | None, typer.Option(
        help="Traces where traffic changes fast, held to half of static-best's idle time "
        "(repeatable); default: spike and diurnal, as issue 4 names them")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
    recursive: Annotated[bool, typer.Option(
        "--recursive", "-r", help="Search each RESULTS folder for results.json files (as "
        "`bench compare` does) and judge every one, instead of the folder's own only "
        "(implied by --static-from)")] = False,
    markdown: Annotated[bool, typer.Option(
        "--markdown", help="Print one Markdown table: a row per trace, a column per RESULTS "
        "file, each cell misses/connects, cost (static-best's) and the halves that fail")] = False,
    static_from: Annotated[Path | None, typer.Option(
        exists=True, help="Take the static-best rows from this result set instead (a "
        "results.json, or a folder searched for them, e.g. docs/bench): each RESULTS folder is "
        "then searched for results.json files too, and each is paired with the file at the "
        "same path under this one, as `bench compare` pairs them. For a screen that replayed "
        "the policy alone")] = None,
    by_trace: Annotated[bool, typer.Option(
        "--by-trace", help="Sum the verdicts per trace name over every RESULTS file (e.g. "
        "each shape over the held-out seeds): met of judged, misses / connects, the mean cost "
        "ratio and idle hours, and how often each half fails; with --json or --markdown "
        "in that form")] = False,
) -> None:
    """Issue 4's bar on each trace of suite results: miss rate <= 1%, cost ratio <= the same
    suite's static-best + 0.02, and on fast-changing traces idle node-hours <= half of
    static-best's (see provisioner/bench/bar.py)."""
    from provisioner.bench.bar import (
        COST_MARGIN,
        FAST_CHANGING,
        BarError,
        judge,
        load_results,
        markdown_by_trace,
        markdown_grid,
        summarize_by_trace,
        with_static_best,
    )
    from provisioner.bench.compare import load_tree, same_kind

    fast_traces = tuple(fast) if fast is not None else FAST_CHANGING

    def file_of(root: Path, name: str) -> Path:
        """The file load_tree(root) named `name`: root itself when it is a file."""
        return root / name if root.is_dir() else root

    judged = []
    seen: dict[Path, Path] = {}

    def once(file: Path) -> None:
        """A results file given twice (a folder and the file in it, two spellings) would
        count its verdicts twice."""
        if file.resolve() in seen:
            raise BarError(f"{file} is given twice (as {seen[file.resolve()]} too): its rows "
                           "would count twice")
        seen[file.resolve()] = file

    try:
        static = (static_from, load_tree(static_from)) if static_from is not None else None
        for path in results:
            if static is None and not recursive:
                once(path / "results.json" if path.is_dir() else path)
                judged.append((path, judge(load_results(path), policy=policy,
                                           fast=fast_traces, source=str(path))))
                continue
            if static is not None:
                same_kind(path, static[0], "--static-from ")
            for name, rows in load_tree(path).items():
                source = file_of(path, name)
                once(source)
                if static is not None:
                    static_root, statics = static
                    # two files are paired with each other, whatever their names
                    key = next(iter(statics)) if static_root.is_file() else name
                    if key not in statics:
                        raise BarError(f"{static_root}: no {name} to take {source}'s "
                                       "static-best rows from")
                    rows = with_static_best(rows, statics[key], policy=policy,
                                            source=str(source),
                                            static_source=str(file_of(static_root, key)))
                elif path.is_dir():
                    source = source.parent  # -r names each suite by its folder
                judged.append((source, judge(rows, policy=policy, fast=fast_traces,
                                             source=str(source))))
    except BarError as exc:
        _red(exc)
        raise typer.Exit(2) from None
    met = sum(v.met for _, verdicts in judged for v in verdicts)
    total = sum(len(verdicts) for _, verdicts in judged)
    if by_trace:
        summaries = summarize_by_trace([(str(path), verdicts) for path, verdicts in judged])
        if as_json:
            typer.echo(json.dumps({"policy": policy, "met": met, "judged": total,
                                   "result_sets": len(judged),
                                   "by_trace": [t.as_dict() for t in summaries]}))
        elif markdown:
            typer.echo(markdown_by_trace(summaries))
            typer.echo(f"\nmet on {met} of {total}, over {len(judged)} result sets")
        else:
            table = _trace_table(f"{policy} by trace over {len(judged)} result sets",
                                 ("met", "misses", "mean cost", "mean idle h"), "fails on")
            for t in summaries:
                table.add_row(escape(t.trace), f"{t.met} of {t.judged}", f"{t.misses}/{t.connects}",
                              f"{t.mean_cost_ratio:.3f}", f"{t.mean_idle_hours:.1f}",
                              t.fails_on)
            console.print(table)
            console.print(f"met on {met} of {total}")
        return
    if as_json:
        typer.echo(json.dumps({
            "policy": policy, "met": met, "judged": total,
            "static_from": None if static_from is None else str(static_from),
            "results": [{"source": str(path), "met": sum(v.met for v in verdicts),
                         "judged": len(verdicts), "traces": [v.as_dict() for v in verdicts]}
                        for path, verdicts in judged]}))
        return
    if markdown:
        typer.echo(markdown_grid([(str(path), verdicts) for path, verdicts in judged]))
        typer.echo(f"\nmet on {met} of {total}")
        return
    for path, verdicts in judged:
        against = "static-best" if static_from is None else f"{static_from}'s static-best"
        table = _trace_table(f"{path}: {policy} against {against} + {COST_MARGIN}",
                             ("misses", "cost (bar)", "idle h (bar)", "static"), "verdict")
        for v in verdicts:
            idle = f"{v.idle_hours:.1f}"
            if v.idle_limit is not None:
                idle += f" ({v.idle_limit:.1f})"
            table.add_row(escape(v.trace), f"{v.misses}/{v.connects}",
                          f"{v.cost_ratio:.3f} ({v.cost_limit:.3f})", idle, v.static_detail,
                          "met" if v.met else "fails: " + ", ".join(v.failed))
        console.print(table)
        console.print(f"met on {sum(v.met for v in verdicts)} of {len(verdicts)}")
    if len(judged) > 1:
        console.print(f"in all: met on {met} of {total}")


@app.command()
def compare(
    before: Annotated[Path, typer.Argument(
        exists=True, help="A results.json, or a folder searched for them (e.g. docs/bench)")],
    after: Annotated[Path, typer.Argument(
        exists=True, help="The same replays of the other release or variant, same layout "
        "(two files are paired with each other, whatever their names)")],
    policy: Annotated[str, typer.Option(help="The policy whose rows are paired")] = SERVICE,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Pair a policy's rows of two result sets (by results file and trace: the same users and
    boot draws) and give the change in misses and cost with its standard error, from the
    spread of the per-replay differences (see provisioner/bench/compare.py)."""
    from provisioner.bench.bar import BarError, load_results
    from provisioner.bench.compare import compare as paired_rows
    from provisioner.bench.compare import load_tree, same_kind

    try:
        if before.is_file() and after.is_file():  # e.g. two files of `replay --append-to`
            result = paired_rows({"results": load_results(before)},
                                 {"results": load_results(after)}, policy=policy)
        else:
            same_kind(before, after)
            result = paired_rows(load_tree(before), load_tree(after), policy=policy)
    except BarError as exc:
        _red(exc)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(result.as_dict()))
        return
    n, m, c = result.misses.n, result.misses, result.cost

    def se(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    console.print(f"{n} pairs of {policy} ({result.connects:,} connects before)")
    console.print(f"misses: {m.before:.0f} before, {m.after:.0f} after, {m.difference:+.0f} "
                  f"± {se(m.se_total, '.1f')} (one standard error of the total)")
    console.print(f"mean cost ratio: {c.mean_before:.4f} before, {c.mean_after:.4f} after, "
                  f"{c.mean_difference:+.4f} ± {se(c.se_mean, '.4f')}")
    console.print(f"cost lower on {result.cheaper} pairs, higher on {result.dearer}")
    for item in result.unpaired:
        errors.print(f"[yellow]not paired: {escape(item)}")


@app.command()
def generate(
    directory: Annotated[Path, typer.Argument(metavar="DIR", file_okay=False)],
    shape: Annotated[list[str] | None, typer.Option(
        help="Shapes to write (repeatable); default: the --family's")] = None,
    family: Annotated[str, typer.Option(
        help="The shapes written together when none is named: held-out (the held-out "
        "suites), later (written after the defaults were last chosen) or stress "
        "(very-slow-boots)")] = "held-out",
    seed: Annotated[int, typer.Option(help="Seed; the same seed writes the same files")] = 1,
) -> None:
    """Write synthetic traces in shapes the recorded ones do not have (a ramp, level shifts,
    bursts, two daily cycles, short and long sessions, slow boots, and later a busy product, a
    flash crowd, users who connect with little warning, fast boots, a browsing crowd, a quiet
    product) and a constant control, for `bench suite DIR`."""
    from provisioner.bench.generate import FAMILIES, SHAPES, family_shapes, write_trace

    if family not in FAMILIES:
        raise typer.BadParameter(f"unknown family {family}; known: {', '.join(FAMILIES)}",
                                 param_hint="--family")
    names = shape or family_shapes(family)
    unknown = sorted(set(names) - set(SHAPES))
    if unknown:
        raise typer.BadParameter(f"unknown shape {', '.join(unknown)}; known: "
                                 f"{', '.join(SHAPES)}", param_hint="--shape")
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = directory / f"{name}.jsonl.gz"
        header = write_trace(SHAPES[name], seed, path)
        console.print(f"{path}: {header['users']} users, {header['events']} events over "
                      f"{header['duration_s']:.0f} s - {header['description']}")


@app.command()
def users(
    traces: Annotated[list[Path], typer.Argument(metavar="TRACE...", exists=True,
                                                 dir_okay=False)],
) -> None:
    """What each trace's users do, as quantiles: requests before a connect, time from first
    request to connect, session length, gap between requests (to compare generated traffic
    with recorded traffic)."""
    from provisioner.bench.generate import QUANTILES, user_quantiles

    table = Table(title="users, at quantiles " + "/".join(f"{q:.0%}" for q in QUANTILES))
    for column in ("trace", "measure", "quantiles"):
        table.add_column(column)
    for path in traces:
        trace = _load(path)
        for name, values in user_quantiles(trace).items():
            table.add_row(escape(trace.name), name, " / ".join(f"{v:.0f}" for v in values))
    console.print(table)


@app.command()
def features(
    traces: Annotated[list[Path], typer.Argument(metavar="TRACE...", exists=True,
                                                 dir_okay=False)],
    horizon: Annotated[float | None, typer.Option(
        min=1.0, max=86_400.0, help="Seconds ahead a connect counts (default: the trace's "
        "mean boot lead time, at most the window, as the service learns)")] = None,
    step: Annotated[float, typer.Option(min=0.5, max=86400,
                                        help="Seconds between samples")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per trace")]
    = False,
) -> None:
    """How much browsing users' cells tell about who connects within the horizon: log loss and
    the Bernoulli variance the buffer is sized on, per cut of users into cells, against one
    chance for all and against a Poisson count of the same mean (offline, in hindsight; see
    provisioner/bench/features.py). The last cut is told who connects later, not when: a
    bound on what any signal of who converts could buy, not a feature."""
    from provisioner.bench.features import measure

    for path in traces:
        found = measure(_load(path), horizon, step)
        if as_json:
            typer.echo(json.dumps(found.as_dict()))
            continue
        console.print(
            f"{found.trace}: {found.samples} samples of a browsing user every {step:g} s, "
            f"{found.connecting} of them connecting within {found.horizon_s:.0f} s; "
            f"{found.browsing_connects} of {found.connects} connects by a browsing user. Δ: "
            "against one chance for all; ÷ mean: the variance over a Poisson count's")
        table = Table()
        for column in ("cut", "cells", "log loss", "Δ", "variance", "Δ ", "÷ mean"):
            table.add_column(column, justify="left" if column == "cut" else "right")
        base = found.scores[0]
        mean = found.connecting / found.samples if found.samples else 0.0
        for score in found.scores:
            table.add_row(
                score.cut, str(score.cells), f"{score.log_loss:.4f}",
                f"{score.log_loss / base.log_loss - 1:+.1%}" if base.log_loss else "—",
                f"{score.variance:.5f}",
                f"{score.variance / base.variance - 1:+.1%}" if base.variance else "—",
                f"{score.variance / mean:.0%}" if mean else "—")
        console.print(table)
