"""`provisioner dev` (`make run`): however it is stopped, no process of its stack is left."""

from __future__ import annotations

import asyncio
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


def _until_logged(tmp_path: Path, child: str, words: str) -> str:
    """What follows `words` in the dev stack's log of `child`, once it is there (20 s)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for log in tmp_path.glob(f"provisioner-stack-*/{child}.log"):
            for line in log.read_text(errors="replace").splitlines():
                if words in line:
                    return line.split(words, 1)[1].strip()
        time.sleep(0.1)
    pytest.fail(f"{child} never logged {words!r}")


def _rest_of(dev: subprocess.Popen[str], timeout_s: float) -> str:
    """What `dev` writes until it exits. Still running after `timeout_s`, it fails the test
    with every thread's stack (`provisioner` dumps them on SIGUSR1), not a bare timeout: one
    CI run's stack stopped by two Ctrl-C's hung 30 s and said nothing of where."""
    try:
        return dev.communicate(timeout=timeout_s)[0]
    except subprocess.TimeoutExpired:
        dev.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        dev.kill()
        stacks = dev.communicate(timeout=10)[0]
        pytest.fail(f"still running {timeout_s:.0f} s after it was told to stop; its "
                    f"threads:\n{stacks}")


def test_a_stuck_process_tells_its_stacks_on_sigusr1_and_goes_on(redis_url: str) -> None:
    """`kill -USR1 PID` of any `provisioner` process writes every thread's stack to its stderr
    (a replica's log), then each asyncio task's awaits (a thread's stack shows an idle loop's
    select alone: a review), and does not stop it."""
    watch = subprocess.Popen([sys.executable, "-m", "provisioner", "status", "--watch",
                              "--redis-url", redis_url], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)  # its handlers in place: the command has started
        watch.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        assert watch.poll() is None  # it goes on
        watch.send_signal(signal.SIGINT)
        _, err = watch.communicate(timeout=15)
    finally:
        if watch.poll() is None:
            watch.kill()
    assert "Current thread" in err and 'File "' in err, err
    tasks = err.split("Task ", 1)[1]  # after the threads'
    # the watch's own coroutine, whichever of its awaits (a read, its pause) it is in, or by
    # its calls if the signal came while it ran (drawing its table)
    assert ("(most recent await last):" in tasks or "(running now, most recent call last):"
            in tasks) and ", in loop\n" in tasks, err
    assert watch.returncode == 0, err


def test_the_task_the_signal_came_in_is_told_by_its_calls(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A task running when the signal came is suspended in no await: its awaits told its first
    frame alone (a clean clone's CI: the watch's signal came while it drew its table, and the
    dump did not name the watch's loop)."""
    from provisioner import cli

    async def drawing() -> None:
        cli._tasks_to_stderr(signal.SIGUSR1, sys._getframe())

    async def watching() -> None:
        await drawing()

    asyncio.run(watching())
    err = capsys.readouterr().err
    assert "(running now, most recent call last):" in err
    assert err.index(", in watching\n") < err.index(", in drawing\n"), err


def test_a_command_runs_with_stderr_closed() -> None:
    """`provisioner ... 2>&-`: sys.stderr is None, and faulthandler.register raised
    RuntimeError, so every command exited 1 saying nothing (a review)."""
    done = subprocess.run([sys.executable, "-m", "provisioner", "--help"],
                          stdout=subprocess.PIPE, text=True, timeout=60,
                          preexec_fn=lambda: os.close(2))
    assert done.returncode == 0 and "Usage" in done.stdout, done


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
        # A laptop's stack: each replica's /metrics, /healthz and /readyz on this host only
        # (they listened on every interface, as a container's must).
        for replica in ("replica-1", "replica-2"):
            assert _until_logged(tmp_path, replica, "metrics and health on").startswith(
                "http://127.0.0.1:")
        dev.send_signal(stop)
        if stop == signal.SIGINT:
            time.sleep(0.3)
            dev.send_signal(stop)  # a second Ctrl-C while it stops
        rest = _rest_of(dev, 30)  # read on: a full pipe would hold it
        if stop == signal.SIGHUP:
            # Stopped in order by the stack itself, not by the kernel's parent-death signal
            # once SIGHUP had ended it: that covered for a stack without a SIGHUP handler (a
            # mutation test).
            assert dev.returncode == 0, rest
            assert "stopped 4 processes and the private server" in rest, rest
        deadline = time.monotonic() + 10
        while stack_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stack_pids(marker) == []
    finally:
        if dev.poll() is None:
            dev.kill()
        for pid in stack_pids(marker):
            os.kill(pid, signal.SIGKILL)


def test_the_dev_stack_says_a_wrong_password_is_refused(tmp_path: Path,
                                                        wrong_password_url: str) -> None:
    """`make run` against a configured server whose password is wrong said "cannot reach
    Redis": the server answered, and refused the credentials."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PROVISIONER_DEV_TEST": str(tmp_path)}
    refused = subprocess.run([sys.executable, "-m", "provisioner", "dev", "--redis-url",
                              wrong_password_url], env=env, capture_output=True, text=True,
                             timeout=60)
    said = " ".join((refused.stdout + refused.stderr).split())
    assert refused.returncode == 1, refused
    assert "refused the credentials: invalid username-password pair" in said, said
    assert "cannot reach" not in said and ":wrong@" not in said, said
    assert "mock Node API" not in refused.stdout  # nothing was started

def test_the_dev_stack_refuses_what_it_cannot_run_before_starting_anything(
        tmp_path: Path) -> None:
    """Found by a review: with an unreachable --redis-url every process started, failed and
    exited while the view waited for ever; a bad --boot-delay took 16 s to say so, from the
    mock's log."""
    from provisioner.redis_server import free_port

    marker = f"PROVISIONER_DEV_TEST={tmp_path}"
    env = {**os.environ, "TMPDIR": str(tmp_path), "PROVISIONER_DEV_TEST": str(tmp_path)}
    gone = subprocess.run([sys.executable, "-m", "provisioner", "dev", "--redis-url",
                           f"redis://127.0.0.1:{free_port()}/0"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert gone.returncode == 1, gone
    assert "cannot reach Redis at redis://127.0.0.1:" in gone.stdout + gone.stderr, gone
    assert "mock Node API" not in gone.stdout  # nothing was started
    # Nor said to be stopped, with an empty log folder left behind (a review).
    assert "stopped 0 processes" not in gone.stdout
    assert not list(tmp_path.glob("provisioner-stack-*")), gone.stdout
    bogus = subprocess.run([sys.executable, "-m", "provisioner", "dev", "--boot-delay", "bogus"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert bogus.returncode == 2 and "--boot-delay" in bogus.stderr, bogus
    assert "private server" not in bogus.stdout
    assert stack_pids(marker) == []


def test_the_dev_view_stops_once_every_replica_has_exited(redis_url: str,
                                                          tmp_path: Path) -> None:
    import asyncio

    from provisioner.devstack import _watch

    class Exited:
        def __init__(self, name: str) -> None:
            self.name = name
            self.log_path = tmp_path / f"{name}.log"

        def alive(self) -> bool:
            return self.name == "simulator"

    children = [Exited("replica-1"), Exited("replica-2"), Exited("simulator")]
    ended = asyncio.run(_watch(redis_url, children, {"now": False}, 30.0))  # type: ignore[arg-type]
    assert ended == (f"every replica has exited; their logs: {tmp_path}/replica-1.log, "
                     f"{tmp_path}/replica-2.log")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_dev_stack_gives_its_children_the_redis_password_out_of_their_command_lines(
        redis_url: str, tmp_path: Path) -> None:
    """Found by a review: `dev --redis-url redis://:PASSWORD@...` started the mock, each
    replica and the simulator with the URL among their arguments, which every user of the
    host reads (`ps`, /proc/PID/cmdline), though messages showed it as ***."""
    import redis

    from provisioner.devstack import stack

    user, password = "devstack-test", "s3cret-of-the-stack"
    with redis.Redis.from_url(redis_url) as admin:
        admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"],
                          commands=["+@all"], keys=["*"], channels=["*"])
        try:
            parts = redis_url.split("://", 1)
            secret_url = f"{parts[0]}://{user}:{password}@{parts[1]}"
            said: list[str] = []
            with stack(secret_url, replicas=1, say=said.append) as running:
                log = running.logdir / "replica-1.log"
                deadline = time.monotonic() + 20
                while "running pool" not in (log.read_text() if log.exists() else ""):
                    assert time.monotonic() < deadline, log.read_text()
                    time.sleep(0.1)  # the replica reached the server with the password
                for child in running.children:
                    proc = Path(f"/proc/{child.process.pid}")
                    assert password not in (proc / "cmdline").read_text(), child.name
                    assert f"PROVISIONER_REDIS_URL={secret_url}" in (proc / "environ").read_text(
                        errors="replace"), child.name
            assert not [line for line in said if password in line], said
        finally:
            admin.acl_deluser(user)


def test_the_dev_stack_stops_its_server_and_every_child_with_sigterm() -> None:
    """The block's end stops every child with SIGTERM, a shutdown (SIGKILL only after a grace
    period, for one that does not stop), and its private server. Untested in the process that
    ran the stack: the end-to-end test's stack dies with its process, and the parent-death
    signal then stopped what the block left running (a mutation test: neither dropping the
    server's stop nor the children's SIGTERM failed it)."""
    import redis

    from provisioner.devstack import stack

    said: list[str] = []
    with stack(replicas=1, say=said.append) as running:
        log = running.logdir / "replica-1.log"
        deadline = time.monotonic() + 20
        while "running pool" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        children = list(running.children)
    assert [c.name for c in children] == ["mock-node-api", "replica-1", "simulator"]
    ended = {c.name: c.process.returncode for c in children}
    assert -signal.SIGKILL not in ended.values() and None not in ended.values(), ended
    with pytest.raises(redis.ConnectionError), redis.Redis.from_url(running.redis_url) as client:
        client.ping()
    assert said[-1] == (f"stopped 3 processes and the private server; logs kept in "
                        f"{running.logdir}"), said


@pytest.mark.parametrize(("options", "said"), [
    (["--mock-options", "--latency x"], "mock-node-api: Invalid value for '--latency'"),
    (["--mock-options", "--bogus 1"], "mock-node-api: No such option: --bogus"),
    (["--mock-options", "stray"], "mock-node-api: Got unexpected extra argument"),
    (["--mock-options", "'unclosed"], "cannot split \"'unclosed\": No closing quotation"),
    (["--mock-options", "--port 9"], "--port is set by the stack itself"),
    (["--mock-options", "--port=9"], "--port is set by the stack itself"),
    (["--mock-options", "--boot-delay 3"], "give --boot-delay to the stack"),
    (["--mock-options", "--help"], "`provisioner mock-node-api --help` lists the options"),
    # the CLI has no completion options; a bare Typer's check took and ran them (a review)
    (["--mock-options", "--show-completion"], "No such option: --show-completion"),
    (["--simulate-options", "--show-completion"], "No such option: --show-completion"),
    (["--simulate-options", "--redis-url redis://x/0"], "give --redis-url to the stack"),
    (["--simulate-options", "--arrival-rate 3"],
     "give --arrival-rate (synthetic traffic only) to the stack"),
    (["--simulate-options", "--trace /nonexistent.jsonl.gz"], "does not exist"),
    (["--simulate-options", "--trace {trace} --session 60"],
     "simulate: Invalid value for --session: a trace holds its own users"),
    (["--arrival-rate", "3", "--simulate-options", "--trace {trace}"],
     "Invalid value for --arrival-rate: a trace holds its own users"),
])
def test_the_dev_stack_refuses_options_its_processes_would_refuse_before_starting_anything(
        options: list[str], said: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The options `dev` passes on to the mock and the simulator are parsed by their own
    commands first: a mistake is said at once, not found in a child's log after the stack
    came up without it; one the stack sets itself (its port, its server) is refused, not
    passed on to fight the stack's."""
    from typer.testing import CliRunner

    from provisioner import devstack
    from provisioner.cli import app

    started: list[object] = []
    monkeypatch.setattr(devstack, "run_stack", lambda **kw: started.append(kw) or 0)
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"format": "provisioner-trace/1"}\n')
    args = [arg.replace("{trace}", str(trace)) for arg in options]
    result = CliRunner().invoke(app, ["dev", *args], env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    assert said in " ".join(result.output.split()), result.output
    assert started == []


def test_the_dev_stack_passes_its_options_on(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """What the stack is asked to start with: the mock's and the simulator's options as
    given, and no rate of the stack's beside a trace (the simulator would refuse one)."""
    from typer.testing import CliRunner

    from provisioner import devstack
    from provisioner.cli import app

    started: list[dict[str, object]] = []
    monkeypatch.setattr(devstack, "run_stack", lambda **kw: started.append(kw) or 0)
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"format": "provisioner-trace/1"}\n')
    runner = CliRunner()
    # An environment variable of an option the stack sets itself is not read by the process,
    # nor by the check (a review: `dev` refused to start on it).
    result = runner.invoke(app, ["dev", "--mock-options", "--latency 3 --answer-latency=6",
                                 "--simulate-options", "--session 60", "--arrival-rate", "5"],
                           env={"MOCK_NODE_API_PORT": "0"})
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["dev", "--simulate-options", f"--trace '{trace}' --speed 10"])
    assert result.exit_code == 0, result.output
    synthetic, replay = started
    assert (synthetic["mock"], synthetic["simulate"], synthetic["arrival_rate"]) == (
        ["--latency", "3", "--answer-latency=6"], ["--session", "60"], 5.0)
    assert (replay["mock"], replay["simulate"], replay["arrival_rate"]) == (
        [], ["--trace", str(trace), "--speed", "10"], None)


def test_the_stack_starts_the_mock_and_the_simulator_with_the_options_given(
        tmp_path: Path) -> None:
    """Passed on and acted on: the mock's quota of one node refuses a second create, and the
    simulator replays the trace given, with no rate of the stack's on its command line."""
    import httpx

    from provisioner.devstack import stack
    from tests.test_bench_world import write_trace

    trace = write_trace(tmp_path / "t.jsonl", [(0.5, "activity", "u1"), (1, "connect", "u1"),
                                               (1.5, "disconnect", "u1")], duration=2)
    said: list[str] = []
    with stack(replicas=1, arrival_rate=None, mock=["--max-nodes", "1", "--retry-after", "7"],
               simulate=["--trace", str(trace)], say=said.append) as running:
        assert "(--max-nodes 1 --retry-after 7)  replicas' metrics" in said[-1], said
        api = f"http://127.0.0.1:{running.api_port}/api/nodes"
        answers = [httpx.post(api, timeout=10) for _ in range(3)]
        refused = [a for a in answers if a.status_code == 429]
        assert refused and refused[0].headers.get("retry-after") == "7", answers
        simulator = next(c for c in running.children if c.name == "simulator")
        assert "--arrival-rate" not in simulator.args
        deadline = time.monotonic() + 20
        while simulator.alive():
            assert time.monotonic() < deadline, simulator.log_path.read_text()
            time.sleep(0.1)
        assert simulator.process.returncode == 0, simulator.log_path.read_text()
        assert "done" in simulator.log_path.read_text()


def test_a_port_another_mock_took_first_is_not_taken_for_the_stack_s_own(
        redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A free port is free when asked for: another stack's mock took it first, answered the
    stack's /healthz with a 200, and the stack pointed its replicas at it while its own mock
    exited on the taken port (a review). The stack tells them apart by the pid in the answer,
    and starts its own again on another port."""
    import httpx

    from provisioner import devstack
    from provisioner.redis_server import free_port
    from tests.helpers import listening

    other, taken = listening(lambda port: [
        sys.executable, "-m", "provisioner", "mock-node-api", "--port", str(port),
        "--redis-url", redis_url], "/healthz", stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        assert httpx.get(f"http://127.0.0.1:{taken}/healthz").json()["pid"] == other.pid
        ports = iter([taken])
        monkeypatch.setattr(devstack, "free_port", lambda: next(ports, None) or free_port())
        monkeypatch.setenv("TMPDIR", str(tmp_path))
        said: list[str] = []
        with devstack.stack(redis_url, replicas=0, arrival_rate=None, say=said.append,
                            simulate=["--duration", "1"]) as running:
            mock = running.children[0]
            assert running.api_port != taken and mock.alive()
            answer = httpx.get(f"http://127.0.0.1:{running.api_port}/healthz").json()
            assert answer["pid"] == mock.process.pid
        # a server it was given is not its own to stop, and the last line says none was
        assert said[-1] == f"stopped 2 processes; logs kept in {running.logdir}", said
    finally:
        other.terminate()
        other.wait()


def test_the_tests_do_not_take_another_process_s_answer_for_their_own(redis_url: str) -> None:
    """tests.helpers.listening took any 200 on the port for its process's, where the dev stack
    checks the pid; both wait through devstack.wait_http now. A process that has not bound the
    port (here a sleeper) is not answered for by the mock that has."""
    from tests.helpers import listening, wait_http

    other, taken = listening(lambda port: [
        sys.executable, "-m", "provisioner", "mock-node-api", "--port", str(port),
        "--redis-url", redis_url], "/healthz", stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert wait_http(f"http://127.0.0.1:{taken}/healthz", process=other)
        with pytest.raises(TimeoutError):
            wait_http(f"http://127.0.0.1:{taken}/healthz", timeout=1.0, process=sleeper)
    finally:
        for process in (other, sleeper):
            process.terminate()
            process.wait()


def test_the_dev_view_reads_the_pool_its_replicas_run(redis_url: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The replicas inherit PROVISIONER_POOL; the view read pool "default" whatever they ran,
    and showed an empty pool beside a working one (a review)."""
    from provisioner import devstack

    monkeypatch.setenv("PROVISIONER_POOL", "blue")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    with devstack.stack(redis_url, replicas=1, arrival_rate=None, say=lambda _: None,
                        simulate=["--duration", "1"]) as running:
        assert running.pool == "blue"
    monkeypatch.setenv("PROVISIONER_POOL", "bad name!")
    with pytest.raises(RuntimeError, match="PROVISIONER_POOL"), \
            devstack.stack(redis_url, replicas=1, say=lambda _: None):
        pass


def test_the_dev_views_reading_refused_is_not_said_out_of_reach(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a review: the dev stack's live view said "Redis unreachable: WRONGTYPE ..." of
    a server that answered and refused the reading (`status --watch` said it refused)."""
    import asyncio
    import io

    import redis
    from rich.console import Console

    from provisioner import devstack
    from provisioner.keys import PoolKeys

    keys = PoolKeys("dev-refused")
    sync = redis.Redis.from_url(redis_url)
    sync.set(keys.key("epoch"), "1-a")
    sync.set(keys.key("ready"), "edited by hand")  # a list, by the schema
    shown = io.StringIO()
    monkeypatch.setattr(devstack, "console", Console(file=shown, width=200))
    try:
        asyncio.run(devstack._watch(redis_url, [], {"now": False}, duration=0.5,
                                    pool="dev-refused"))
    finally:
        sync.delete(keys.key("epoch"), keys.key("ready"))
    first = shown.getvalue().strip().splitlines()[0]
    assert first.startswith("Redis refused: WRONGTYPE"), first
