"""`make run`: the whole local stack as child processes, with the live status view in front.

A private Redis-compatible server (unless a URL is given), the mock Node API, N replicas and the
traffic simulator each run as a child process in its own session, logging to files under one
folder. Ctrl-C (or SIGTERM, or SIGHUP: the terminal closed) stops them all: SIGTERM first,
SIGKILL after a grace period, so no process is left behind; a second Ctrl-C does not cut that
short. Should this process be killed outright (SIGKILL), the kernel sends each child SIGTERM
(Linux's parent-death signal), as it does the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis.asyncio as aioredis
import typer
from redis.exceptions import RedisError
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from provisioner import view
from provisioner.clock import server_now_ms
from provisioner.config import PoolConfig, redis_trouble, redis_trouble_word
from provisioner.keys import PoolKeys
from provisioner.redis_server import RedisServer, free_port, parent_death_signal, start_server
from provisioner.simulator import Parsed
from provisioner.terminal import SafeConsole

console = SafeConsole()


class Child:
    def __init__(self, name: str, args: list[str], logdir: Path,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.log_path = logdir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self._die_with_parent = parent_death_signal()
        self.process = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        # Its own session, so a Ctrl-C at the terminal reaches this process alone, which then
        # stops the children in order; and the parent-death signal, so they stop with it even
        # when it cannot (SIGKILL).
        return subprocess.Popen(
            self.args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=self.env, cwd=self.cwd,
            preexec_fn=self._die_with_parent)

    def restart(self) -> None:
        """SIGKILL the process (a crash, not a shutdown) and start it again, logging on."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.process = self._spawn()

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)

    def kill(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._log.close()


def wait_http(url: str, timeout: float = 15.0, pid: int | None = None,
              alive: Callable[[], bool] | None = None) -> bool:
    """Whether `url` answered 200 within `timeout`, and, given `pid`, answered as that
    process (the pid in its JSON answer: another process that took the port first, another
    stack's mock or replica, answered 200 too, and the stack pointed its replicas at it, a
    review); False at once once `alive()` says the process has exited. The tests start their
    processes through it too (tests.helpers.listening)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        with contextlib.suppress(httpx.HTTPError, ValueError, AttributeError):
            answer = httpx.get(url, timeout=1)
            if answer.status_code == 200 and (pid is None or answer.json().get("pid") == pid):
                return True
        time.sleep(0.1)
    return False


def _serving(start: Callable[[int], Child]) -> tuple[Child, int, bool]:
    """A child started by `start(port)` on a free port, and whether it answers there. A free
    port is free when asked for, not when the child binds it: one that exits first (a
    replica's log: "cannot listen ... address already in use", in a test run beside another)
    is started again on another port, twice at most."""
    for _attempt in range(3):
        port = free_port()
        child = start(port)
        if wait_http(f"http://127.0.0.1:{port}/healthz", pid=child.process.pid,
                     alive=child.alive):
            return child, port, True
        if child.alive():
            break  # slow, not refused: its log says why
        child.kill()
    return child, port, False


@dataclass
class Stack:
    """A running local stack: where its server is, its processes, and where they log."""

    redis_url: str
    logdir: Path
    api_port: int
    metrics_ports: list[int] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)
    #: the pool the replicas run: PROVISIONER_POOL, which they inherit, or the default (the
    #: view read "default" whatever they ran, a review)
    pool: str = "default"
    #: the private server's pid, if the stack started one (a drill stops it: `bench pause`)
    server_pid: int | None = None


# What the stack sets itself in each process it starts, refused in the options passed on to it:
# given again, the process would take the later (the stack's own port or server lost), and the
# stack's own options say the rest. Each with the stack's own option for it, if it has one.
SET_BY_THE_STACK = {
    "mock-node-api": {"--port": "", "--host": "", "--redis-url": "--redis-url",
                      "--boot-delay": "--boot-delay"},
    "simulate": {"--redis-url": "--redis-url",
                 "--arrival-rate": "--arrival-rate (synthetic traffic only)"},
}
# What the stack gives each process itself, ahead of the options passed on, so that the check
# parses what the process will: an environment variable of one of these (MOCK_NODE_API_PORT=0)
# is not read, as the process does not read it (a review: `dev` refused to start on it). The
# values stand in for the stack's own, which the stack checks apart.
GIVEN_BY_THE_STACK = {
    "mock-node-api": ["--port", "8080", "--redis-url", "redis://127.0.0.1:6379/0"],
    "simulate": ["--redis-url", "redis://127.0.0.1:6379/0"],
}


# What a command's parser raises on an unknown option, a bad value or a word too many: click's
# UsageError, named through its subclass typer exports (typer's later releases carry their own
# copy of click, with no `click` module to import), and typed as that subclass, whose
# format_message it has.
_USAGE_ERROR = cast("type[typer.BadParameter]", typer.BadParameter.__bases__[0])


def options_passed_on(text: str, name: str, command: Callable[..., Any],
                      option: str) -> tuple[list[str], Parsed]:
    """`text`, options for the stack's process `name` (a command of the CLI, `command` its
    function), split as a shell would and parsed now by that command's own parser: a bad
    value, an unknown option or one the stack sets itself is refused (a typer.BadParameter on
    `option`) before anything starts, not found later in the process's log. Returns the
    options and their parse."""
    try:
        args = shlex.split(text)
    except ValueError as exc:
        raise typer.BadParameter(f"cannot split {text!r}: {exc}", param_hint=option) from None
    for arg in args:
        word = arg.split("=", 1)[0]
        if word == "--help":
            raise typer.BadParameter(f"--help starts nothing; `provisioner {name} --help` lists "
                                     "the options", param_hint=option)
        if word in SET_BY_THE_STACK[name]:
            own = SET_BY_THE_STACK[name][word]
            raise typer.BadParameter(
                f"{word} is set by the stack itself" + (f"; give {own} to the stack" if own
                                                         else ""), param_hint=option)
    # Without completion options, as the CLI's own app: a Typer's default would take
    # `--install-completion` here, and run it (a review: it wrote to ~/.bashrc, exit 0).
    one = typer.Typer(add_completion=False)
    one.command(name)(command)
    parser = typer.main.get_command(one)
    try:
        parsed = parser.make_context(name, [*GIVEN_BY_THE_STACK[name], *args])
    except _USAGE_ERROR as exc:
        raise typer.BadParameter(f"{name}: {exc.format_message()}", param_hint=option) from None
    return args, parsed


@contextlib.contextmanager
def stack(redis_url: str | None = None, replicas: int = 2,
          boot_delay: str = "lognormal:20:45", arrival_rate: float | None = 20.0,
          simulate: Sequence[str] = (), say: Callable[[str], None] = console.print,
          mock: Sequence[str] = (), replicas_from: Path | None = None,
          replica_env: Mapping[str, Mapping[str, str]] | None = None) -> Iterator[Stack]:
    """Start the server (unless `redis_url` is given), the mock Node API (`mock`: its further
    options), the replicas and the simulator (`simulate`: its further options; no
    `--arrival-rate` if `arrival_rate` is None, as a --trace needs), and stop them all on the
    way out: SIGTERM first, SIGKILL after a grace period. Raises RuntimeError if the mock Node
    API does not start. `replicas_from`: a checkout whose package (and scripts) the replicas
    run instead of this one's, started in it (another release, side by side). `replica_env`:
    a replica's own environment over the stack's, by name (`replica-2`: a server URL of its
    own, through a hop a drill cuts)."""
    pool = os.environ.get("PROVISIONER_POOL") or "default"
    try:
        PoolKeys(pool)
    except ValueError as exc:
        raise RuntimeError(f"PROVISIONER_POOL: {exc}") from None
    logdir = Path(tempfile.mkdtemp(prefix="provisioner-stack-"))
    exe = [sys.executable, "-m", "provisioner"]
    server: RedisServer | None = None
    children: list[Child] = []
    try:
        if not redis_url:
            server = start_server()
            redis_url = server.url
            say(f"private server {server.binary} on {redis_url}")
        elif problem := _unusable(redis_url):
            # Every process would start, fail and exit, and the view wait for them for ever.
            raise RuntimeError(problem)
        # The URL goes in the environment, not on the command line: a command line is every
        # local user's to read (ps, /proc/PID/cmdline), and the URL may carry a password.
        env = {"PROVISIONER_REDIS_URL": redis_url}
        api, api_port, answers = _serving(lambda port: Child("mock-node-api", [
            *exe, "mock-node-api", "--port", str(port), "--boot-delay", boot_delay, *mock],
            logdir, env))
        children.append(api)
        running = Stack(redis_url, logdir, api_port, children=children, pool=pool,
                        server_pid=server.process.pid if server is not None else None)
        if not answers:
            raise RuntimeError(f"mock Node API did not start; see {logdir}/mock-node-api.log")
        def replica(name: str) -> Callable[[int], Child]:
            return lambda port: Child(name, [
                *exe, "run",
                "--node-api-url", f"http://127.0.0.1:{running.api_port}", "--http-port",
                str(port), "--http-host", "127.0.0.1",  # a laptop's stack: this host only
                # Started in the other checkout: `python -m` puts the working directory first
                # on the path, ahead of PYTHONPATH and the installed package.
                "--replica-id", name], logdir, {**env, **(replica_env or {}).get(name, {})},
                replicas_from)

        for index in range(replicas):
            # Each answering before the next starts, and before the simulator's traffic.
            child, port, _ = _serving(replica(f"replica-{index + 1}"))
            children.append(child)
            running.metrics_ports.append(port)
        rate = [] if arrival_rate is None else ["--arrival-rate", str(arrival_rate)]
        children.append(Child("simulator", [*exe, "simulate", *rate, *simulate], logdir, env))
        given = f" ({shlex.join(mock)})" if mock else ""
        say(f"mock Node API http://127.0.0.1:{running.api_port}{given}  replicas' metrics on "
            f"ports {', '.join(map(str, running.metrics_ports))}  pool {pool}  logs in "
            f"{logdir}")
        yield running
    finally:
        with _interrupts_ignored():
            for child in children:
                child.stop()
            deadline = time.monotonic() + 10
            while any(c.alive() for c in children) and time.monotonic() < deadline:
                time.sleep(0.1)
            for child in children:
                child.kill()
            if server is not None:
                server.stop()
            if children:
                # The private server is a process too, and its data goes with it (a review:
                # "stopped 4 processes" left an operator asking whether it still ran).
                also = " and the private server" if server is not None else ""
                say(f"stopped {len(children)} processes{also}; logs kept in {logdir}")
            else:  # refused before anything started: no logs to keep (a review)
                shutil.rmtree(logdir, ignore_errors=True)


def _unusable(redis_url: str) -> str | None:
    """Why the server at `redis_url` does not answer PING within 5 s (out of reach, or refusing:
    its credentials, its maxclients; `redis_trouble`), or None."""
    import redis

    try:
        with redis.Redis.from_url(redis_url, socket_timeout=5,
                                  socket_connect_timeout=5) as client:
            client.ping()
    except (OSError, RedisError) as exc:
        return redis_trouble(redis_url, exc)
    return None


@contextlib.contextmanager
def _interrupts_ignored() -> Iterator[None]:
    """Ctrl-C ignored while the stack stops: a second one, pressed because stopping takes a
    few seconds, would end it half-way and leave the rest running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_stack(redis_url: str | None = None, replicas: int = 2,
              boot_delay: str = "lognormal:20:45", arrival_rate: float | None = 20.0,
              duration: float | None = None, mock: Sequence[str] = (),
              simulate: Sequence[str] = ()) -> int:
    """Start everything, show the live view until Ctrl-C (or `duration` seconds), stop all;
    `mock`, `simulate`: further options of the mock Node API and of the simulator."""
    stop = {"now": False}

    def on_signal(_signum: int, _frame: object) -> None:
        stop["now"] = True

    # SIGHUP too: the terminal that ran `make run` was closed.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with stack(redis_url, replicas, boot_delay, arrival_rate, simulate,
                   mock=mock) as running:
            console.print("Ctrl-C stops everything.")
            try:
                ended = asyncio.run(_watch(running.redis_url, running.children, stop, duration,
                                           running.pool))
            except KeyboardInterrupt:
                ended = None
        if ended:
            console.print(escape(ended), style="red")  # it names log paths: not markup
            return 1
        return 0
    except RuntimeError as exc:
        console.print(escape(str(exc)), style="red")
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def _watch(redis_url: str, children: list[Child], stop: dict[str, bool],
                 duration: float | None, pool: str = "default") -> str | None:
    """Show the pool until stopped (None), or until every replica has exited (why)."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True, encoding_errors="replace")
    started = time.monotonic()
    window = PoolConfig().window_ms
    replicas = [c for c in children if c.name.startswith("replica-")]
    try:
        with Live(console=console, auto_refresh=False) as live:
            while not stop["now"]:
                if duration is not None and time.monotonic() - started > duration:
                    return None
                if replicas and not any(c.alive() for c in replicas):
                    # A stack with no service left shows nothing to wait for: say where to
                    # look, and stop it.
                    return ("every replica has exited; their logs: "
                            + ", ".join(str(c.log_path) for c in replicas))
                processes = Text("  ".join(
                    f"{c.name}:{'up' if c.alive() else 'EXITED'}" for c in children))
                try:
                    pool_view = await view.read_view(client, pool, await server_now_ms(client),
                                                     window)
                    shown: Any = view.render_view(pool_view)
                except (OSError, RedisError) as exc:  # the server stopped, or restarts
                    # or answered and refused (a key's type, the credentials): not out of reach
                    shown = Text(f"{redis_trouble_word(exc)}: {exc}", style="red")
                live.update(Group(shown, processes), refresh=True)
                await asyncio.sleep(1.0)
            return None
    finally:
        if not console.is_terminal:
            console.print()  # the last view ends its line (into a file it did not)
        await client.aclose()
