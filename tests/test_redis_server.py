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


@pytest.mark.engine  # OWNER starts the engine under test
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


def test_a_server_s_block_gives_sigterm_back_as_it_found_it() -> None:
    """Within the block SIGTERM stops the server with its owner; after it, the owner's SIGTERM
    is its own again (left raising SystemExit, a later `kill` of a long-running owner would
    surface as an exception wherever it ran). Untested: dropping the restore passed."""
    from provisioner.redis_server import private_server

    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with private_server() as server:
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
            assert running(server.process.pid)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert not running(server.process.pid)
    finally:
        signal.signal(signal.SIGTERM, before)


def test_the_engine_lists_of_the_test_matrix_agree() -> None:
    """`make test-matrix ENGINES=--others` runs the suite once per engine but the default one,
    which `make test` ran: --others is --list without --default. Untested: --others printing
    every engine passed (the default run twice, or, inverted, the others never)."""
    env = {k: v for k, v in os.environ.items() if k != "PROVISIONER_REDIS_SERVER"}

    def said(flag: str) -> list[str]:
        done = subprocess.run([sys.executable, "-m", "provisioner.redis_server", flag], env=env,
                              capture_output=True, text=True, timeout=60, check=True)
        return done.stdout.split()

    engines, (default,), others = said("--list"), said("--default"), said("--others")
    assert default in engines
    assert others == [engine for engine in engines if engine != default]
    wrong = subprocess.run([sys.executable, "-m", "provisioner.redis_server", "--bogus"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 1 and "usage:" in wrong.stderr, wrong


def test_listing_the_engines_leaves_the_environment_as_it_was(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """available_engines empties PATH and drops PROVISIONER_REDIS_SERVER to find the shipped
    binary: both come back, or every later server start of the process finds none."""
    from provisioner.redis_server import available_engines

    monkeypatch.setenv("PROVISIONER_REDIS_SERVER", str(tmp_path / "forced-server"))
    before = dict(os.environ)
    assert available_engines()
    assert dict(os.environ) == before


def test_a_server_that_never_answers_is_not_left_running(tmp_path: Path) -> None:
    """A start that gives up (no PING answered in time) stops the process it started: one
    left running was untested (dropping its kill passed), and each of the five attempts of
    a start on free ports would leave one."""
    from provisioner.redis_server import RedisServerError, free_port, start_server

    silent = tmp_path / "silent-server"
    silent.write_text("#!/bin/sh\necho $$ > \"$0.pid\"\nexec sleep 60\n")
    silent.chmod(0o755)
    with pytest.raises(RedisServerError, match="did not start"):
        start_server(str(silent), port=free_port(), startup_timeout=0.5)
    pid = int((tmp_path / "silent-server.pid").read_text())
    assert not running(pid)


def test_a_server_that_ignores_sigterm_is_killed_when_stopped(tmp_path: Path) -> None:
    """stop() sends SIGTERM, then SIGKILL once its timeout has passed: a server that does not
    stop on SIGTERM (hung, or a wrapper ignoring it) is not left running. Untested: dropping
    the SIGKILL passed."""
    from provisioner.redis_server import RedisServer

    ignoring = tmp_path / "ignoring"
    stubborn = subprocess.Popen(["sh", "-c", f"trap '' TERM; touch {ignoring}; exec sleep 60"])
    server = RedisServer(stubborn, 0, "sh", str(tmp_path / "gone"))
    try:
        while not ignoring.exists():  # SIGTERM ignored from here on
            assert stubborn.poll() is None
            time.sleep(0.01)
        server.stop(timeout=0.5)
        assert stubborn.returncode == -signal.SIGKILL
    finally:
        if stubborn.poll() is None:
            stubborn.kill()
            stubborn.wait()


def test_the_server_binary_named_by_the_environment_is_the_one_started(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """README: `PROVISIONER_REDIS_SERVER` names the binary, before any on PATH; one that cannot
    be run is refused naming it, not passed over for another. Untested: ignoring it passed."""
    from provisioner.redis_server import RedisServerError, find_server_binary

    chosen = tmp_path / "my-server"
    chosen.write_text("#!/bin/sh\n")
    chosen.chmod(0o755)
    monkeypatch.setenv("PROVISIONER_REDIS_SERVER", str(chosen))
    assert find_server_binary() == str(chosen)
    chosen.chmod(0o644)
    with pytest.raises(RedisServerError) as refused:
        find_server_binary()
    assert str(refused.value) == f"PROVISIONER_REDIS_SERVER={str(chosen)!r} is not executable"


def test_a_port_another_server_took_first_is_not_taken_for_ours(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The port `free_port` gave was taken before the new server bound it, and the other
    server's PING answer was taken for ours: our server had exited, and a stack would have run
    on the other's (a review). Ours is known by its process id, and started on another port."""
    from provisioner import redis_server

    taken = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    ports = iter([taken])
    real = redis_server.free_port
    monkeypatch.setattr(redis_server, "free_port", lambda: next(ports, None) or real())
    server = redis_server.start_server(os.environ.get("PROVISIONER_TEST_REDIS_BINARY"))
    try:
        assert server.port != taken and server.process.poll() is None
    finally:
        server.stop()


# Prints each test `-m "not e2e"` collects, after "E " where it is marked `engine` (one
# collection of the suite, where one per selection took twice as long).
MARKED = """
import sys, pytest
class Said:
    def pytest_collection_finish(self, session):
        for item in session.items:
            print("E" if item.get_closest_marker("engine") else "-", item.nodeid)
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-m", "not e2e",
                      sys.argv[1]], plugins=[Said()]))
"""


def _collected() -> tuple[set[str], set[str]]:
    """The tests `make test-matrix` runs (`engine and not e2e`), and the rest but e2e."""
    done = subprocess.run([sys.executable, "-c", MARKED, str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    said = [line.split(" ", 1) for line in done.stdout.splitlines()
            if line[:2] in ("E ", "- ")]
    return ({item for mark, item in said if mark == "E"},
            {item for mark, item in said if mark == "-"})


def _reaching_the_engine_under_test(path: Path) -> set[str]:
    """The names of the module's tests whose code names PROVISIONER_TEST_REDIS_BINARY, itself
    or through a module-level constant that does (test_redis_server's OWNER)."""
    import ast

    tree = ast.parse(path.read_text())
    said = {target.id for node in tree.body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)
            and "PROVISIONER_TEST_REDIS_BINARY" in ast.unparse(node.value)}
    found = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and \
                node.name.startswith("test_"):
            code = ast.unparse(node)
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            if "PROVISIONER_TEST_REDIS_BINARY" in code or names & said:
                found.add(node.name)
    return found


def test_the_engine_matrix_runs_every_test_that_talks_to_the_engine_under_test() -> None:
    """`make test-matrix` runs the tests marked `engine` alone (conftest marks each that asks
    for a server fixture; a test that starts the engine itself is marked by hand). A test left
    unmarked would never run on the other engines, and nothing would say so. Untested: the
    Lua scripts' tests out of the matrix passed."""
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    assert '$(PYTEST) -m "engine and not e2e"' in makefile  # the selection judged here
    matrix, rest = _collected()
    assert matrix and rest and not matrix & rest

    def tests_of(items: set[str], module: str) -> set[str]:
        return {item for item in items if item.startswith(f"tests/{module}::")}

    for module in ("test_scripts.py", "test_state_machine.py", "test_fuzz_policy.py",
                   "test_hand_edits.py"):  # the state machine, on every engine
        assert len(tests_of(matrix, module)) > len(tests_of(rest, module)), module
    assert len(tests_of(rest, "test_docs.py")) > len(tests_of(matrix, "test_docs.py"))
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        for name in _reaching_the_engine_under_test(path):
            left = {item for item in rest
                    if item.split("::")[1].split("[")[0] == name and
                    item.startswith(f"tests/{path.name}::")}
            assert not left, f"{sorted(left)} start the engine under test, unmarked `engine`"


def test_no_test_starts_a_server_of_an_engine_other_than_the_one_under_test() -> None:
    """A test that starts a server itself with `start_server()` runs the default engine
    whatever the matrix is testing: the tests that pause a server (SIGSTOP) did so until
    2026-12-07, and ran on one engine only. Each passes the matrix's binary (the variable
    conftest's fixtures read; the default engine where it is unset), and the test above then
    finds it unless it is marked `engine`."""
    import ast

    found = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in (
                    "start_server", "redis_server.start_server") and not node.args:
                found.append(f"{path.name}:{node.lineno}")
    assert not found, f"{found} start a server of the default engine, not the one under test"
