"""`bench loop`: a client reconnecting in a loop, live, and what the run reads of the pool."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from provisioner.bench.loop import LoopResult, peak_of

ROOT = Path(__file__).resolve().parent.parent


def test_the_keep_window_s_peak_is_read_from_its_entry_and_nothing_else() -> None:
    assert peak_of("1764929000123:7") == 7 and peak_of(b"1764929000123:12") == 12
    assert [peak_of(e) for e in (None, "", "1764929000123", "x:y", "1:-3")] == [0] * 5


def test_a_loop_fails_on_a_broken_invariant_or_a_traceback_only() -> None:
    clean = LoopResult("redis 7", 2, 1, 10, 5.0, "connect-first", False, peak_target=400,
                       tracebacks={"replica-1": 0})
    assert clean.failed == []  # figures, however high, are for the reader to judge
    broken = LoopResult("redis 7", 2, 1, 10, 5.0, "connect-first", False,
                        problems=["node n1 is both ready and allocated"],
                        tracebacks={"replica-2": 3})
    assert broken.failed == ["node n1 is both ready and allocated",
                             "replica-2: 3 traceback(s) in its log"]
    assert broken.as_json()["failed"] == broken.failed


def test_a_cancel_swallowed_on_the_way_still_stops_the_loop() -> None:
    """Python 3.11's wait_for (under every redis-py send) returns, and swallows the cancel,
    when its task is cancelled after the work it waits for finished but before it woke: the
    loop's check raises the cancel all the same (on 3.12 wait_for raises it itself)."""
    import asyncio

    from provisioner.bench.loop import _raise_if_cancelled

    async def main() -> None:
        me = asyncio.current_task()
        assert me is not None

        async def sent() -> None:
            me.cancel()  # a Ctrl-C as the send completes

        await asyncio.wait_for(sent(), 5)  # Python 3.11: returns
        _raise_if_cancelled()
        raise AssertionError("the cancel was lost")

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(main())


def test_only_asyncio_s_own_connect_race_is_kept_off_stderr() -> None:
    from provisioner.bench.loop import quiet_connect_race

    class Loop:
        def __init__(self) -> None:
            self.told: list[dict[str, Any]] = []

        def default_exception_handler(self, context: dict[str, Any]) -> None:
            self.told.append(context)

    class Handle:
        def __init__(self, callback: str) -> None:
            self.callback = callback

        def __repr__(self) -> str:
            return f"<Handle BaseSelectorEventLoop.{self.callback}(<Future cancelled>)>"

    loop = Loop()
    race = {"exception": asyncio.InvalidStateError("invalid state"),
            "handle": Handle("_sock_connect_cb")}
    other = {"exception": asyncio.InvalidStateError("invalid state"),
             "handle": Handle("_read_ready")}
    failed = {"exception": ValueError("x"), "handle": Handle("_sock_connect_cb")}
    for context in (race, other, failed):
        quiet_connect_race(loop, context)  # type: ignore[arg-type]
    assert loop.told == [other, failed]


def test_a_bad_order_delay_folder_or_checkout_is_refused_before_anything_starts(
        tmp_path: Path) -> None:
    from provisioner.cli import app

    runner = CliRunner()
    wide = {"COLUMNS": "300"}
    order = runner.invoke(app, ["bench", "loop", "--order", "sideways"], env=wide)
    assert order.exit_code == 2 and "connect-first, disconnect-first" in order.output
    delay = runner.invoke(app, ["bench", "loop", "--boot-delay", "sometimes"], env=wide)
    assert delay.exit_code == 2 and "--boot-delay" in delay.output
    folder = runner.invoke(app, ["bench", "loop", "--json", str(tmp_path / "no" / "f.json")],
                           env=wide)
    assert folder.exit_code == 2 and "no folder" in folder.output
    empty = runner.invoke(app, ["bench", "loop", "--replicas-from", str(tmp_path)], env=wide)
    assert empty.exit_code == 2 and "holds no provisioner package" in empty.output, empty.output
    mock = runner.invoke(app, ["bench", "loop", "--mock-options", "--latency soon"], env=wide)
    assert mock.exit_code == 2 and "mock-node-api: Invalid value for '--latency'" in mock.output


def _loop(tmp_path: Path, name: str, *options: str) -> dict[str, Any]:
    """Run `bench loop` with `options` and one quiet replica (1 s boots, next to no other
    users); its JSON figures."""
    from provisioner.cli import app

    out = tmp_path / f"{name}.json"
    result = CliRunner().invoke(app, [
        "bench", "loop", "--replicas", "1", "--boot-delay", "1", "--arrival-rate", "0.01",
        "--json", str(out), *options])
    assert result.exit_code == 0, result.output
    assert "user:allocated heard for the loop" in result.output
    run: dict[str, Any] = json.loads(out.read_text())
    assert run["failed"] == [] and run["problems"] == []
    return run


@pytest.mark.e2e
def test_a_loop_against_one_replica_is_served_each_time_and_moves_no_target(
        tmp_path: Path) -> None:
    run = _loop(tmp_path, "loop", "--pairs", "60", "--rate", "100", "--settle", "2")
    # one connect and its disconnect, over as long
    once = _loop(tmp_path, "once", "--pairs", "1", "--settle", "2.6")

    # one replica applies each pair once: every connect served from the warm pool, heard once
    assert run["allocated"] == {"loop-1": 60} and run["waiting"] == 0
    # every connect after the first resumes the session the last disconnect ended
    assert run["stats"]["resumed"] == 59 and run["stats"]["releases_taken_back"] == 59
    assert run["stats"]["connects"] >= 60 and run["stats"]["hits"] >= 60
    assert 0.5 <= run["seconds"] < 5
    # ... and teaches the forecast nothing more than the first: the keep window's peak is the
    # one session's (on the scripts of the release before, each connect was a new user's)
    assert once["allocated"] == {"loop-1": 1} and once["stats"]["resumed"] == 0
    assert run["target_before"] == once["target_before"] >= 1
    assert run["peak_target"] == once["peak_target"]
    assert run["peak_nodes"] >= 1 and run["peak_api_nodes"] >= 1


@pytest.mark.e2e
def test_a_user_in_a_session_dropping_and_back_keeps_being_served(tmp_path: Path) -> None:
    run = _loop(tmp_path, "loop", "--users", "3", "--pairs", "20", "--rate", "50",
                "--order", "disconnect-first", "--settle", "1")

    # each user's first connect came before the loop, and is not counted: one node a pair
    assert run["allocated"] == {"loop-1": 20, "loop-2": 20, "loop-3": 20}
    assert run["waiting"] == 0 and run["stats"]["resumed"] == 60


@pytest.mark.e2e
def test_the_replicas_run_from_the_checkout_given(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from provisioner.devstack import stack

    # A checkout whose package says, as it is imported, which process imported it.
    checkout = tmp_path / "other"
    shutil.copytree(ROOT / "provisioner", checkout / "provisioner",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "lua", checkout / "lua")
    marks = tmp_path / "imported"
    init = checkout / "provisioner" / "__init__.py"
    init.write_text(init.read_text() + (
        "\nimport os as _os, sys as _sys\n"
        "with open(_os.environ['LOOP_TEST_MARKS'], 'a') as _marks:\n"
        "    _marks.write(' '.join(_sys.argv[1:2]) + '\\n')\n"))
    monkeypatch.setenv("LOOP_TEST_MARKS", str(marks))

    with stack(replicas=2, arrival_rate=None, say=lambda _: None,
               replicas_from=checkout) as running:
        assert [c.name for c in running.children] == [
            "mock-node-api", "replica-1", "replica-2", "simulator"]
    # both replicas (`run`) imported the other checkout's package; the mock and the
    # simulator, this one's
    assert marks.read_text().split() == ["run", "run"]


@pytest.mark.e2e
def test_ctrl_c_stops_the_loop_and_the_stack_with_it() -> None:
    loop = subprocess.Popen(
        [sys.executable, "-m", "provisioner", "bench", "loop", "--pairs", "100000", "--rate",
         "10", "--replicas", "1", "--boot-delay", "1", "--arrival-rate", "0.01"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "COLUMNS": "300"})
    said = []
    assert loop.stdout is not None
    for line in loop.stdout:
        said.append(line)
        if "pairs each" in line:
            break
    server = next(line for line in said if line.startswith("private server"))
    url = server.split(" on ")[-1].strip()
    with redis.Redis.from_url(url) as client:
        assert client.ping()  # the loop runs against it

    loop.send_signal(signal.SIGINT)
    try:
        _, err = loop.communicate(timeout=60)
    finally:
        if loop.poll() is None:  # it did not stop: neither it nor its stack outlives the test
            loop.kill()
            loop.communicate()

    assert loop.returncode == 130, err
    assert "stopped by Ctrl-C, the stack with it" in err and "Traceback" not in err, err
    with pytest.raises(redis.ConnectionError), redis.Redis.from_url(url) as client:
        client.ping()


@pytest.mark.e2e
def test_with_no_settle_the_figures_still_hold_the_last_pairs(tmp_path: Path) -> None:
    from provisioner.cli import app

    out = tmp_path / "nosettle.json"
    result = CliRunner().invoke(app, [
        "bench", "loop", "--replicas", "2", "--boot-delay", "1", "--arrival-rate", "0.01",
        "--pairs", "200", "--rate", "200", "--settle", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    run = json.loads(out.read_text())
    # both replicas apply each of the 200 pairs: the last pair's too, read after --settle 0
    assert run["allocated"] == {"loop-1": 400}, run
    assert run["stats"]["connects"] == 400 and run["stats"]["releases"] == 400, run["stats"]
def test_a_replica_that_does_not_start_stops_the_run_before_the_loop(tmp_path: Path) -> None:
    from provisioner.cli import app

    # A checkout whose `run` refuses an option the stack gives it (a release before
    # `run --http-host`): each replica exits as it starts.
    checkout = tmp_path / "older"
    shutil.copytree(ROOT / "provisioner", checkout / "provisioner",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "lua", checkout / "lua")
    (checkout / "provisioner" / "__main__.py").write_text(
        "import sys\nsys.exit('No such option: --http-host')\n")
    result = CliRunner().invoke(app, [
        "bench", "loop", "--fresh", "--replicas", "1", "--boot-delay", "1", "--arrival-rate",
        "0.01", "--pairs", "5", "--settle", "0", "--replicas-from", str(checkout)],
        env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert "replica-1 exited as it started" in result.output, result.output
    assert "user:allocated heard" not in result.output


@pytest.mark.e2e
def test_a_replica_dying_during_the_loop_fails_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib
    from collections.abc import Iterator

    from provisioner.bench import loop as looping

    started = looping.stack
    held: dict[str, Any] = {}

    @contextlib.contextmanager
    def kept(*args: Any, **kwargs: Any) -> Iterator[Any]:
        with started(*args, **kwargs) as running:
            held["stack"] = running
            yield running

    def say(line: str) -> None:
        if "publishing" in line:  # the loop begins: replica-2 crashes
            victim = next(c for c in held["stack"].children if c.name == "replica-2")
            os.killpg(victim.process.pid, signal.SIGKILL)

    monkeypatch.setattr(looping, "stack", kept)
    result = looping.run(pairs=100, rate=100, fresh=True, settle=1, replicas=2,
                         boot_delay="1", arrival_rate=0.01, say=say)
    assert [line.split(";")[0] for line in result.failed] == [
        "replica-2 exited during the run (code -9)"], result.failed
