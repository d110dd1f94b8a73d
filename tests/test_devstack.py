"""`provisioner dev` (`make run`): however it is stopped, no process of its stack is left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def stack_pids(marker: str) -> list[int]:
    """The processes alive with `marker` in their environment (every child inherits it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() not in (entry / "environ").read_bytes():
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("stop", [signal.SIGHUP, signal.SIGKILL, signal.SIGINT])
def test_the_dev_stack_leaves_no_process_however_it_is_stopped(stop: signal.Signals,
                                                               tmp_path: Path) -> None:
    # SIGHUP (the terminal closed) and SIGKILL left the mock Node API and both replicas
    # running, retrying forever, as orphans.
    marker = f"PROVISIONER_DEV_TEST={tmp_path}"
    env = {**os.environ, "TMPDIR": str(tmp_path), "PROVISIONER_DEV_TEST": str(tmp_path)}
    dev = subprocess.Popen([sys.executable, "-m", "provisioner", "dev"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert dev.stdout is not None
        lines = []
        for line in dev.stdout:
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        else:
            pytest.fail("the stack did not start: " + "".join(lines))
        assert len(stack_pids(marker)) >= 5  # the server, the API, 2 replicas, the simulator
        dev.send_signal(stop)
        if stop == signal.SIGINT:
            time.sleep(0.3)
            dev.send_signal(stop)  # a second Ctrl-C while it stops
        dev.wait(timeout=30)
        deadline = time.monotonic() + 10
        while stack_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stack_pids(marker) == []
    finally:
        if dev.poll() is None:
            dev.kill()
        for pid in stack_pids(marker):
            os.kill(pid, signal.SIGKILL)
