"""The private server stops with its owner, also when the owner is sent SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

# An owner that starts a private server, reports its pid and waits to be stopped.
OWNER = """
import os, time
from provisioner.redis_server import private_server
with private_server(os.environ.get("PROVISIONER_TEST_REDIS_BINARY")) as server:
    print(server.process.pid, flush=True)
    time.sleep(60)
"""


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_server_is_stopped_when_its_owner_is_sent_sigterm() -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        server_pid = int(owner.stdout.readline())
        assert running(server_pid)
        owner.send_signal(signal.SIGTERM)
        assert owner.wait(timeout=15) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 5
        while running(server_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(server_pid), "the server outlived its owner"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
