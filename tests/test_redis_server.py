"""The private server stops with its owner, also when the owner is sent SIGTERM or SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

# An owner that starts a private server, reports its pid and waits to be stopped.
OWNER = """
import os, time
from provisioner.redis_server import private_server
with private_server(os.environ.get("PROVISIONER_TEST_REDIS_BINARY")) as server:
    print(server.process.pid, flush=True)
    time.sleep(60)
"""


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan that has exited may wait a while to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(("stop", "exit_code"), [
    (signal.SIGTERM, 128 + signal.SIGTERM),  # private_server's handler: SystemExit(143)
    (signal.SIGKILL, -signal.SIGKILL),  # uncatchable: the kernel's parent-death signal
])
def test_a_server_is_stopped_when_its_owner_is_stopped(stop: signal.Signals, exit_code: int,
                                                       tmp_path: Path) -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "TMPDIR": str(tmp_path)})
    server_pid = 0
    try:
        assert owner.stdout is not None
        server_pid = int(owner.stdout.readline())
        assert running(server_pid)
        owner.send_signal(stop)
        assert owner.wait(timeout=15) == exit_code
        deadline = time.monotonic() + 5
        while running(server_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(server_pid), "the server outlived its owner"
        # Nor its folder: it goes once the server answers (the SIGKILL left one a run).
        assert list(tmp_path.iterdir()) == []
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if server_pid and running(server_pid):  # a failed check leaves no server behind
            os.kill(server_pid, signal.SIGKILL)


def test_a_start_interrupted_leaves_neither_a_server_nor_its_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from provisioner import redis_server

    # A "server" that never answers, and a Ctrl-C while the start waits for it.
    silent = tmp_path / "silent-server"
    silent.write_text("#!/bin/sh\nexec sleep 60\n")
    silent.chmod(0o755)
    workdirs = tmp_path / "tmp"
    workdirs.mkdir()
    monkeypatch.setattr(redis_server.tempfile, "tempdir", str(workdirs))
    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    def interrupt(_: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(redis_server.subprocess, "Popen", popen)
    monkeypatch.setattr(redis_server.time, "sleep", interrupt)
    with pytest.raises(KeyboardInterrupt):
        redis_server.start_server(str(silent))
    [server] = [p for p in started if p.args[0] == str(silent)]  # not libc's lookup
    assert server.poll() is not None
    assert list(workdirs.iterdir()) == []
