"""The traffic simulator: what it generates, and what it publishes on the wire."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import random
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from provisioner.events import Activity, Connect, Disconnect, parse
from provisioner.redis_server import free_port
from provisioner.simulator import (
    Traffic,
    ending_sessions,
    merge_users,
    publish,
    synthetic,
    trace_events,
    user_script,
)
from tests.helpers import Subscriber


def test_merging_users_streams_what_sorting_every_script_gives() -> None:
    traffic = Traffic(browse_gap_s=5.0, session_s=30.0)
    arrivals = [1.0, 1.0, 2.5, 40.0, 41.0]
    eager_rng = random.Random(9)
    scripts = [event for start in arrivals for event in user_script(traffic, eager_rng, start)]
    everything = sorted(scripts, key=lambda event: event[0])  # stable: ties in drawn order
    assert list(merge_users(traffic, random.Random(9), iter(arrivals))) == everything
    kept = [event for event in everything if event[0] <= 30.0]
    # a trace is cut, as the recorded ones are: the sessions running at its end stay open
    assert list(merge_users(traffic, random.Random(9), iter(arrivals), duration_s=30.0)) == kept
    cut = list(ending_sessions(
        merge_users(traffic, random.Random(9), iter(arrivals), duration_s=30.0), 30.0))
    assert cut[:len(kept)] == kept
    running = [u for u, chs in _channels(kept).items()
               if "user:connect" in chs and "user:disconnect" not in chs]
    assert cut[len(kept):] == [(30.0, "user:disconnect", {"user_id": u}) for u in running]


def _channels(events: Any) -> dict[str, list[str]]:
    users: dict[str, list[str]] = {}
    for _, channel, payload in events:
        users.setdefault(payload["user_id"], []).append(channel)
    return users


def test_synthetic_traffic_is_ordered_valid_and_follows_its_knobs() -> None:
    traffic = Traffic(arrival_rate_per_min=60, conversion=0.3, session_s=120)
    events = list(synthetic(traffic, random.Random(3), duration_s=3600))
    times = [t for t, _, _ in events]
    assert times == sorted(times) and times[-1] <= 3600
    users: dict[str, list[str]] = {}
    for t, channel, payload in events:
        data = dict(payload)
        if channel == "user:activity":
            data["timestamp"] = 1_700_000_000 + int(t)
        parsed = parse(channel, json.dumps(data), (1_700_000_000 + int(t)) * 1000)
        assert isinstance(parsed, Activity | Connect | Disconnect), (channel, payload)
        users.setdefault(payload["user_id"], []).append(channel)
    assert 3000 < len(users) < 4200  # ~60 a minute for an hour
    connected = [u for u, chs in users.items() if "user:connect" in chs]
    assert 0.25 < len(connected) / len(users) < 0.35
    for channels in users.values():
        assert channels[0] == "user:activity"  # everyone browses first
        assert channels.count("user:connect") <= 1
        if "user:disconnect" in channels:
            assert channels.index("user:disconnect") > channels.index("user:connect")
    cut = list(synthetic(traffic, random.Random(3), duration_s=600))
    # At its end every session still running is ended, so a run leaves no node held.
    closing = [e for e in cut if e[0] == 600 and e[1] == "user:disconnect"]
    held = {u for u, chs in _channels(e for e in events if e[0] <= 600).items()
            if "user:connect" in chs and "user:disconnect" not in chs}
    assert closing and {e[2]["user_id"] for e in closing} == held
    assert cut[:len(cut) - len(closing)] == \
        [e for e in events if e[0] <= 600]


async def test_trace_replay_publishes_every_event_with_fresh_timestamps(
        tmp_path: Path, aredis: aioredis.Redis) -> None:
    path = tmp_path / "tiny.jsonl.gz"
    header = {"format": "provisioner-trace/1", "name": "tiny", "description": "",
              "epoch": 1_000_000, "duration_s": 10, "users": 1, "events": 3, "seed": 0,
              "nodes": {"boot_delay_s": [5.0], "api_latency_s": 0.2,
                        "terminate_delay_s": 5, "max_nodes": 10}}
    lines = [header,
             {"t": 0.0, "ch": "user:activity", "msg": {"user_id": "u", "timestamp": 1_000_000}},
             {"t": 1.0, "ch": "user:connect", "msg": {"user_id": "u"}},
             {"t": 2.5, "ch": "user:disconnect", "msg": {"user_id": "u"}}]
    with gzip.open(path, "wt") as out:
        out.writelines(json.dumps(line) + "\n" for line in lines)
    # The pace is read off a clock the test moves, not timed: each sleep moves it by what
    # it was asked, so the sleeps asked are the trace's gaps at the speed.
    now = 100.0
    slept: list[tuple[float, int]] = []

    def monotonic() -> float:
        return now

    async def sleep(stop: asyncio.Event, seconds: float) -> bool:
        nonlocal now
        slept.append((round(seconds, 9), len(await sub.drain(settle=0.2))))
        now += seconds
        return stop.is_set()

    async with Subscriber(aredis, "user:activity", "user:connect", "user:disconnect") as sub:
        counts = await publish(aredis, trace_events(path), speed=10, stop=asyncio.Event(),
                               monotonic=monotonic, sleep=sleep)
        messages = await sub.drain(settle=0.3)
    assert counts == {"user:activity": 1, "user:connect": 1, "user:disconnect": 1}
    # 0.1 s of the clock before the connect and 0.15 s before the disconnect (the trace's
    # gaps at 10x), each event out before the sleep after it
    assert slept == [(0.1, 1), (0.15, 2)]
    assert [ch for ch, _ in messages] == ["user:activity", "user:connect", "user:disconnect"]
    stamp = messages[0][1]["timestamp"]
    assert abs(stamp - time.time()) < 5  # rewritten to the wall clock, not 1970-01-12


async def test_a_trace_replay_ends_the_sessions_the_trace_leaves_running(
        tmp_path: Path, aredis: aioredis.Redis) -> None:
    """A trace is cut with sessions running (the recorded ones are): replayed live, each left
    its node held for good. They end at the trace's duration, as --duration ends synthetic
    traffic's."""
    from tests.test_bench_world import write_trace

    path = write_trace(tmp_path / "cut.jsonl", [
        (0.0, "connect", "a"), (0.1, "connect", "b"), (0.2, "disconnect", "a"),
        (0.3, "connect", "c")], duration=1.0)
    async with Subscriber(aredis, "user:connect", "user:disconnect") as sub:
        counts = await publish(aredis, trace_events(path), speed=10, stop=asyncio.Event())
        messages = await sub.drain(settle=0.3)
    assert counts == {"user:connect": 3, "user:disconnect": 3}
    assert [(ch, m["user_id"]) for ch, m in messages] == [
        ("user:connect", "a"), ("user:connect", "b"), ("user:disconnect", "a"),
        ("user:connect", "c"), ("user:disconnect", "b"), ("user:disconnect", "c")]


@pytest.mark.parametrize("option", [
    ["--duration", "5"],  # it was ignored: the trace ran for its own duration_s
    # The synthetic traffic's shape was ignored in silence (a review): a trace holds its users.
    ["--arrival-rate", "50"], ["--browse-gap", "3"], ["--conversion", "0.5"],
    ["--requests", "4"], ["--session", "60"], ["--seed", "7"],
    ["--arrival-rate", "20"],  # the default, given: refused all the same
])
def test_an_option_of_synthetic_traffic_with_a_trace_is_refused(
        tmp_path: Path, option: list[str]) -> None:
    from typer.testing import CliRunner

    from provisioner.cli import app
    from tests.test_bench_world import write_trace

    path = write_trace(tmp_path / "t.jsonl", [(0.0, "connect", "a")])
    result = CliRunner().invoke(app, ["simulate", "--redis-url", "redis://127.0.0.1:1/0",
                                      "--trace", str(path), *option])
    assert result.exit_code == 2 and option[0] in result.output, result.output
    assert "Traceback" not in result.output


async def test_traffic_is_held_while_redis_does_not_answer_and_follows_late_in_order(
        redis_url: str, aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    """A stalled server (a publish past the client's timeout) stopped the simulator with a
    TimeoutError: `make run` went on with no traffic. Now the event is tried again until it
    goes out, and the events behind it follow, late and in order."""
    events = [(0.1 * i, "user:connect" if i % 2 else "user:activity",
               {"user_id": f"u{i}", "timestamp": 0}) for i in range(6)]
    publisher = aioredis.Redis.from_url(redis_url, socket_timeout=0.3)
    try:
        async with Subscriber(aredis, "user:activity", "user:connect") as sub:
            await aredis.execute_command("CLIENT", "PAUSE", "1500", "ALL")
            with caplog.at_level("WARNING", logger="provisioner.simulator"):
                counts = await publish(publisher, iter(events), speed=1.0,
                                       stop=asyncio.Event(), retry_s=0.1)
            messages = await sub.drain(settle=0.5)
    finally:
        await publisher.aclose()
    assert counts == {"user:activity": 3, "user:connect": 3}
    # At least once, in order: a publish that timed out may still have gone out.
    users = [m["user_id"] for _, m in messages]
    assert sorted(set(users), key=users.index) == [f"u{i}" for i in range(6)], users
    said = caplog.text
    assert "the traffic is held, trying again" in said, said
    assert "published again after" in said, said


async def test_traffic_held_for_a_server_that_is_gone_ends_when_told_to_stop() -> None:
    publisher = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.call_later(0.5, stop.set)
    started = loop.time()
    try:
        counts = await publish(publisher, iter([(0.0, "user:connect", {"user_id": "u"})]),
                               speed=1.0, stop=stop, retry_s=0.1)
    finally:
        await publisher.aclose()
    assert counts == {}
    assert loop.time() - started < 2


def test_lognormal_users_rarely_connect_after_one_or_two_requests() -> None:
    """The recorded traces' connectors almost always browse a while first; the memoryless model
    (sigma 0) has many connect at once. Both keep the mean number of requests."""
    def connector_requests(traffic: Traffic) -> list[int]:
        rng = random.Random(4)
        counts = []
        while len(counts) < 3000:
            script = user_script(traffic, rng, 0.0)
            if script[-1][1] == "user:disconnect":
                counts.append(sum(1 for _, channel, _ in script if channel == "user:activity"))
        return counts

    lognormal = connector_requests(Traffic(requests_before_connect=18.0))
    memoryless = connector_requests(Traffic(requests_before_connect=18.0, requests_sigma=0.0))
    early = {name: sum(n <= 2 for n in counts) / len(counts)
             for name, counts in (("lognormal", lognormal), ("memoryless", memoryless))}
    assert early["lognormal"] < 0.06 < 0.08 < early["memoryless"]  # about 4% and 11%
    for counts in (lognormal, memoryless):
        assert 16 < sum(counts) / len(counts) < 20


@pytest.mark.parametrize("option", [["--arrival-rate", "inf"], ["--requests", "inf"],
                                    ["--requests", "1e12"], ["--browse-gap", "inf"],
                                    ["--speed", "inf"]])
def test_an_unbounded_knob_is_refused_before_any_traffic(option: list[str]) -> None:
    """An infinite arrival rate never moved the traffic's clock: the simulator looped until
    the kernel killed it for memory."""
    from typer.testing import CliRunner

    from provisioner.cli import app

    result = CliRunner().invoke(app, ["simulate", "--redis-url", "redis://127.0.0.1:1/0",
                                      "--duration", "2", *option])
    assert result.exit_code == 2 and "Invalid value" in result.output, result.output


def test_a_trace_with_no_events_replays_nothing_and_says_so(tmp_path: Path) -> None:
    # next() on the empty trace raised StopIteration out of the command.
    from typer.testing import CliRunner

    from provisioner.cli import app
    from tests.test_bench_world import write_trace

    empty = write_trace(tmp_path / "empty.jsonl", [])
    result = CliRunner().invoke(app, ["simulate", "--redis-url", "redis://127.0.0.1:1/0",
                                      "--trace", str(empty)])
    assert result.exit_code == 0 and result.exception is None, result.output


async def test_traffic_told_to_stop_ends_the_sessions_it_connected(
        aredis: aioredis.Redis) -> None:
    """SIGTERM or Ctrl-C left every session running connected (a review's run stopped at 8 s:
    14 connects, no disconnect), each node held until `provisioner release`. Only the sessions
    whose connect went out are ended, in the order they connected."""
    events = [(0.0, "user:connect", {"user_id": "a"}), (1.0, "user:connect", {"user_id": "b"}),
              (2.0, "user:connect", {"user_id": "c"}), (3.0, "user:disconnect", {"user_id": "a"}),
              (4.0, "user:connect", {"user_id": "d"}), (9.0, "user:disconnect", {"user_id": "b"})]
    stop = asyncio.Event()
    now = 0.0
    sleeps = 0

    def monotonic() -> float:
        return now

    async def sleep(stop: asyncio.Event, seconds: float) -> bool:
        nonlocal now, sleeps
        sleeps += 1
        if sleeps == 4:  # on the way to d's connect
            stop.set()
        now += seconds
        return stop.is_set()

    async with Subscriber(aredis, "user:connect", "user:disconnect") as sub:
        counts = await publish(aredis, iter(events), speed=1.0, stop=stop,
                               monotonic=monotonic, sleep=sleep)
        messages = await sub.drain(settle=0.3)
    assert [(ch, m) for ch, m in messages] == [
        ("user:connect", {"user_id": "a"}), ("user:connect", {"user_id": "b"}),
        ("user:connect", {"user_id": "c"}), ("user:disconnect", {"user_id": "a"}),
        ("user:disconnect", {"user_id": "b"}), ("user:disconnect", {"user_id": "c"})]
    assert counts == {"user:connect": 3, "user:disconnect": 3}


class ConnectReplyLost:
    """A Redis that publishes everything, but loses the reply to one user's connect (the
    client's timeout, the server stalled after it had taken the message), and the traffic is
    told to stop while that connect waits to be tried again."""

    def __init__(self, real: aioredis.Redis, user: str, stop: asyncio.Event) -> None:
        self.real = real
        self.user = user
        self.stop = stop

    async def publish(self, channel: str, message: str) -> int:
        from redis.exceptions import TimeoutError as RedisTimeoutError

        received = int(await self.real.publish(channel, message))
        if channel == "user:connect" and json.loads(message)["user_id"] == self.user:
            self.stop.set()  # Ctrl-C while the connect is held
            raise RedisTimeoutError("Timeout reading from socket")
        return received


async def test_traffic_told_to_stop_ends_a_session_whose_connect_went_out_unanswered(
        aredis: aioredis.Redis) -> None:
    """A connect held after a try whose reply was lost may have gone out (the server took it,
    then stalled past the client's timeout): stopped then, the simulator left its user
    connected, the node held until `provisioner release`."""
    events = [(0.0, "user:connect", {"user_id": "a"}), (0.0, "user:connect", {"user_id": "b"})]
    stop = asyncio.Event()
    async with Subscriber(aredis, "user:connect", "user:disconnect") as sub:
        await publish(ConnectReplyLost(aredis, "b", stop), iter(events),  # type: ignore[arg-type]
                      speed=1.0, stop=stop, retry_s=0.1)
        messages = await sub.drain(settle=0.3)
    assert messages == [("user:connect", {"user_id": "a"}), ("user:connect", {"user_id": "b"}),
                        ("user:disconnect", {"user_id": "a"}),
                        ("user:disconnect", {"user_id": "b"})]


async def test_a_replay_stamps_each_activity_with_the_wall_clock_its_speed_gives(
        tmp_path: Path, aredis: aioredis.Redis) -> None:
    """Only an activity at the trace's second 0 was checked, so a timestamp multiplied by the
    speed instead of divided, or left a float, passed. At 10x, one 100 s into the trace is
    stamped 10 s after the first, in whole Unix seconds."""
    from tests.test_bench_world import write_trace

    path = write_trace(tmp_path / "paced.jsonl", [(0.0, "activity", "a"),
                                                  (100.0, "activity", "b")], duration=200.0)
    now = 0.0

    def monotonic() -> float:
        return now

    async def sleep(stop: asyncio.Event, seconds: float) -> bool:
        nonlocal now
        now += seconds
        return stop.is_set()

    async with Subscriber(aredis, "user:activity") as sub:
        await publish(aredis, trace_events(path), speed=10, stop=asyncio.Event(),
                      monotonic=monotonic, sleep=sleep)
        messages = await sub.drain(settle=0.3)
    [(_, first), (_, second)] = messages
    assert [first["user_id"], second["user_id"]] == ["a", "b"]
    assert type(first["timestamp"]) is int and type(second["timestamp"]) is int
    assert second["timestamp"] - first["timestamp"] == 10
    assert abs(first["timestamp"] - time.time()) < 5


def test_browse_gaps_and_sessions_have_the_means_and_spread_they_are_given() -> None:
    """Neither was checked: gaps drawn at a rate of browse_gap_s instead of its inverse, or
    sessions of twice the mean or of the requests' spread, passed."""
    traffic = Traffic(browse_gap_s=5.0, conversion=1.0, session_s=200.0)
    rng = random.Random(5)
    gaps: list[float] = []
    sessions: list[float] = []
    for _ in range(4000):
        script = user_script(traffic, rng, 0.0)
        times = [t for t, channel, _ in script if channel == "user:activity"]
        gaps += [b - a for a, b in itertools.pairwise(times)]
        [connect] = [t for t, channel, _ in script if channel == "user:connect"]
        [disconnect] = [t for t, channel, _ in script if channel == "user:disconnect"]
        sessions.append(disconnect - connect)
    assert 4.8 < statistics.mean(gaps) < 5.2
    assert 190 < statistics.mean(sessions) < 210
    # lognormal with sigma 0.8: the median is the mean times e^(-0.32), 145 s
    assert 138 < statistics.median(sessions) < 152


def test_the_synthetic_traffic_is_drawn_with_the_options_given(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command's options were only checked for their bounds: `--requests` (or any other)
    not handed to the traffic passed."""
    from typer.testing import CliRunner

    from provisioner import simulator
    from provisioner.cli import app

    drawn: list[tuple[Traffic, float | None]] = []

    def no_users(traffic: Traffic, rng: random.Random, duration_s: float | None = None,
                 ) -> Iterator[tuple[float, str, dict[str, Any]]]:
        drawn.append((traffic, duration_s))
        return iter([])

    monkeypatch.setattr(simulator, "synthetic", no_users)
    result = CliRunner().invoke(app, [
        "simulate", "--redis-url", redis_url, "--arrival-rate", "50", "--browse-gap", "3",
        "--conversion", "0.5", "--requests", "4", "--session", "60", "--duration", "90"])
    assert result.exit_code == 0, result.output
    assert drawn == [(Traffic(arrival_rate_per_min=50, browse_gap_s=3, conversion=0.5,
                              requests_before_connect=4, session_s=60), 90)]


class Unreachable:
    """A Redis that cannot be reached."""

    async def publish(self, channel: str, message: str) -> int:
        raise ConnectionError("Connection refused")


async def test_a_held_event_is_tried_again_with_a_backoff_of_at_most_five_seconds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's "a backoff up to 5 s" was unchecked: one doubling without a bound (a
    server back after ten minutes would then wait up to ten more) passed. The waits are
    recorded, not taken."""
    from provisioner import simulator

    waits: list[float] = []
    stop = asyncio.Event()

    async def no_wait(event: asyncio.Event, seconds: float) -> bool:
        waits.append(seconds)
        if len(waits) == 8:
            stop.set()
        return stop.is_set()

    monkeypatch.setattr(simulator, "sleep_unless", no_wait)
    counts = await publish(Unreachable(), iter([(0.0, "user:activity",  # type: ignore[arg-type]
                                                 {"user_id": "u", "timestamp": 0})]),
                           speed=1.0, stop=stop)
    assert counts == {}
    assert waits == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


async def test_traffic_told_to_stop_sends_no_disconnect_to_a_user_who_only_browsed(
        aredis: aioredis.Redis) -> None:
    """The sessions ended on a stop were only checked with users who all connected: a
    disconnect for every user seen, a browser's included, passed."""
    events = [(0.0, "user:activity", {"user_id": "browser", "timestamp": 0.0}),
              (0.0, "user:connect", {"user_id": "a"}),
              (5.0, "user:connect", {"user_id": "b"})]
    stop = asyncio.Event()

    async def stopped(event: asyncio.Event, seconds: float) -> bool:
        stop.set()  # on the way to b's connect
        return True

    async with Subscriber(aredis, "user:activity", "user:connect", "user:disconnect") as sub:
        counts = await publish(aredis, iter(events), speed=1.0, stop=stop, sleep=stopped,
                               monotonic=lambda: 0.0)
        messages = await sub.drain(settle=0.3)
    assert [(ch, m["user_id"]) for ch, m in messages] == [
        ("user:activity", "browser"), ("user:connect", "a"), ("user:disconnect", "a")]
    assert counts == {"user:activity": 1, "user:connect": 1, "user:disconnect": 1}


@pytest.mark.engine  # starts the engine under test itself, to pause it
def test_the_simulator_told_to_stop_while_a_stalled_server_has_not_answered_stops() -> None:
    """A review: SIGTERM while the first PING waited on a server stopped (SIGSTOP: a VM paused)
    waited out the client's timeout, then said "cannot reach Redis" and exit 2. It stops, as
    it would once publishing, with nothing published."""
    import os
    import signal
    import subprocess
    import sys

    from provisioner.redis_server import start_server

    server = start_server(os.environ.get("PROVISIONER_TEST_REDIS_BINARY"))
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "provisioner", "simulate", "--redis-url", server.url,
             "--duration", "60"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # Its SIGTERM handler in place (Linux's SigCgt mask), so the signal is the command's:
        # it is waiting on its PING, or about to.
        for _ in range(300):
            assert proc.poll() is None, proc.communicate()
            with open(f"/proc/{proc.pid}/status") as status:
                caught = next(line for line in status if line.startswith("SigCgt:"))
            if int(caught.split()[1], 16) & 1 << (signal.SIGTERM - 1):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the simulator never took SIGTERM")
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, output
        assert "stopped before the server answered" in output, output
        assert "cannot reach" not in output, output
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        server.stop()
