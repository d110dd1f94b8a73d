"""The private server stops with its owner, also when the owner is sent SIGTERM or SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

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
def test_a_server_is_stopped_when_its_owner_is_stopped(stop: signal.Signals,
                                                       exit_code: int) -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
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
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if server_pid and running(server_pid):  # a failed check leaves no server behind
            os.kill(server_pid, signal.SIGKILL)
