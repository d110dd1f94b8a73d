"""Input that stopped a command with a traceback, hung it or let it run without meaning, found by
a review: each is now a clear error (exit 2), a bounded option, or handled where it happens."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.http_exceptions import LineTooLong
from typer.testing import CliRunner

from provisioner.bench.trace import TraceError, load_trace
from provisioner.cli import app, main
from provisioner.config import ServiceConfig
from provisioner.keys import PoolKeys
from provisioner.logs import MalformedRequests
from provisioner.model import FORMAT
from tests.helpers import listening
from tests.test_bench_world import write_trace


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.parametrize("args", [
    ["bench", "replay", "TRACE", "--warm-up", "100000000"],  # grew to 4 GB before a kill
    ["bench", "replay", "TRACE", "--timeline-window", "inf"],
    ["bench", "features", "TRACE", "--horizon", "inf"],
    ["bench", "bound", "TRACE", "--window", "inf"],
    ["bench", "tick-cost", "--users", "-5"],
    ["bench", "queue-cost", "--waiting", "0"],
    ["bench", "replay", "TRACE", "--redis-url", "notaurl"],
    ["mock-node-api", "--redis-url", "notaurl"],
    ["simulate", "--redis-url", "redis://127.0.0.1:notaport"],
    ["simulate", "--duration", "inf"],  # ran for ever (a review): no --duration is the way
    ["mock-node-api", "--redis-url", "redis://127.0.0.1:1/0?socket_timout=5"],  # a traceback
    ["mock-node-api", "--boot-delay", "lognormal:1:1e308"],  # left its nodes booting
    ["mock-node-api", "--host", "a" * 64 + ".example"],  # the resolver's UnicodeError
    ["mock-node-api", "--host", ""],  # listened on every interface
    ["dev", "--replicas", "0"],
    ["dev", "--arrival-rate", "nan"],
])
def test_an_option_without_meaning_is_refused(tmp_path: Path, args: list[str]) -> None:
    trace = str(write_trace(tmp_path / "t.jsonl", [(1.0, "connect", "u1")]))
    code, output = invoke(*(trace if a == "TRACE" else a for a in args))
    assert code == 2 and "Invalid value" in output, output


def test_replay_refuses_an_output_it_could_not_write_before_replaying(tmp_path: Path) -> None:
    """The missing folder was found after the whole replay, and its result lost."""
    trace = str(write_trace(tmp_path / "t.jsonl", [(1.0, "connect", "u1")]))
    for option in ("--append-to", "--misses", "--timeline", "--save-model"):
        code, output = invoke("bench", "replay", trace, option, str(tmp_path / "no" / "f.json"))
        assert code == 2 and "is not a folder" in output, (option, output)
    (tmp_path / "m.json").write_bytes(b"\xff\xfe{}")
    code, output = invoke("bench", "replay", trace, "--model", str(tmp_path / "m.json"))
    assert code == 2 and "is not UTF-8" in output, output


def test_results_that_overflow_or_nest_too_deep_are_refused(tmp_path: Path) -> None:
    row = {"trace": "t", "policy": "provisioner", "connects": int("9" * 500), "misses": 0,
           "cost_ratio": 1.2, "node_hours": 1.0, "busy_hours": 1.0}
    (tmp_path / "big.json").write_text(json.dumps([row]))
    (tmp_path / "deep.json").write_text("[" * 100_000)
    for name, message in (("big.json", "must be a finite number in [0, 1e15]"),
                          ("deep.json", "JSON nested too deep")):
        for args in (["bar", str(tmp_path / name)],
                     ["compare", str(tmp_path / name), str(tmp_path / name)]):
            code, output = invoke("bench", *args)
            assert code == 2 and message in output, (args, output)


@pytest.mark.parametrize(("line", "message"), [
    ("[" * 100_000, "t.jsonl:2: JSON nested too deep"),
    ('{"t": 1, "ch": "user:connect", "msg": {"user_id": "a b"}}', "t.jsonl:2: user_id 'a b'"),
    ('{"t": 1, "ch": "user:connect", "msg": {"user_id": ""}}', "is not an id the contract"),
    # every character allowed, the first not a letter or a digit: the rule said in full
    ('{"t": 1, "ch": "user:connect", "msg": {"user_id": "_.-:@"}}',
     "t.jsonl:2: user_id '_.-:@' is not an id .* 0-9 . _ : @ -, the first a letter or a digit"),
    # published as it was on a replay, beyond the contract's payload (a review)
    ('{"t": 1, "ch": "user:connect", "msg": {"user_id": "u1", "timestamp": 1}}',
     "t.jsonl:2: msg of user:connect has fields its payload has not: 'timestamp'"),
    ('{"t": 1, "ch": "user:activity", "msg": {"user_id": "u1", "timestamp": 1767225601, '
     '"extra": 1}}', "fields its payload has not: 'extra'"),
])
def test_a_trace_line_the_service_could_not_take_names_its_line(
        tmp_path: Path, line: str, message: str) -> None:
    """A nested line raised RecursionError; a user id the service drops failed the replay as
    the policy's fault ("broke the rules")."""
    path = write_trace(tmp_path / "t.jsonl", [])
    path.write_text(path.read_text().splitlines()[0] + "\n" + line + "\n")
    with pytest.raises(TraceError, match=message.replace("(", r"\(")):
        load_trace(path)


def test_what_the_environment_refuses_is_one_error_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    """A port in use, a server that cannot be reached: tracebacks before (the entry point
    `provisioner` is `main`; CliRunner calls the app itself)."""
    trace = str(write_trace(tmp_path / "t.jsonl", [(1.0, "connect", "u1")]))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for argv in (["mock-node-api", "--port", str(port), "--redis-url",
                      "redis://127.0.0.1:1/0"],
                     ["bench", "replay", trace, "--redis-url", f"redis://127.0.0.1:{port}"]):
            monkeypatch.setattr(sys, "argv", ["provisioner", *argv])
            with pytest.raises(SystemExit) as stopped:
                main()
            assert stopped.value.code == 2, argv
            err = " ".join(capsys.readouterr().err.split())
            assert err.startswith("error: ") and "Traceback" not in err, err


def test_the_mock_node_api_answers_a_malformed_request_with_one_line(redis_url: str) -> None:
    """A 20,000-character URL logged aiohttp's ERROR and traceback in the mock, though it
    answered 400 (a review); the mock logs as the service does now."""
    mock, port = listening(lambda port: [
        sys.executable, "-m", "provisioner", "mock-node-api", "--port", str(port),
        "--redis-url", redis_url], "/healthz", stderr=subprocess.PIPE, text=True)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
            connection.sendall(b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b" 400 " in connection.recv(100)
    finally:
        mock.terminate()
        _, err = mock.communicate(timeout=20)
    assert "malformed HTTP request answered 4" in err and "Traceback" not in err, err


def test_release_refuses_an_id_no_connect_could_have_given(redis_url: str) -> None:
    """An id of 120,000 characters took over a minute to print; none could hold a node."""
    started = time.monotonic()
    code, output = invoke("release", "a" * 120_000, "ok-user", "--redis-url", redis_url,
                          "--yes")
    assert code == 2 and "not a user id" in output and time.monotonic() - started < 10
    code, output = invoke("release", "u1", "--by", "me\nyou", "--redis-url", redis_url, "--yes")
    assert code == 2 and "--by must be" in output, output


def test_a_model_file_s_field_names_reach_the_terminal_escaped(
        tmp_path: Path, redis_url: str) -> None:
    """A field name holding a terminal's escape sequences (a window title, a colour) was
    printed raw: Rich's escape() only neutralises its own markup (a review)."""
    path = tmp_path / "m.json"
    for value in (1, "x"):  # refused by the pool's script, and by the file's own check
        path.write_text(json.dumps({"format": FORMAT,
                                    "fields": {"\x1b]0;pwned\x07\x1b[31mred": value}}))
        code, output = invoke("model", "import", str(path), "--redis-url", redis_url,
                              "--pool", "escaped", "--new-pool")
        assert code == 2 and "\x1b" not in output and "\x07" not in output, repr(output)
        assert "\\x1b]0;pwned\\x07\\x1b[31mred" in output, repr(output)


def test_a_model_with_very_many_problems_lists_the_first_fifty(
        tmp_path: Path, redis_url: str, sync_redis: redis.Redis) -> None:
    """200,000 unknown fields overflowed the script's stack ("too many results to unpack"),
    reported as 'cannot reach Redis'."""
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"format": FORMAT,
                                "fields": {f"bogus{i}": 1 for i in range(200_000)}}))
    code, output = invoke("model", "import", str(path), "--redis-url", redis_url,
                          "--pool", "many", "--new-pool")
    assert code == 2 and "refused: the model is not valid" in output, output[:300]
    assert "199950 more problems" in output and "cannot reach" not in output
    assert sync_redis.exists(PoolKeys("many").key("model")) == 0


def test_malformed_requests_log_one_line_now_and_then() -> None:
    """Each malformed request to /metrics logged an ERROR with its traceback."""
    limiter = MalformedRequests(every=10.0)

    def record(error: BaseException) -> logging.LogRecord:
        return logging.LogRecord("aiohttp.server", logging.ERROR, "", 0, "Error handling request",
                                 (), (type(error), error, None))

    first = record(LineTooLong("x" * 10, "8190"))
    assert limiter.filter(first) and first.levelno == logging.WARNING
    assert first.exc_info is None and "answered 400" in first.getMessage()
    assert not limiter.filter(record(LineTooLong("y", "8190")))
    other = record(RuntimeError("a bug in a handler"))
    assert limiter.filter(other) and other.levelno == logging.ERROR and other.exc_info


def test_replay_json_is_strict_json(tmp_path: Path) -> None:
    """A trace with no busy time printed "cost_ratio": Infinity, which JSON does not have."""
    trace = str(write_trace(tmp_path / "t.jsonl", [(1.0, "disconnect", "u1")]))
    result = CliRunner().invoke(app, ["bench", "replay", trace, "--policy", "static-1",
                                      "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout.strip().splitlines()[-1],
                        parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert scores["cost_ratio"] is None


def _a_pool_with_a_node(redis_url: str, pool: str) -> None:
    import asyncio

    import redis.asyncio as aioredis

    from provisioner.scripts import Scripts

    async def record() -> None:
        client = aioredis.Redis.from_url(redis_url)
        await Scripts(client, PoolKeys(pool)).apply_node_status(
            int(time.time() * 1000), "n1", "booting")
        await client.aclose()

    asyncio.run(record())


def test_reconcile_without_a_node_list_says_so_and_fails(redis_url: str) -> None:
    # It printed zero repairs and exited 0: nothing had been compared.
    _a_pool_with_a_node(redis_url, "no-list")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    code, output = invoke("reconcile", "--redis-url", redis_url, "--node-api-url",
                          f"http://127.0.0.1:{free}", "--pool", "no-list")
    assert code == 2 and "gave no node list" in output and "nothing was compared" in output


def test_reconcile_of_a_pool_the_server_does_not_hold_is_refused(redis_url: str) -> None:
    """Found by a review: `reconcile --pool reel` (for `real`) took every node the Node API
    ran into a new pool no replica runs, as ready, printed its counts and exited 0, and `check
    --pool reel` passed from then on. Refused before the Node API is asked."""
    _a_pool_with_a_node(redis_url, "real")
    code, output = invoke("reconcile", "--redis-url", redis_url, "--node-api-url",
                          "http://127.0.0.1:9", "--pool", "reel")
    assert code == 2 and "no pool 'reel' on this server" in output, output
    assert "nothing was compared" in output
    assert invoke("check", "--redis-url", redis_url, "--pool", "reel")[0] == 2


def _reconciled_against_an_empty_mock(redis_url: str, pool: str, node: str, age_ms: int,
                                      ready: bool = True) -> subprocess.CompletedProcess[str]:
    """`provisioner reconcile` of `pool`, which holds `node` ready (or booting), created
    `age_ms` ago, against a mock Node API that runs none."""
    import asyncio

    import redis.asyncio as aioredis

    from provisioner.scripts import Scripts

    async def plant() -> None:
        client = aioredis.Redis.from_url(redis_url)
        scripts = Scripts(client, PoolKeys(pool))
        then = int(time.time() * 1000) - age_ms
        await scripts.apply_node_status(then, node, "booting")
        if ready:
            await scripts.apply_node_status(then, node, "ready")
        await client.aclose()

    asyncio.run(plant())
    api, port = listening(lambda port: [
        sys.executable, "-m", "provisioner", "mock-node-api", "--port", str(port),
        "--redis-url", redis_url], "/healthz", stderr=subprocess.DEVNULL)
    try:
        return subprocess.run([sys.executable, "-m", "provisioner", "reconcile", "--redis-url",
                               redis_url, "--node-api-url", f"http://127.0.0.1:{port}",
                               "--pool", pool], capture_output=True, text=True, timeout=60)
    finally:
        api.terminate()
        api.wait(timeout=20)


def test_reconcile_logs_a_hostile_node_id_escaped(redis_url: str) -> None:
    """A node id another writer put in Redis with a terminal's escape sequences was logged raw
    by reconcile (Python's last-resort handler), setting the title and clearing the screen."""
    done = _reconciled_against_an_empty_mock(redis_url, "third", "n3\x1b]0;PWNED\x07\x1b[2J",
                                             3_600_000)
    assert done.returncode == 0, done
    assert "n3\\x1b]0;PWNED\\x07\\x1b[2J" in done.stderr and "\x1b" not in done.stderr, \
        repr(done.stderr)


def test_run_names_every_bad_setting_of_the_service_and_the_pool_at_once() -> None:
    # It named the service's alone, and a second start found the pool's.
    code, output = invoke("run", "--redis-url", "redis://127.0.0.1:1/0", "--node-api-url",
                          "http://api", "--idle-timeout", "nan", "--log-level", "loud")
    assert code == 2 and "--idle-timeout" in output and "--log-level" in output, output


def test_run_refuses_a_create_timeout_a_create_call_can_outlast() -> None:
    """Found by a review: with --create-timeout under the Node API call's longest, a create's
    reservation lapses while its POST may still make the node, and the pool makes it again."""
    code, output = invoke("run", "--redis-url", "redis://127.0.0.1:1/0", "--node-api-url",
                          "http://api", "--create-timeout", "30", "--api-timeout", "10")
    said = ("--create-timeout (PROVISIONER_CREATE_TIMEOUT) must be at least 5 s longer than "
            "a create's longest call to the Node API, 30.6 s (3 tries of --api-timeout, 10 s, "
            "and the pauses between them): got 30")
    assert code == 2 and said in output, output
    # Just over the call's longest, every create was withdrawn for want of time (a review);
    # exactly 5 s over the digits said is taken (23.700000000000003 + 5 refused 28.7).
    for api_timeout, timeout, refused in (("10", "35.5", True), ("10", "35.6", False),
                                          ("7.7", "28.7", False), ("7.7", "28.699", True)):
        code, output = invoke("run", "--redis-url", "redis://127.0.0.1:1/0", "--node-api-url",
                              "http://api", "--api-timeout", api_timeout, "--create-timeout",
                              timeout, "--http-port", "0")
        assert ("--create-timeout (PROVISIONER_CREATE_TIMEOUT) must be" in output) is refused, \
            (timeout, output)
    # The defaults (60 s against 30.6 s) start, as far as the settings go: the next error is
    # the server's.
    code, output = invoke("run", "--redis-url", "redis://127.0.0.1:1/0", "--node-api-url",
                          "http://api", "--http-port", "0")
    assert "--create-timeout" not in output, output
    # Named with every other problem at once (a review: only once the others were fixed).
    code, output = invoke("run", "--redis-url", "redis://127.0.0.1:1/0", "--node-api-url",
                          "ftp://api", "--create-timeout", "30", "--max-nodes", "0")
    assert code == 2 and "--create-timeout (PROVISIONER_CREATE_TIMEOUT) must be at least" in \
        output, output
    assert "--max-nodes (PROVISIONER_MAX_NODES) must be in" in output, output
    assert "must start with http(s)://" in output, output


RUN = ("run", "--redis-url", "redis://127.0.0.1:1/0", "--node-api-url", "http://api")


#: An option of run out of its range, what is said of it, and the names it must not be said by.
BAD_OPTIONS = [
    (["--idle-timeout", "999999"],
     "--idle-timeout (PROVISIONER_IDLE_TIMEOUT) must be in [0, 86400] s: got 999999",
     ["idle_timeout_s"]),
    (["--learning-half-life", "5"],
     "--learning-half-life (PROVISIONER_LEARNING_HALF_LIFE) must be in [10, 2592000] s: got 5",
     ["learning_half_life_s"]),
    (["--boot-timeout", "nan"],
     "--boot-timeout (PROVISIONER_BOOT_TIMEOUT) must be in [0.001, 86400] s: got nan",
     ["boot_timeout_s"]),
    (["--min-ready", "60"],
     "--min-ready (PROVISIONER_MIN_READY) must not exceed --max-nodes (50): got 60",
     ["min_ready", "max_nodes"]),
    (["--engaged-threshold", "500"],  # its bound is a setting no option of run sets: its value
     "--engaged-threshold (PROVISIONER_ENGAGED_THRESHOLD) must be in [1, 100]: got 500",
     ["engaged_threshold", "max_events_per_user"]),
    (["--scaling-policy", "magic"],
     "--scaling-policy (PROVISIONER_SCALING_POLICY) must be forecast or heuristic: got 'magic'",
     ["scaling_policy"]),
    (["--api-timeout", "0"],
     "--api-timeout (PROVISIONER_API_TIMEOUT) must be in (0, 600] s: got 0",
     ["api_timeout_s", "api timeout"]),
    (["--http-host", "http://0.0.0.0"],  # an address, not a URL
     "--http-host (PROVISIONER_HTTP_HOST) must be an address or a host name (0.0.0.0: every "
     "interface; an IPv6 address without brackets, ::1; no port, --http-port is): got "
     "'http://0.0.0.0'",
     ["http_host", "http host"]),
    # Found by a review: these passed, then failed where the replica came to listen, after it
    # reached Redis: a name with a label over 63 characters or an empty one (a..b) with a
    # traceback (UnicodeError from the idna codec), a bracketed IPv6 address or an address
    # with a port as "cannot run: [Errno -2] Name or service not known", naming no option.
    (["--http-host", "a" * 64 + ".example"],
     "--http-host (PROVISIONER_HTTP_HOST) must be an address or a host name", ["http_host"]),
    (["--http-host", "a..b"],
     "--http-host (PROVISIONER_HTTP_HOST) must be an address or a host name", ["http_host"]),
    (["--http-host", "[::1]"],
     "--http-host (PROVISIONER_HTTP_HOST) must be an address or a host name", ["http_host"]),
    (["--http-host", "0.0.0.0:9100"],
     "--http-host (PROVISIONER_HTTP_HOST) must be an address or a host name", ["http_host"]),
    (["--log-level", "loud"],  # as typed, not as run upper-cases it
     "--log-level (PROVISIONER_LOG_LEVEL) must be one of DEBUG, INFO, WARNING, ERROR: got 'loud'",
     ["log_level", "log level"]),
]


@pytest.mark.parametrize(("args", "said", "fields"), BAD_OPTIONS,
                         ids=[args[0] for args, _, _ in BAD_OPTIONS])
def test_run_names_a_bad_setting_by_its_option_not_its_field(
        args: list[str], said: str, fields: list[str]) -> None:
    """`run --idle-timeout 999999` said "idle_timeout_s must be in [0, 86400]": the name of a
    field the user never typed, without the unit or the value."""
    code, output = invoke(*RUN, *args)
    assert code == 2 and said in output, output
    assert not [field for field in fields if field in output], output


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1", "::", "::1", "fe80::1%lo",
                                  "localhost", "metrics.example.", "xn--hllo-bpa.example"])
def test_an_http_host_the_server_can_listen_on_is_taken(host: str) -> None:
    assert ServiceConfig("redis://h/0", "http://api", http_host=host).check() == []


def test_run_names_the_env_var_a_bad_setting_came_from() -> None:
    """A setting from the environment (a container's manifest) was named by its field alone."""
    result = CliRunner().invoke(app, list(RUN), env={"COLUMNS": "300",
                                                     "PROVISIONER_IDLE_TIMEOUT": "999999"})
    output = " ".join(result.output.split())
    assert result.exit_code == 2, output
    assert ("--idle-timeout (PROVISIONER_IDLE_TIMEOUT) must be in [0, 86400] s: got 999999"
            in output and "idle_timeout_s" not in output), output


def test_a_setting_typed_by_its_field_name_is_still_named_by_it(tmp_path: Path) -> None:
    """`bench --set` takes the field's name: its message keeps it, where run's names the
    option (the one range checks both)."""
    trace = str(write_trace(tmp_path / "t.jsonl", [(1.0, "connect", "u1")]))
    code, output = invoke("bench", "replay", trace, "--set", "idle_timeout_s=999999")
    assert code == 2 and "idle_timeout_s must be in [0, 86400]" in output, output
    code, output = invoke(*RUN, "--idle-timeout", "999999")
    assert code == 2 and "--idle-timeout (PROVISIONER_IDLE_TIMEOUT) must be in [0, 86400] s" \
        in output and "idle_timeout_s" not in output, output


def test_reconcile_names_a_bad_pool_by_its_option() -> None:
    code, output = invoke("reconcile", "--redis-url", "redis://127.0.0.1:1/0",
                          "--node-api-url", "http://api", "--pool", "a b")
    assert code == 2 and ("--pool (PROVISIONER_POOL) must be 1-64 characters of letters, "
                          "digits, _.-: got 'a b'") in output, output


def test_every_option_of_run_sets_a_setting_in_its_own_unit() -> None:
    """Which setting each option of run sets is read from the options (their name, or their
    name and `_s`): every option sets one, and one in seconds is given in seconds."""
    import typer.main

    from provisioner.cli import _options_of
    from provisioner.config import PoolConfig, ServiceConfig

    command = typer.main.get_command(app).get_command(None, "run")  # type: ignore[attr-defined]
    ctx = command.make_context("run", list(RUN[1:]))
    options = _options_of(ctx, ServiceConfig, PoolConfig)
    assert len(options) == len(command.params), options
    for field, option in options.items():
        help_text = next(p.help for p in command.params if p.name == option.name) or ""
        assert field.endswith("_s") == ("second" in help_text.lower()), (field, help_text)


def test_every_option_of_run_is_read_from_the_env_var_of_its_name() -> None:
    """The README promises every option of run an environment variable, PROVISIONER_ and the
    option's name (`--idle-timeout`, PROVISIONER_IDLE_TIMEOUT): a manifest sets them by that
    rule. A misspelt envvar= was read by no test but for the few options set through the
    environment (a mutation test: PROVISIONER_TICK_INTERVAL renamed passed)."""
    import typer.main

    command = typer.main.get_command(app).get_command(None, "run")  # type: ignore[attr-defined]
    named = {param.name: param.envvar for param in command.params}
    assert named == {name: f"PROVISIONER_{name.upper()}" for name in named}


def test_an_error_goes_to_stderr_not_into_what_stdout_carries() -> None:
    """Found by a review: `status --json` against an unreachable server printed its error on
    stdout, which is what `| jq` reads."""
    proc = subprocess.run(
        [sys.executable, "-m", "provisioner", "status", "--json",
         "--redis-url", "redis://127.0.0.1:1/0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == "" and "cannot reach Redis" in proc.stderr, (proc.stdout, proc.stderr)


def test_check_of_a_pool_the_server_does_not_hold_fails_and_status_warns(
        redis_url: str) -> None:
    """Found by a review: `check --pool` with a misspelt name said every invariant holds, so
    a monitoring script with a typo reported healthy for ever."""
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "provisioner", *args, "--redis-url",
                               redis_url], capture_output=True, text=True, timeout=60)

    missing = run("check", "--pool", "defualt")
    assert missing.returncode == 2, missing
    assert "no pool 'defualt' on this server" in missing.stderr, missing.stderr
    shown = run("status", "--pool", "defualt", "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["pool"] == "defualt"
    assert "no pool 'defualt' on this server yet" in shown.stderr, shown.stderr
    # A newcomer's walkthrough: `nodes` and `users` printed an empty table, exit 0, and
    # nothing else, read as a pool with no node; they warn as `status` does.
    for table in ("nodes", "users"):
        listed = run(table, "--pool", "defualt", "--json")
        assert listed.returncode == 0 and json.loads(listed.stdout) is not None, listed
        assert "no pool 'defualt' on this server yet" in listed.stderr, listed.stderr
    # A pool that has seen one event is checked as ever.
    with redis.Redis.from_url(redis_url) as client:
        client.hset(PoolKeys("seen").key("stats"), "activities", 1)
    seen = run("check", "--pool", "seen")
    assert seen.returncode == 0 and "every invariant holds" in seen.stdout, seen


@pytest.mark.parametrize("command", [["drain", "n1", "--yes"], ["release", "u1", "--yes"],
                                     ["replace", "--yes"]])
def test_a_writing_command_on_a_pool_the_server_does_not_hold_says_so(
        redis_url: str, command: list[str]) -> None:
    """An operator's walkthrough: `drain` and `release` with a misspelt --pool said only
    "n1: unknown to the pool" or "u1: holds nothing" (exit 1), as of a healthy pool."""
    with redis.Redis.from_url(redis_url) as client:
        client.hset(PoolKeys("default").key("stats"), "activities", 1)
    done = subprocess.run([sys.executable, "-m", "provisioner", *command, "--pool", "defualt",
                           "--by", "ops", "--redis-url", redis_url],
                          capture_output=True, text=True, timeout=60)
    said = " ".join(done.stderr.split())
    assert done.returncode == 2, done
    assert "no pool 'defualt' on this server" in said and "nothing was changed" in said, said
    with redis.Redis.from_url(redis_url) as client:
        assert not client.keys(PoolKeys("defualt").base + "*")


@pytest.mark.parametrize("url", ["redis://h:6379/0", "redis://h/", "redis://h", "redis://u:p@h/2",
                                 "rediss://h/3", "redis://h/%31", "redis://h/x?db=3",
                                 "unix:///tmp/r.sock?db=2"])
def test_a_redis_url_the_client_reads_a_database_from_is_taken(url: str) -> None:
    # The check for a database that is not a number reads it as the client does (a review:
    # /%31 is database 1, and ?db= wins over the path).
    from provisioner.config import redis_url_problem

    assert redis_url_problem(url) is None


def test_a_watch_whose_reader_stops_ends_quietly(redis_url: str) -> None:
    """Found by a review: `status --watch --json | head -n 1` ended with "cannot reach Redis at
    ...: Broken pipe", exit 2: the closed pipe was taken for the server."""
    _a_pool_with_a_node(redis_url, "watched")
    watch = subprocess.Popen([sys.executable, "-m", "provisioner", "status", "--watch",
                              "--json", "--redis-url", redis_url, "--pool", "watched"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert watch.stdout is not None and watch.stderr is not None
    assert json.loads(watch.stdout.readline())["pool"] == "watched"
    watch.stdout.close()  # what `head -n 1` does after its line
    try:
        code = watch.wait(timeout=30)
    finally:
        watch.kill()
    said = watch.stderr.read().decode()
    assert code == 1 and said == "", said


def test_run_says_the_default_replica_id_it_refused_not_an_empty_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --replica-id, run checks HOSTNAME-PID: a pod's hostname at Kubernetes' 63
    characters makes it 65 with PID 1, refused. The message said the value given was '', which
    sends the operator looking for an empty PROVISIONER_REPLICA_ID nobody set (a review)."""
    long_id = "h" * 63 + "-1"
    monkeypatch.setattr("provisioner.cli.default_replica_id", lambda: long_id)
    code, output = invoke(*RUN)
    assert code == 2, output
    assert "--replica-id (PROVISIONER_REPLICA_ID) must be 1-64 characters without ':'" in output, \
        output
    # the id checked, cut short as a long value is
    assert "got '' (the default: 'hhhh" in output and "(65 characters)" in output, output


def test_run_says_the_create_call_it_compared_to_the_digits_it_compared() -> None:
    """The longest create call and --api-timeout were said to 6 digits (`:g`) beside the create
    timeout in full: a create timeout refused as shorter was shown longer than the bound said
    (a review)."""
    code, output = invoke(*RUN, "--api-timeout", "123.4567", "--create-timeout", "370.97005")
    assert code == 2, output
    assert ("longest call to the Node API, 370.9701 s (3 tries of --api-timeout, 123.4567 s, "
            "and the pauses between them): got 370.97005") in output, output


#: Arguments of run, and the settings 2a08ac9's hand-written constructors built from them
#: (only those not at their defaults; replica_id "" is the default id, log_level upper-cased).
RUN_BUILDS = [
    ([], {}, {"replica_id": None}, {}),
    (["--replica-id", "", "--log-level", "debug", "--min-ready", "3", "--max-nodes", "7",
      "--idle-timeout", "5", "--scaling-policy", "heuristic", "--keep-window", "0",
      "--http-port", "0", "--api-timeout", "2.5", "--create-timeout", "14",
      "--learning-half-life", "10", "--boot-prior", "1"], {},
     {"replica_id": None, "log_level": "DEBUG", "http_port": 0, "api_timeout_s": 2.5},
     {"min_ready": 3, "max_nodes": 7, "idle_timeout_s": 5.0, "scaling_policy": "heuristic",
      "keep_window_s": 0.0, "create_timeout_s": 14.0, "learning_half_life_s": 10.0,
      "boot_prior_s": 1.0}),
    ([], {"PROVISIONER_BOOT_TIMEOUT": "42", "PROVISIONER_MAX_BATCH": "7",
          "PROVISIONER_LOG_LEVEL": "warning", "PROVISIONER_REPLICA_ID": "r9",
          "PROVISIONER_ESTIMATION_ERROR": "4", "PROVISIONER_LOG_FORMAT": "json",
          "PROVISIONER_HEARTBEAT_INTERVAL": "0", "PROVISIONER_RECONCILE_INTERVAL": "1",
          "PROVISIONER_MAX_EVENT_LAG": "3600", "PROVISIONER_POOL": "p1"},
     {"replica_id": "r9", "log_level": "WARNING", "log_format": "json", "pool": "p1",
      "heartbeat_interval_s": 0.0, "reconcile_interval_s": 1.0, "max_event_lag_s": 3600.0},
     {"boot_timeout_s": 42.0, "max_batch": 7, "estimation_error": 4.0}),
]


@pytest.mark.parametrize(("args", "env", "service_set", "pool_set"), RUN_BUILDS)
def test_run_builds_the_settings_the_release_before_built(
        monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str],
        service_set: dict[str, Any], pool_set: dict[str, Any]) -> None:
    """run builds its settings from its options by their names: each reaches the field the
    hand-written constructor set, with the same value and type (flags and env vars)."""
    import dataclasses

    import provisioner.service
    from provisioner.config import PoolConfig, ServiceConfig, default_replica_id

    built: list[tuple[ServiceConfig, PoolConfig]] = []

    async def serve(service: ServiceConfig, pool: PoolConfig) -> None:
        built.append((service, pool))

    monkeypatch.setattr(provisioner.service, "serve", serve)
    result = CliRunner().invoke(app, [*RUN, *args], env={"COLUMNS": "300", **env})
    assert result.exit_code == 0 and len(built) == 1, result.output
    expected_service = ServiceConfig("redis://127.0.0.1:1/0", "http://api", **{
        **service_set, "replica_id": service_set["replica_id"] or default_replica_id()})
    expected: tuple[Any, Any] = (expected_service, PoolConfig(**pool_set))
    for want, got in zip(expected, built[0], strict=True):
        for field in dataclasses.fields(want):
            pair = getattr(got, field.name), getattr(want, field.name)
            assert pair[0] == pair[1] and type(pair[0]) is type(pair[1]), (field.name, pair)


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
    ("rediss://alice:s3cret@h/2", "rediss://alice:***@h/2"),
    ("redis://h/0?password=s3cret&db=1", "redis://h/0?password=***&db=1"),
    ("http://bob:s3cret@api:8080/", "http://bob:***@api:8080/"),
    ("redis://:p@ss@word@h/0", "redis://:***@h/0"),  # an unescaped @ in the password
    ("redis://h:6379/0", "redis://h:6379/0"),  # nothing to hide
    ("redis://alice@h/0", "redis://alice@h/0"),
    ("not a url: s3cret", "not a url: s3cret"),
    ("redis://[::1:s3cret@h/0", "redis://[:***@h/0"),  # one urllib cannot parse
    # The client reads the query's names unquoted, as parse_qs does: a review found these shown
    ("redis://h/0?pass%77ord=s3cret", "redis://h/0?pass%77ord=***"),
    ("unix:///tmp/r.sock?db=1&%70assword=s3cret", "unix:///tmp/r.sock?db=1&%70assword=***"),
    ("unix:///tmp/a&password=b.sock", "unix:///tmp/a&password=b.sock"),  # a path: no query
    # Only the client's options that are no secret show their values: a misspelt password's
    # name, which the client refuses naming it, showed the password whole, and so would a
    # Node API's token
    ("redis://h/0?pasword=s3cret", "redis://h/0?pasword=***"),
    ("http://api:8080/?token=s3cret&x", "http://api:8080/?token=***&***"),
    # An item with no '=' is all value: a secret pasted in was shown whole
    ("redis://h/0?s3cret", "redis://h/0?***"),
    ("http://api:8080/?a=1;s3cret#top", "http://api:8080/?a=***;***#top"),
    ("redis://h/0?db=1&protocol", "redis://h/0?db=1&protocol"),  # an option's name alone
    ("redis://h/0?socket_timeout=5&DB=1&protocol=3", "redis://h/0?socket_timeout=5&DB=1&protocol=3"),
    # ... and those it takes as text that are no secret either: a later review found "cannot
    # reach Redis at rediss://h/0?ssl_ca_certs=***: ... No such file or directory", naming no
    # file, and "invalid username-password pair" for a user shown as ***; a key's password stays
    ("rediss://h/0?ssl_ca_certs=/etc/ca.pem&ssl_certfile=c.pem&ssl_keyfile=k.pem&ssl_password=s3",
     "rediss://h/0?ssl_ca_certs=/etc/ca.pem&ssl_certfile=c.pem&ssl_keyfile=k.pem&ssl_password=***"),
    ("redis://h/0?username=alice&password=s3cret", "redis://h/0?username=alice&password=***"),
    # A ';' parts options as an '&' does, as Python's parse_qs did before 3.9.2: the client
    # reads `1;password=s3cret` as the db's value and refuses it, and it was shown whole
    ("redis://h/0?db=1;password=s3cret", "redis://h/0?db=1;password=***"),
    ("redis://h/0?client_name=x;token=s3cret&db=1", "redis://h/0?client_name=x;token=***&db=1"),
    # A password with a '/', '?' or '#' not percent-encoded (a base64 one): the clients end the
    # authority there and read the password's start as a port; it was shown whole, and the
    # client's "Port could not be cast to integer value as 's3cret'" said it again
    ("redis://:s3cret/x@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://alice:s3/cr?et#x@h/0?db=1", "redis://alice:***@h/0?db=1"),
    ("http://bob:s3cret#x@api:8080/", "http://bob:***@api:8080/"),
    # ... but an '@' after a port the client reads is no password's
    ("redis://h:6379/0?client_name=a@b", "redis://h:6379/0?client_name=a@b"),
    ("redis://[::1]:6379/0?client_name=a@b", "redis://[::1]:6379/0?client_name=a@b"),
])
def test_a_url_is_shown_without_its_password(url: str, shown: str) -> None:
    from provisioner.config import shown_url

    assert shown_url(url) == shown


@pytest.mark.parametrize("args", [
    ["run", "--redis-url", "redis://:s3cret@127.0.0.1:1/zz", "--node-api-url", "http://x"],
    ["run", "--redis-url", "redis://127.0.0.1:1/0", "--node-api-url", "http://u:s3cret@:8080"],
    ["status", "--redis-url", "redis://:s3cret@127.0.0.1:1/0"],
    ["status", "--redis-url", "redis://127.0.0.1:1/0?password=s3cret"],
    ["status", "--redis-url", "redis://127.0.0.1:1/0?pass%77ord=s3cret"],
    ["status", "--redis-url", "redis://127.0.0.1:1/0?pasword=s3cret"],
    ["status", "--redis-url", "redis://127.0.0.1:1/0?db=1;password=s3cret"],
    ["check", "--redis-url", "redis://:s3cret@127.0.0.1:1/zz"],
    ["status", "--redis-url", "redis://:s3cret/x@127.0.0.1:1/0"],
    ["run", "--redis-url", "redis://u:s3cret#x@127.0.0.1:1/0", "--node-api-url", "http://x"],
    ["run", "--redis-url", "redis://127.0.0.1:1/0", "--node-api-url", "http://u:s3cret/x@api:1"],
    ["reconcile", "--redis-url", "REDIS", "--node-api-url", "http://u:s3cret@127.0.0.1:1"],
])
def test_a_command_that_names_a_url_does_not_show_its_password(args: list[str],
                                                               redis_url: str) -> None:
    """An operator's terminal and logs kept the Redis or Node API password a message quoted
    ("cannot reach Redis at redis://:s3cret@…", "got 'redis://:s3cret@…'")."""
    if "REDIS" in args:  # a pool to reconcile, against a Node API that does not answer
        with redis.Redis.from_url(redis_url) as client:
            client.hset(PoolKeys("default").key("stats"), "activities", 1)
    code, output = invoke(*[redis_url if arg == "REDIS" else arg for arg in args])
    assert code != 0, output
    assert "s3cret" not in output, output
    assert "***" in output, output


def test_run_names_the_http_host_it_cannot_listen_on(redis_url: str) -> None:
    """Found by a review: a --http-host the resolver does not know stopped the replica with
    "cannot run: [Errno -2] Name or service not known", naming neither the option nor the
    name."""
    code, output = invoke("run", "--redis-url", redis_url, "--node-api-url", "http://api",
                          "--http-host", "no-such-host.invalid", "--http-port", "9")
    assert code == 2, output
    assert "cannot run" in output and "no-such-host.invalid" in output, output
    assert "--http-host" in output, output


@pytest.mark.parametrize("command", [
    ["run", "--node-api-url", "http://127.0.0.1:1"],
    ["simulate"],
])
def test_a_server_that_cannot_be_reached_is_named_as_the_cli_s_commands_name_it(
        command: list[str]) -> None:
    """A helper's audit: `run` said "cannot run: Error 111 connecting to …" and `simulate`
    "ConnectionError: Error 111 …", neither naming the server as `status` does."""
    code, output = invoke(*command, "--redis-url", "redis://:s3cret@127.0.0.1:1/0")
    assert code == 2, output
    assert "cannot reach Redis at redis://:***@127.0.0.1:1/0" in " ".join(output.split()), output


@pytest.mark.parametrize("bench", ["replay", "suite"])
def test_a_bench_command_names_the_server_it_was_given_and_could_not_use(
        bench: str, tmp_path: Path, wrong_password_url: str) -> None:
    """Found by a review: `bench replay --redis-url` said "error: AuthenticationError: invalid
    username-password pair", and "ConnectionError: Error 111 …" of a server out of reach,
    naming neither the server nor what it refused, as every other command does."""
    trace = write_trace(tmp_path / "t.jsonl.gz", [(1.0, "connect", "u1")])
    for url, said in [
        ("redis://:s3cret@127.0.0.1:1/0", "cannot reach Redis at redis://:***@127.0.0.1:1/0"),
        (wrong_password_url, f"Redis at {wrong_password_url.replace(':wrong@', ':***@')} "
                             "refused the credentials: invalid username-password pair"),
    ]:
        code, output = invoke("bench", bench, str(trace if bench == "replay" else tmp_path),
                              "--redis-url", url)
        assert code == 2, output
        assert f"error: {said}" in output, output
        assert "s3cret" not in output and ":wrong@" not in output, output


def test_reconcile_says_which_nodes_it_left_as_too_young_to_judge(redis_url: str) -> None:
    """A helper's audit: right after a restart of the Node API, which knows no node, `reconcile`
    printed no repair and exit 0 while the pool still held its nodes: each younger than the
    create timeout, left in case its create was on its way. It says so now."""
    done = _reconciled_against_an_empty_mock(redis_url, "young", "n1", 5_000, ready=False)
    assert done.returncode == 0, done
    assert json.loads(done.stdout)["not_listed_left_young"] == 1, done.stdout
    assert ("1 node(s) the Node API does not list were left, as younger than the pool's create "
            "timeout (60s: a create perhaps still on its way)") in " ".join(done.stderr.split())


def test_run_refused_by_redis_at_start_says_so_without_a_traceback(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reached, and refused (a database the server does not have), or an OSError of the
    host's that is no listener's (a file it may not open): one error line and exit 2, which
    an orchestrator shows and restarts on, not a traceback that buries the reason."""
    database_99 = redis_url.rsplit("/", 1)[0] + "/99"
    code, output = invoke("run", "--redis-url", database_99, "--node-api-url",
                          "http://127.0.0.1:1", "--http-port", "0")
    assert code == 2, output
    assert "error: cannot run: " in output and "DB index is out of range" in output, output
    assert "Traceback" not in output, output

    async def refused(*args: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("provisioner.service.serve", refused)
    code, output = invoke("run", "--redis-url", redis_url, "--node-api-url", "http://api")
    assert code == 2, output
    assert "error: cannot run: [Errno 13] Permission denied" in output, output


def test_run_refused_by_redis_at_start_names_the_server_that_refused(redis_url: str) -> None:
    """Beside the Node API's URL, a bare "DB index is out of range" leaves the operator to
    guess which server refused, and which setting to fix; every other command says "Redis
    at redis://…/99 refused: …"."""
    database_99 = redis_url.rsplit("/", 1)[0] + "/99"
    code, output = invoke("run", "--redis-url", database_99, "--node-api-url",
                          "http://127.0.0.1:1", "--http-port", "0")
    assert code == 2, output
    assert f"Redis at {database_99} refused: DB index is out of range" in output, output


@pytest.mark.parametrize("command", [["status"], ["check"], ["nodes"]])
def test_an_empty_redis_url_is_named_a_bad_url_not_a_server_out_of_reach(
        command: list[str]) -> None:
    """`--redis-url ""` (PROVISIONER_REDIS_URL set empty by a template) passes the option's
    check, which skips an empty value; the client then refuses it. Said as a bad URL, exit 2:
    not "cannot reach Redis", which sends the operator to the network."""
    code, output = invoke(*command, "--redis-url", "")
    assert code == 2, output
    assert "error: bad Redis URL '': Redis URL must specify one of the following schemes" in (
        output), output
    assert "cannot reach" not in output, output


#: A command of each kind that connects to Redis: the service, the CLI's reads, its checks,
#: the simulator.
COMMANDS_ON_REDIS = [
    ["run", "--node-api-url", "http://127.0.0.1:1", "--http-port", "0"],
    ["status"],
    ["check"],
    ["simulate"],
]


@pytest.mark.parametrize("command", COMMANDS_ON_REDIS)
def test_a_wrong_password_is_said_as_refused_not_as_a_server_out_of_reach(
        command: list[str], wrong_password_url: str) -> None:
    """redis-py files WRONGPASS as a connection error, and every command said "cannot reach
    Redis at …: invalid username-password pair": the reason was there, but the words sent the
    operator to the network before the secret."""
    code, output = invoke(*command, "--redis-url", wrong_password_url)
    said = " ".join(output.split())
    assert code == 2, output
    shown = wrong_password_url.replace(":wrong@", ":***@")
    assert (f"Redis at {shown} refused the credentials: invalid username-password pair"
            in said), output
    assert "cannot reach" not in said and ":wrong@" not in said, output


@pytest.mark.parametrize("command", COMMANDS_ON_REDIS)
def test_a_server_at_its_maxclients_is_said_to_refuse_not_to_be_out_of_reach(
        command: list[str], full_redis_url: str) -> None:
    """Found by a review: redis-py files "max number of clients reached" as a connection
    error, and every command said "cannot reach Redis" of a server that answered."""
    code, output = invoke(*command, "--redis-url", full_redis_url)
    said = " ".join(output.split())
    assert code == 2, output
    assert (f"Redis at {full_redis_url} refused the connection: max number of clients "
            "reached" in said), output
    assert "cannot reach" not in said, output


@pytest.mark.parametrize("command", [["status"], ["check"], ["simulate"]])
def test_a_server_that_asks_for_a_password_the_url_lacks_says_so(
        command: list[str], password_redis_url: str) -> None:
    """Found by a review: a URL with no credentials to a server that asks for them was said to
    have its credentials refused, which sent the operator to a password that was right."""
    code, output = invoke(*command, "--redis-url", password_redis_url)
    said = " ".join(output.split())
    assert code == 2, output
    assert (f"Redis at {password_redis_url} asks for credentials, and the URL gives none"
            in said), output
    assert "refused the credentials" not in said and "cannot reach" not in said, output


def test_a_server_still_loading_is_said_to_have_answered() -> None:
    """redis-py files LOADING as a connection error (a review saw `check` say "cannot reach
    Redis at ...: Redis is loading the dataset in memory" of a server loading 200 MB)."""
    from redis.exceptions import BusyLoadingError

    from provisioner.config import redis_refused, redis_trouble

    exc = BusyLoadingError("Redis is loading the dataset in memory")
    said = redis_trouble("redis://:s3cret@h:6379/0", exc)
    assert said == ("Redis at redis://:***@h:6379/0 answered, and is still loading its data: "
                    "Redis is loading the dataset in memory"), said
    assert redis_refused(exc)


def test_a_server_that_does_not_answer_in_time_is_not_said_out_of_reach(
        redis_url: str) -> None:
    """An operator's walkthrough: against a paused server (CLIENT PAUSE) the CLI said "cannot
    reach Redis at ...: Timeout reading from ...", which sends one to the network alone."""
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from provisioner.config import redis_trouble

    with redis.Redis.from_url(redis_url) as client:
        client.client_pause(3000, all=True)  # over by itself (the next test's flush waits)
    with pytest.raises(RedisTimeoutError) as raised, redis.Redis.from_url(
            redis_url, socket_timeout=0.2) as paused:
        paused.ping()
    said = redis_trouble(redis_url, raised.value)
    assert said.startswith(f"Redis at {redis_url} took the connection and did not answer in "
                           "time: Timeout reading"), said
    assert "a server paused or stalled" in said, said
    late = redis_trouble(redis_url, RedisTimeoutError("Timeout connecting to server"))
    assert late == f"cannot reach Redis at {redis_url}: Timeout connecting to server", late


@pytest.mark.parametrize(("denied", "command"), [
    (["-xadd"], ["drain", "n1", "--yes", "--by", "op"]),  # marked, then XADD refused
    (["resetchannels", "&node:*"], ["drain", "n1", "--now", "--yes", "--by", "op"]),
    (["resetchannels", "&node:*"], ["release", "u1", "--yes", "--by", "op"]),
])
def test_a_user_the_scripts_commands_are_refused_changes_nothing(
        redis_url: str, denied: list[str], command: list[str]) -> None:
    """Redis undoes nothing a script wrote before a command it refused: an operator's ACL user
    without XADD (the decisions stream) or without PUBLISH on user:* (README: "an ACL that
    lets only the product's publishers write the pool's channels") drained a node half way,
    its user waiting while nodes were ready and the node in no state's structure, while the
    command said "refused", exit 2 (a review). The command refuses such a user first."""
    pool = f"acl-{len(denied)}-{command[0]}-{command[-3]}"
    keys = PoolKeys(pool)
    _two_sessions(redis_url, keys, "u3")  # u3 waits
    with redis.Redis.from_url(redis_url) as plain, _acl_user(redis_url, f"op-{pool}",
                                                              *denied) as url:
        before = {k: plain.dump(k) for k in plain.scan_iter(match=keys.pattern())}
        result = CliRunner().invoke(app, [*command, "--redis-url", url, "--pool", pool],
                                    env={"COLUMNS": "300"})
        after = {k: plain.dump(k) for k in plain.scan_iter(match=keys.pattern())}
    assert after == before, sorted(k for k in {*before, *after} if after.get(k) != before.get(k))
    assert result.exit_code == 2, result.output
    assert "may not run" in " ".join(result.output.split()), result.output


def _two_sessions(redis_url: str, keys: PoolKeys, *waiting: str) -> None:
    """Nodes n1 and n2 ready, u1 in a session on n1 and u2 on n2, and `waiting` queued."""
    import asyncio

    import redis.asyncio as aioredis

    from provisioner.scripts import Scripts

    async def seed() -> None:
        client = aioredis.Redis.from_url(redis_url)
        scripts = Scripts(client, keys)
        now = int(time.time() * 1000)
        for node in ("n1", "n2"):
            await scripts.apply_node_status(now, node, "booting")
            await scripts.apply_node_status(now, node, "ready")
        for user in ("u1", "u2", *waiting):
            await scripts.allocate(now, user)
        await client.aclose()

    asyncio.run(seed())


@contextlib.contextmanager
def _acl_user(redis_url: str, user: str, *denied: str) -> Iterator[str]:
    """`redis_url` as an ACL user of its own, allowed every key, channel and command but the
    dangerous ones and `denied` (ACL rules: `-xadd`, `resetchannels`, ...)."""
    with redis.Redis.from_url(redis_url) as admin:
        admin.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all",
                              "-@dangerous", *denied)
        try:
            yield redis_url.replace("redis://", f"redis://{user}:pw@", 1)
        finally:
            admin.acl_deluser(user)


def test_a_replica_whose_user_the_scripts_commands_are_refused_does_not_start(
        redis_url: str) -> None:
    """The replicas' scripts under such a user would leave every transition that reaches the
    refused command half made (the operator's commands check first, above): the replica
    checks once, before anything is written, and does not start."""
    pool = "acl-replica"
    with _acl_user(redis_url, "replica-without-xadd", "-xadd") as url:
        # in a process of its own: a replica that starts runs until stopped (timeout: fails)
        done = subprocess.run([sys.executable, "-m", "provisioner", "run", "--redis-url", url,
                               "--node-api-url", "http://127.0.0.1:9", "--pool", pool,
                               "--http-port", "0"], capture_output=True, text=True, timeout=30)
        output = " ".join(done.stderr.split())
        assert done.returncode == 2, output
        assert "cannot run: this Redis user may not run XADD, which the pool's scripts call" \
            in output, output
    with redis.Redis.from_url(redis_url) as plain:
        assert list(plain.scan_iter(match=PoolKeys(pool).pattern())) == []


@pytest.mark.parametrize("host_ahead_s", [300, -300])
def test_reconcile_judges_and_stamps_by_the_server_s_clock_not_its_host_s(
        redis_url: str, monkeypatch: pytest.MonkeyPatch, host_ahead_s: int) -> None:
    """A node created 5 s ago that the Node API does not list yet is left for later, whatever
    the CLI host's clock says: from a host five minutes ahead (or behind) of the replicas,
    whose clocks are measured against the server's, `reconcile` took it for older than the
    create timeout (or stamped by a clock ahead) and declared it terminated, and stamped the
    nodes it adopted with its own time (a review). It reads the server's clock, as `drain`
    and `release` do."""
    import asyncio

    import redis.asyncio as aioredis

    from provisioner.nodeapi import ListedNode
    from provisioner.scripts import Scripts
    from tests.fakes import FakeNodeApi

    pool = f"reconcile-host-{'ahead' if host_ahead_s > 0 else 'behind'}"
    keys = PoolKeys(pool)
    now = int(time.time() * 1000)

    async def plant() -> None:
        client = aioredis.Redis.from_url(redis_url)
        scripts = Scripts(client, keys)
        await scripts.apply_node_status(now - 5_000, "young", "booting")
        await client.aclose()

    asyncio.run(plant())
    api = FakeNodeApi()

    async def listed() -> list[ListedNode]:
        return [ListedNode("adopted", "ready")]

    monkeypatch.setattr(api, "list_nodes", listed)
    monkeypatch.setattr("provisioner.nodeapi.HttpNodeApi", lambda *args, **kwargs: api)
    real, real_ns = time.time, time.time_ns
    monkeypatch.setattr(time, "time", lambda: real() + host_ahead_s)
    monkeypatch.setattr(time, "time_ns", lambda: real_ns() + host_ahead_s * 10**9)
    result = CliRunner().invoke(app, ["reconcile", "--redis-url", redis_url, "--node-api-url",
                                      "http://api", "--pool", pool])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout)
    assert (counts["vanished"], counts["not_listed_left_young"]) == (0, 1), counts
    plain = redis.Redis.from_url(redis_url, decode_responses=True)
    assert plain.hget(keys.node("young"), "state") == "booting"
    stamped = int(plain.hget(keys.node("adopted"), "created_ms"))
    plain.close()
    assert abs(stamped - real_ns() // 1_000_000) < 30_000, stamped - real_ns() // 1_000_000


@pytest.mark.parametrize("command", ["drain", "release"])
@pytest.mark.parametrize("stop", ["interrupted", "server-lost"])
def test_a_drain_or_release_stopped_part_way_says_what_it_did(
        redis_url: str, monkeypatch: pytest.MonkeyPatch, command: str, stop: str) -> None:
    """Ctrl-C (or SIGTERM) between two nodes' drains: the first was drained, and the command
    exited 130 saying nothing of it (a review). It says which were done and which not. So
    when the server's reply does not come in time (exit 2): a frozen server runs the script
    when it wakes, and the error alone said nothing of either node (a review's drill)."""
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from provisioner.scripts import Scripts

    pool = f"stopped-{command}"
    keys = PoolKeys(pool)
    _two_sessions(redis_url, keys)
    method = "drain_node" if command == "drain" else "release"
    real = getattr(Scripts, method)
    calls = []

    async def once_then_stopped(self: Scripts, *args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) > 1:
            if stop == "interrupted":
                raise KeyboardInterrupt
            raise RedisTimeoutError("Timeout reading from 127.0.0.1:6379")
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(Scripts, method, once_then_stopped)
    ids = ["n1", "n2"] if command == "drain" else ["u1", "u2"]
    result = CliRunner().invoke(app, [command, *ids, "--yes", "--by", "op", "--redis-url",
                                      redis_url, "--pool", pool], env={"COLUMNS": "300"})
    output = " ".join(result.output.split())
    if stop == "interrupted":
        assert result.exit_code == 130, output
        assert f"stopped after 1 of 2: {ids[0]} done" in output, output
    else:
        assert result.exit_code == 2, output
        assert "did not answer in time" in output, output
        assert f"cut off from the server after 1 of 2: {ids[0]} done" in output, output
    assert f"{ids[1]} may or may not have been" in output, output


@pytest.mark.parametrize("table", ["nodes", "users"])
def test_a_table_of_a_server_out_of_reach_says_so_and_nothing_of_python(table: str) -> None:
    """An operator's walkthrough: `nodes` and `users` against a server out of reach printed
    their error, then "RuntimeWarning: coroutine 'node_rows' was never awaited" and a hint
    about tracemalloc, Python's own noise under the one line `status` gives."""
    proc = subprocess.run(
        [sys.executable, "-m", "provisioner", table, "--redis-url", "redis://127.0.0.1:1/0"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc
    err = " ".join(proc.stderr.split())
    assert err.startswith("error: cannot reach Redis at redis://127.0.0.1:1/0"), err
    assert "Warning" not in err and "never awaited" not in err, err
