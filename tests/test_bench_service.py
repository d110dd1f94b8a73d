"""The shipped service as a replay policy: real scripts, virtual time, refereed by the world."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner, Result

from provisioner.bench.scoring import Scores
from provisioner.bench.service_policy import Miss, ServicePolicy
from provisioner.bench.trace import load_trace
from provisioner.bench.world import run_replay
from provisioner.cli import app
from provisioner.clock import ManualClock
from provisioner.config import PoolConfig
from provisioner.scripts import FORECAST_TERMS
from tests.test_bench_world import SESSIONS, write_trace


def _trace(tmp_path: Path) -> Path:
    events = [(t - 1.5, "activity", user) for t, _, user in SESSIONS] + SESSIONS
    events.sort(key=lambda e: e[0])
    return write_trace(tmp_path / "sessions.jsonl", events, duration=500.0)


def test_replay_is_deterministic_legal_and_leaves_no_keys(
        tmp_path: Path, redis_url: str, sync_redis: redis.Redis) -> None:
    trace = load_trace(_trace(tmp_path))
    policy = ServicePolicy(redis_url)
    first = run_replay(trace, policy)
    assert first == run_replay(trace, ServicePolicy(redis_url))
    assert first.connects == 10
    # The forecast checked itself over the 500 s, one horizon (the boot time learned, about
    # 14 s here) after another, and saw the connects of every finished horizon.
    check = policy.forecast_check
    assert check is not None and check.checks > 20 and 0 < check.seen <= 10
    assert sync_redis.keys("prov:*") == []


def _starved(tmp_path: Path) -> Path:
    return write_trace(tmp_path / "starved.jsonl",
                       [(10.0, "connect", "a"), (10.0, "connect", "b"),
                        (100.0, "disconnect", "a"), (100.0, "disconnect", "b")],
                       boot=[10.0, 20.0], duration=200.0)


#: No floor, no prediction: a pool that creates a node only for a connect that missed.
STARVED_POOL = PoolConfig(min_ready=0, conversion=0.0, idle_timeout_s=1.0,
                          scaling_policy="heuristic")
#: The same, as `--set` options
STARVED = ["min_ready=0", "conversion=0", "idle_timeout_s=1", "scaling_policy=heuristic"]


def test_a_pool_whose_boots_all_outlast_the_boot_timeout_comes_to_serve(
        tmp_path: Path, redis_url: str) -> None:
    """Every boot takes 700 s, past the default --boot-timeout of 600 s (a review's replay): no
    boot ever ended, none was learned, and each was ended as stuck and asked again, so no user
    was ever served (0 nodes ready in 3 hours). The stuck boots now teach the boot time, and
    the boots after them end ready."""
    events = [(float(t), "activity", f"u{t}") for t in range(60, 10_000, 600)]
    events += [(t + 30.0, "connect", user) for t, _, user in events]
    events += [(t + 900.0, "disconnect", user) for t, kind, user in events if kind == "connect"]
    events.sort(key=lambda e: e[0])
    trace = load_trace(write_trace(tmp_path / "slow.jsonl", events, boot=[700.0],
                                   max_nodes=50, duration=10_800.0))
    assert PoolConfig().boot_timeout_s < 700 + 0.2
    scores = run_replay(trace, ServicePolicy(redis_url))
    assert scores.connects == 17
    assert scores.abandoned < scores.connects // 2, scores
    assert scores.misses < scores.connects, scores


def test_a_starved_pool_misses_and_serves_waiting_users_in_order(
        tmp_path: Path, redis_url: str, sync_redis: redis.Redis) -> None:
    # No floor, no prediction: every connect misses, waits one boot (0.2 s + 10 or 20 s, by
    # creation order) and is served; the world checks each served user is the oldest waiting.
    scores = run_replay(load_trace(_starved(tmp_path)), ServicePolicy(redis_url, STARVED_POOL))
    assert (scores.connects, scores.misses, scores.abandoned) == (2, 2, 0)
    assert scores.nodes_created == 2
    # Created at the tick of t=10 (after the connects): a waits 10.2 s, b 20.2 s.
    assert scores.wait_p95_s == pytest.approx(20.2)


def test_each_miss_is_kept_with_the_decision_before_it(
        tmp_path: Path, redis_url: str, sync_redis: redis.Redis) -> None:
    policy = ServicePolicy(redis_url, STARVED_POOL)
    run_replay(load_trace(_starved(tmp_path)), policy)
    # Both connects come before the tick of t=10: the last decision is t=9's, which held an
    # empty pool at its target of 0, so the pool was not behind and nothing was booting.
    assert [(m.t, m.user_id, m.scored, m.decided_t, m.kind) for m in policy.misses] == [
        (10.0, "a", True, 9.0, "short"), (10.0, "b", True, 9.0, "short")]
    assert policy.misses[0].numbers["target"] == 0
    assert "hold" in policy.misses[0].decision
    assert policy.misses[0].reason == (
        "user a waits at position 1: no ready node; the last decision was 1.0s before with "
        "spare 0 (ready 0, booting 0) for a target of 0")


@pytest.mark.parametrize(("numbers", "kind"), [
    ({"spare": 2, "target": 3, "booting": 0}, "behind"),
    ({"spare": 3, "target": 3, "booting": 2, "creating": 0}, "booting"),
    ({"spare": 3, "target": 3, "booting": 0, "creating": 1}, "booting"),
    ({"spare": 3, "target": 2, "booting": 0, "creating": 0}, "short"),
])
def test_a_miss_says_where_the_node_was_missing(numbers: dict[str, int], kind: str) -> None:
    assert Miss(1.0, "u", True, 0.0, "", "", numbers).kind == kind


def test_bench_replay_writes_the_misses(
        tmp_path: Path, redis_url: str, sync_redis: redis.Redis) -> None:
    out = tmp_path / "misses.jsonl"
    args = ["bench", "replay", str(_starved(tmp_path)), "--json", "--redis-url", redis_url,
            "--misses", str(out)]
    for setting in STARVED:
        args += ["--set", setting]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["misses"] == 2
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(m["user_id"], m["kind"], m["decided_t"]) for m in lines] == [
        ("a", "short", 9.0), ("b", "short", 9.0)]
    assert "2 scored misses (0 behind, 0 booting, 2 short)" in result.stderr
    refused = CliRunner().invoke(app, ["bench", "replay", str(_starved(tmp_path)),
                                       "--policy", "static-3", "--misses", str(out)])
    assert refused.exit_code == 2
    assert "only `provisioner` explains its misses" in refused.output


def test_the_timeline_samples_the_pool_after_every_tick(
        tmp_path: Path, redis_url: str, sync_redis: redis.Redis) -> None:
    # No users: the floor (min_ready 1) is the whole target. The tick of t=0 creates one node;
    # it is booting from 0.2 s and ready at 10.2 s, so the ticks of 0..10 see it booting and
    # those of 11.. see it ready.
    trace = load_trace(write_trace(tmp_path / "empty.jsonl", [], boot=[10.0], duration=20.0))
    policy = ServicePolicy(redis_url, timeline_s=5.0)
    scores = run_replay(trace, policy)
    windows = [w.as_dict() for w in policy.timeline]
    assert [(w["from_s"], w["to_s"], w["ticks"]) for w in windows] == [
        (0.0, 5.0, 5), (5.0, 10.0, 5), (10.0, 15.0, 5), (15.0, 20.0, 5), (20.0, 20.0, 1)]
    assert [(w["ready"], w["booting"], w["spare"]) for w in windows] == [
        (0.0, 1.0, 1.0), (0.0, 1.0, 1.0), (0.8, 0.2, 1.0), (1.0, 0.0, 1.0), (1.0, 0.0, 1.0)]
    assert {(w["target"], w["keep"], w["allocated"], w["surge_share"]) for w in windows} == {
        (1.0, 1.0, 0.0, 0.0)}
    assert [w["creates"] for w in windows] == [1, 0, 0, 0, 0] and scores.nodes_created == 1
    assert all(w["scored"] for w in windows)
    assert [w["connects"] for w in windows] == [0] * 5
    # the forecast's terms, each window's mean: no users browsing, so the connects forecast
    # are all those of users not browsing yet (the prior's few), and the lead time is its prior
    # of a minute until the first boot ends (10.2 s, learned from then)
    assert all(0 < w["forecast"]["connects"] == w["forecast"]["not_browsing_yet"] < 0.1
               for w in windows)
    assert [w["forecast"]["lead_time_s"] for w in windows[:2]] == [60.0, 60.0]
    with pytest.raises(ValueError, match="timeline_s"):
        ServicePolicy(redis_url, timeline_s=0)


def test_the_timeline_counts_the_connects_beside_the_forecast(
        tmp_path: Path, redis_url: str) -> None:
    # Connects counted as FORMAT.md counts them (a hit or a miss; a repeat is not one), in the
    # window they came in, so that a timeline of 1 s windows sets every tick's forecast beside
    # the connects that followed it; the heuristic policy has no forecast to show.
    events = [(2.0, "connect", "u1"), (3.0, "connect", "u1"), (12.0, "connect", "u2"),
              (13.0, "disconnect", "u1")]
    trace = load_trace(write_trace(tmp_path / "c.jsonl", events, boot=[5.0], duration=20.0))
    policy = ServicePolicy(redis_url, PoolConfig(min_ready=2), timeline_s=5.0)
    scores = run_replay(trace, policy)
    windows = [w.as_dict() for w in policy.timeline]
    assert [w["connects"] for w in windows] == [1, 0, 1, 0, 0] and scores.connects == 2
    assert all(set(w["forecast"]) == set(FORECAST_TERMS) for w in windows)
    policy = ServicePolicy(redis_url, PoolConfig(min_ready=2, scaling_policy="heuristic"),
                           timeline_s=5.0)
    run_replay(trace, policy)
    assert [w.as_dict()["connects"] for w in policy.timeline] == [1, 0, 1, 0, 0]
    assert not any("forecast" in w.as_dict() for w in policy.timeline)


def test_the_replay_ticks_the_pool_at_its_own_tick_interval(
        tmp_path: Path, redis_url: str) -> None:
    """The world ticked every second whatever the pool's tick interval: a pool set to half a
    second decided half as often as live (a review). 0..10 s is 21 ticks at 0.5 s."""
    trace = load_trace(write_trace(tmp_path / "empty.jsonl", [], boot=[1.0], duration=10.0))
    policy = ServicePolicy(redis_url, PoolConfig(tick_interval_s=0.5), timeline_s=20.0)
    run_replay(trace, policy)
    assert [w.ticks for w in policy.timeline] == [21]
    policy = ServicePolicy(redis_url, timeline_s=20.0)
    run_replay(trace, policy)
    assert [w.ticks for w in policy.timeline] == [11]
    # a tick given to the world is kept, whatever the policy's own (a review: it was not)
    policy = ServicePolicy(redis_url, PoolConfig(tick_interval_s=0.5), timeline_s=20.0)
    run_replay(trace, policy, tick_s=2.0)
    assert [w.ticks for w in policy.timeline] == [6]


def test_bench_replay_writes_the_timeline(
        tmp_path: Path, redis_url: str, sync_redis: redis.Redis) -> None:
    out = tmp_path / "timeline.jsonl"
    result = CliRunner().invoke(app, ["bench", "replay", str(_trace(tmp_path)), "--json",
                                      "--redis-url", redis_url, "--timeline", str(out),
                                      "--timeline-window", "100"])
    assert result.exit_code == 0, result.output
    windows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["from_s"] for w in windows] == [0.0, 100.0, 200.0, 300.0, 400.0, 500.0]
    assert sum(w["ticks"] for w in windows) == 501  # t = 0, 1, ..., 500
    assert sum(w["creates"] for w in windows) == json.loads(result.stdout)["nodes_created"]
    assert all(w["spare"] == pytest.approx(w["ready"] + w["booting"]) for w in windows)
    assert "timeline: 6 windows of 100 s written to" in result.stderr
    refused = CliRunner().invoke(app, ["bench", "replay", str(_trace(tmp_path)),
                                       "--policy", "static-3", "--timeline", str(out)])
    assert refused.exit_code == 2
    assert "only `provisioner` keeps a timeline" in refused.output


def test_bench_replay_json_has_exactly_the_scores(
        tmp_path: Path, redis_url: str, sync_redis: redis.Redis) -> None:
    result = CliRunner().invoke(app, ["bench", "replay", str(_trace(tmp_path)), "--json",
                                      "--redis-url", redis_url])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert re.search(r"^forecast check: \d+ horizons, \d+ connects came for ", result.stderr,
                     re.MULTILINE)
    scaling = re.search(r"^scaling: (\d+) creates \((\d+) on a rise of the target, (\d+) to "
                        r"refill spare used\), \d+ terminations; the target raised by \d+ and "
                        r"lowered by \d+ in all", result.stderr, re.MULTILINE)
    assert scaling is not None
    creates, on_rise, to_refill = (int(g) for g in scaling.groups())
    assert creates == on_rise + to_refill > 0
    node_time = re.search(r"^node time: ([\d.]+) h billed = ([\d.]+) busy \+ ", result.stderr,
                          re.MULTILINE)
    assert node_time is not None
    assert (float(node_time[1]), float(node_time[2])) == (
        round(printed["node_hours"], 2), round(printed["busy_hours"], 2))
    unserved = re.search(r"^never served: (\d+) of the (\d+) nodes created held no session, "
                         r"[\d.]+ h billed \([\d.]+ h of it booting\)$", result.stderr,
                         re.MULTILINE)
    assert unserved is not None
    assert int(unserved[1]) <= int(unserved[2]) == printed["nodes_created"]
    assert list(printed) == [
        "connects", "misses", "miss_rate", "wait_p95_s", "abandoned", "nodes_created",
        "node_hours", "busy_hours", "cost_ratio"]
    assert Scores(**printed).connects == 10


def _suite(tmp_path: Path, out: Path, redis_url: str, *policies: str) -> Result:
    """`bench suite` over a folder holding one small trace, into `out`."""
    folder = tmp_path / "traces"
    if not folder.exists():
        folder.mkdir()
        _trace(folder)
    return CliRunner().invoke(app, ["bench", "suite", str(folder), "--out", str(out),
                                    *(arg for p in policies for arg in ("--policy", p)),
                                    "--redis-url", redis_url])


def test_bench_suite_writes_table_json_and_plot(tmp_path: Path, redis_url: str,
                                                sync_redis: redis.Redis) -> None:
    out = tmp_path / "out"
    result = _suite(tmp_path, out, redis_url, "provisioner", "static-best", "reactive")
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())
    assert sorted(r["policy"] for r in rows) == ["provisioner", "reactive", "static-best"]
    assert "| sessions | provisioner |" in (out / "results.md").read_text()
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    # What the suite writes is what `bench bar` judges, against the suite's own static-best.
    judged = CliRunner().invoke(app, ["bench", "bar", str(out), "--json"])
    assert judged.exit_code == 0, judged.output
    (verdict,) = json.loads(judged.stdout)["results"][0]["traces"]
    service = next(r for r in rows if r["policy"] == "provisioner")
    static = next(r for r in rows if r["policy"] == "static-best")
    assert verdict["trace"] == "sessions"
    assert verdict["cost_limit"] == pytest.approx(static["cost_ratio"] + 0.02, abs=1e-6)
    assert verdict["met"] == (service["miss_rate"] <= 0.01
                              and service["cost_ratio"] <= static["cost_ratio"] + 0.02)


def test_the_default_suite_has_the_rate_oracle_as_a_reference_row_and_says_what_it_is(
        tmp_path: Path, redis_url: str) -> None:
    from provisioner.bench.baselines import BASELINE_NAMES

    assert "rate-oracle-0.5" in BASELINE_NAMES
    out = tmp_path / "out"
    result = _suite(tmp_path, out, redis_url, "static-best", "rate-oracle-0.5")
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())
    assert sorted(r["policy"] for r in rows) == ["rate-oracle-0.5", "static-best"]
    note = " ".join((out / "results.md").read_text().split())
    assert "rate-oracle-0.5: `bench bound`'s cheapest band per window" in note
    alone = tmp_path / "alone"
    assert _suite(tmp_path, alone, redis_url, "static-best").exit_code == 0
    assert "bench bound" not in (alone / "results.md").read_text()


def test_unknown_policy_is_refused_clearly(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "replay", str(_trace(tmp_path)),
                                      "--policy", "magic"])
    assert result.exit_code != 0
    assert "unknown policy" in result.output


def test_bench_replay_warm_up_scores_the_last_play(
        tmp_path: Path, redis_url: str, sync_redis: redis.Redis) -> None:
    args = ["bench", "replay", str(_trace(tmp_path)), "--json", "--redis-url", redis_url]
    cold = Scores(**json.loads(CliRunner().invoke(app, args).stdout))
    result = CliRunner().invoke(app, [*args, "--warm-up", "1"])
    assert result.exit_code == 0, result.output
    warm = Scores(**json.loads(result.stdout))
    # The same ten sessions are scored, once, over the same 500 s.
    assert (warm.connects, warm.busy_hours) == (cold.connects, pytest.approx(cold.busy_hours))
    assert warm.node_hours <= 500 / 3600 * PoolConfig().max_nodes
    assert sync_redis.keys("prov:*") == []
    bad = CliRunner().invoke(app, [*args, "--warm-up", "-1"])
    assert bad.exit_code != 0


def test_single_replays_are_collected_for_bench_compare_and_bench_bar(
        tmp_path: Path, redis_url: str, sync_redis: redis.Redis) -> None:
    trace = str(_trace(tmp_path))
    name = load_trace(Path(trace)).name
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    for policy, out, extra in (("static-3", before, []), ("provisioner", before, []),
                               ("provisioner", after, ["--set", "buffer_sd=3.0"])):
        added = CliRunner().invoke(app, ["bench", "replay", trace, "--policy", policy,
                                         "--redis-url", redis_url, "--append-to", str(out),
                                         "--json", *extra])
        assert added.exit_code == 0, added.output
        assert json.loads(added.stdout) == {
            k: v for k, v in json.loads(out.read_text())[-1].items()
            if k not in ("trace", "policy", "detail", "wall_s", "boot_offset", "warm_up")}
    rows = json.loads(before.read_text())
    assert [(r["trace"], r["policy"]) for r in rows] == [(name, "static-3"), (name, "provisioner")]
    compared = CliRunner().invoke(app, ["bench", "compare", str(before), str(after), "--json"])
    assert compared.exit_code == 0, compared.output
    assert json.loads(compared.stdout)["pairs"] == 1
    again = CliRunner().invoke(app, ["bench", "replay", trace, "--redis-url", redis_url,
                                     "--append-to", str(before)])
    assert again.exit_code == 2
    said = " ".join(again.output.replace("│", " ").split())  # the error box wraps its lines
    assert f"has a row of {name} / provisioner already" in said
    assert json.loads(before.read_text()) == rows  # refused before replaying: file untouched


def test_a_release_serves_the_waiting_user_and_a_user_who_leaves_waiting_abandons(
        tmp_path: Path, redis_url: str, sync_redis: redis.Redis) -> None:
    # a misses and is served by the node booted for it; b misses at 30 and is served at 35 by
    # the node a releases (release's `served`), before b's own node is ready; c misses at 50
    # and leaves at 52, before its node is up (release's ABANDONED). The world raises if
    # either is not reported.
    trace = load_trace(write_trace(
        tmp_path / "leaving.jsonl",
        [(10.0, "connect", "a"), (30.0, "connect", "b"), (35.0, "disconnect", "a"),
         (50.0, "connect", "c"), (52.0, "disconnect", "c"), (100.0, "disconnect", "b")],
        boot=[10.0], duration=200.0))
    scores = run_replay(trace, ServicePolicy(redis_url, STARVED_POOL))
    assert (scores.connects, scores.misses, scores.abandoned) == (3, 3, 1)
    # a waits 10.2 s (created at the tick of 10, booted 0.2 s later for 10 s), b 5 s.
    assert scores.wait_p95_s == pytest.approx(10.2)


def test_misses_and_timeline_windows_of_a_warm_up_play_are_not_scored(
        tmp_path: Path, redis_url: str, sync_redis: redis.Redis) -> None:
    # One session from t=0; with one warm-up play the scored play starts at 100, and its
    # connect lands on that instant: a scored miss. Windows of 30 s: the one from 90 holds
    # warm-up time, so it is not a scored window.
    trace = load_trace(write_trace(tmp_path / "warm.jsonl",
                                   [(0.0, "connect", "a"), (50.0, "disconnect", "a")],
                                   boot=[10.0], duration=100.0)).warmed_up(1)
    policy = ServicePolicy(redis_url, STARVED_POOL, timeline_s=30.0)
    run_replay(trace, policy)
    assert [(m.t, m.user_id, m.scored) for m in policy.misses] == [
        (0.0, "a.w1", False), (100.0, "a", True)]
    # Each miss carries its own log entry (the newest), not an earlier miss's.
    assert [m.reason.split(" waits")[0] for m in policy.misses] == ["user a.w1", "user a"]
    windows = [w.as_dict() for w in policy.timeline]
    assert [(w["from_s"], w["scored"]) for w in windows] == [
        (0.0, False), (30.0, False), (60.0, False), (90.0, False), (120.0, True),
        (150.0, True), (180.0, True)]
    # Means are kept to the third decimal: the node created for a.w1 at the tick of 0 is
    # ready at 10.2 s, so the ticks of 0..10, 11 of the first window's 30, see it booting.
    assert windows[0]["booting"] == 0.367


def test_virtual_time_is_the_event_time_rounded_to_the_millisecond_and_never_goes_back(
) -> None:
    policy = ServicePolicy("redis://unused")
    policy._epoch_ms = 1_000_000
    policy.clock = ManualClock(1_000_000)
    policy._at(2.01)  # 2009.9999999999998 ms in floating point
    assert policy.clock.now_ms() == 1_002_010
    policy._at(1.0)  # an event of an earlier instant, after a later one: the clock holds
    assert policy.clock.now_ms() == 1_002_010


def test_each_tick_finishes_its_node_api_calls_before_virtual_time_moves_on(
        tmp_path: Path, redis_url: str, sync_redis: redis.Redis) -> None:
    pending: list[int] = []

    class Watched(ServicePolicy):
        async def tick(self, t: float) -> None:
            await super().tick(t)
            pending.append(len(self.replica._actions))

    run_replay(load_trace(_starved(tmp_path)), Watched(redis_url, PoolConfig(
        min_ready=0, conversion=0.0, idle_timeout_s=1.0, scaling_policy="heuristic")))
    assert len(pending) == 201 and set(pending) == {0}


def test_a_deleted_node_holds_its_place_under_max_nodes_until_it_reports_terminated(
        tmp_path: Path, redis_url: str, sync_redis: redis.Redis) -> None:
    # max_nodes 2: a and b's nodes are released at 50 and reaped; c and d connect at 53. The
    # world frees the quota at the delete, but the replay's Node API answers "sent" (not
    # "gone"), so the pool counts both nodes until their `terminated` 5 s later and creates
    # for c and d only then: they wait 13.2 s, not the 10.2 s of one boot.
    pool = dataclasses.replace(STARVED_POOL, max_nodes=2)
    trace = load_trace(write_trace(
        tmp_path / "quota.jsonl",
        [(10.0, "connect", "a"), (10.0, "connect", "b"), (50.0, "disconnect", "a"),
         (50.0, "disconnect", "b"), (53.0, "connect", "c"), (53.0, "connect", "d"),
         (90.0, "disconnect", "c"), (90.0, "disconnect", "d")],
        boot=[10.0], max_nodes=2, duration=200.0))
    scores = run_replay(trace, ServicePolicy(redis_url, pool))
    assert (scores.connects, scores.misses, scores.nodes_created) == (4, 4, 4)
    assert scores.wait_p95_s == pytest.approx(13.2)


def test_an_activity_reaches_the_pool_with_the_traces_own_timestamp(
        tmp_path: Path, redis_url: str, sync_redis: redis.Redis) -> None:
    recorded: list[tuple[float, list[tuple[bytes, float]]]] = []

    class Watched(ServicePolicy):
        async def on_activity(self, t: float, user_id: str, timestamp: int) -> None:
            await super().on_activity(t, user_id, timestamp)
            assert self._redis is not None
            acts = await self._redis.zrange(self.keys.key("acts_prefix") + user_id, 0, -1,
                                            withscores=True)
            recorded.append((t, acts))

    trace = load_trace(write_trace(tmp_path / "browse.jsonl",
                                   [(5.0, "activity", "u"), (7.0, "activity", "u")]))
    run_replay(trace, Watched(redis_url))
    epoch_ms = 1_767_225_600_000  # write_trace's epoch; its timestamps are epoch + int(t)
    assert [(t, [score for _, score in acts]) for t, acts in recorded] == [
        (5.0, [epoch_ms + 5_000]), (7.0, [epoch_ms + 5_000, epoch_ms + 7_000])]


def test_a_replay_that_breaks_a_rule_leaves_no_keys_on_the_server(
        tmp_path: Path, redis_url: str, sync_redis: redis.Redis) -> None:
    # `--redis-url` may name a server that outlives the replay: a replay stopped by the
    # referee clears its pool as a finished one does.
    from provisioner.bench.world import PolicyViolation

    class Silent(ServicePolicy):
        async def on_connect(self, t: float, user_id: str) -> None:
            return None  # neither a hit nor a miss: the world stops the replay

    with pytest.raises(PolicyViolation, match="neither a hit nor a miss"):
        run_replay(load_trace(_starved(tmp_path)), Silent(redis_url))
    assert sync_redis.keys("prov:*") == []


def test_a_replay_gives_the_service_s_log_level_back(tmp_path: Path, redis_url: str) -> None:
    """A replay quiets the service's per-event lines while it runs, and left its logger at
    WARNING for the rest of the process: a test after it that read the level read WARNING."""
    service_log = logging.getLogger("provisioner.service")
    before = service_log.level
    try:
        service_log.setLevel(logging.DEBUG)
        trace = load_trace(write_trace(tmp_path / "one.jsonl", [(1.0, "activity", "u1")],
                                       duration=30.0))
        run_replay(trace, ServicePolicy(redis_url))
        assert service_log.level == logging.DEBUG
    finally:
        service_log.setLevel(before)


def test_a_replay_whose_close_fails_gives_the_service_s_log_level_back(
        tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same when the close fails part way (its server gone): the level was given back
    only after the close's last read, and two tests of the replica's INFO lines read nothing
    in a clean clone's CI."""
    from provisioner.scripts import Scripts

    async def gone(*_: object) -> None:
        raise redis.ConnectionError("Connection closed by server.")

    service_log = logging.getLogger("provisioner.service")
    before = service_log.level
    try:
        service_log.setLevel(logging.DEBUG)
        monkeypatch.setattr(Scripts, "snapshot", gone)
        trace = load_trace(write_trace(tmp_path / "one.jsonl", [(1.0, "activity", "u1")],
                                       duration=30.0))
        with pytest.raises(redis.ConnectionError):
            run_replay(trace, ServicePolicy(redis_url))
        assert service_log.level == logging.DEBUG
    finally:
        service_log.setLevel(before)


def test_the_timeline_counts_the_ticks_decided_in_a_surge(
        tmp_path: Path, redis_url: str, sync_redis: redis.Redis) -> None:
    # Half an hour of one new user a minute, then twenty in ten seconds: the pool decides in a
    # surge for a while after the crowd, and in no tick before it.
    events = [(60.0 * m + 1, "activity", f"steady{m}") for m in range(30)]
    events += [(1801.0 + i / 2, "activity", f"burst{i}") for i in range(20)]
    trace = load_trace(write_trace(tmp_path / "crowd.jsonl", events, duration=1920.0))
    policy = ServicePolicy(redis_url, timeline_s=60.0)
    run_replay(trace, policy)
    shares = [w.as_dict()["surge_share"] for w in policy.timeline]
    assert set(shares[:30]) == {0.0}
    assert 0.0 < shares[30] <= 1.0
