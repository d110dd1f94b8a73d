"""`bench soak`: what it measures of a pool, how it summarises a run, and when it fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from provisioner.bench import soak
from provisioner.bench.soak import Sample, SoakResult, pool_sizes, soak_summary
from provisioner.keys import PoolKeys


def _sample(t_s: float, memory_mb: float, problems: list[str] | None = None,
            checked: bool = True) -> Sample:
    return Sample(t_s=t_s, memory_mb=memory_mb, keys=int(t_s), sizes={"active": 7},
                  rss_mb={"replica-1": 50.0}, stats={"connects": 0}, problems=problems or [],
                  checked=checked)


def test_pool_sizes_measure_each_structure_by_its_type_and_count_the_prefixed_keys(
        sync_redis: redis.Redis) -> None:
    keys = PoolKeys(soak.POOL)
    sync_redis.rpush(keys.key("ready"), "n1", "n2")
    sync_redis.zadd(keys.key("active"), {"u1": 1, "u2": 2, "u3": 3})
    sync_redis.hset(keys.key("alloc"), mapping={"u1": "n3"})
    sync_redis.xadd(keys.key("decisions"), {"reason": "x"})
    for user in ("u1", "u2"):
        sync_redis.zadd(keys.key("acts_prefix") + user, {"1": 1})
    sync_redis.set(keys.key("seen_prefix") + "u1", 1)
    sync_redis.hset(keys.node("n3"), "status", "ready")
    sync_redis.set("someone-else", 1)

    sizes = pool_sizes(sync_redis, keys)

    assert {k: sizes[k] for k in ("ready", "active", "alloc", "decisions")} == {
        "ready": 2, "active": 3, "alloc": 1, "decisions": 1}
    assert "waiting" not in sizes  # absent keys have no size, not 0 of a guessed type
    assert {k: sizes[k] for k in ("acts keys", "seen keys", "node keys", "other keys")} == {
        "acts keys": 2, "seen keys": 1, "node keys": 1, "other keys": 1}


def test_the_summary_gives_start_half_and_end_and_the_second_halfs_slope() -> None:
    # flat at 10 MB for the first hour, then 1 MB more every 6 minutes: 10 MB an hour
    samples = [_sample(t, 10.0 if t <= 3600 else 10.0 + (t - 3600) / 360)
               for t in range(0, 7201, 360)]

    (memory,) = [r for r in soak_summary(samples) if r.name == "server memory (MB)"]
    (active,) = [r for r in soak_summary(samples) if r.name == "active"]

    assert memory.values == (10.0, 10.0, 20.0)
    assert memory.slope_per_hour == pytest.approx(10.0)
    assert active.values == (7, 7, 7) and active.slope_per_hour == 0 and active.whole


def test_a_run_fails_on_a_stopped_process_a_broken_invariant_or_a_traceback_only() -> None:
    clean = SoakResult("redis 7", 2, [_sample(0, 1), _sample(60, 500)],
                       logs={"replica-1": {"traceback": 0, "error": 3, "warning": 9}})
    assert clean.failed == []  # growth and logged errors are reported, not judged

    unchecked = SoakResult("redis 7", 2, [_sample(0, 1, checked=False)])
    assert unchecked.failed == []

    broken = SoakResult("redis 7", 2, [_sample(0, 1), _sample(30, 1, ["node n1 has 2 users"])],
                        exited={"simulator": 1},
                        logs={"replica-2": {"traceback": 2, "error": 2, "warning": 0}})
    assert broken.failed == [
        "simulator stopped (exit 1)",
        "invariants broken in 1 of 2 samples, first at 30 s: node n1 has 2 users",
        "replica-2: 2 traceback(s) in its log"]
    assert [s.t_s for s in broken.broken] == [30]
    assert json.loads(json.dumps(broken.as_json()))["failed"] == broken.failed


def test_only_a_node_the_api_and_the_pool_disagree_on_past_reconciliation_fails() -> None:
    def at(t_s: float, unknown_to_pool: list[str], unknown_to_api: list[str]) -> Sample:
        return Sample(t_s=t_s, memory_mb=1, keys=1, sizes={}, rss_mb={}, stats={},
                      problems=[], checked=True, unknown_to_pool=unknown_to_pool,
                      unknown_to_api=unknown_to_api)

    step = soak.LASTING_S / 2
    result = SoakResult("redis 7", 2, [
        at(0, ["n-creating"], ["n-gone"]),
        at(step, ["n-leaked"], ["n-gone"]),  # n-creating was registered: it was in flight
        at(2 * step, ["n-leaked", "n-creating"], ["n-gone"]),  # n-gone: LASTING_S by now
        at(3 * step, ["n-leaked"], []),  # n-leaked: LASTING_S; n-creating again, not lasting
        at(4 * step, [], ["n-leaked"]),  # on the other side now: not the same disagreement
    ])
    assert result.failed == [
        f"node n-gone unknown to the API for {soak.LASTING_S:.0f} s",
        f"node n-leaked unknown to the pool for {soak.LASTING_S:.0f} s"]
    assert len(result.disagreed) == 5  # every sample, lasting or not


def test_a_bad_boot_delay_or_json_folder_is_refused_before_anything_starts(
        tmp_path: Path) -> None:
    from provisioner.cli import app

    runner = CliRunner()
    bad_delay = runner.invoke(app, ["bench", "soak", "--boot-delay", "sometimes"])
    assert bad_delay.exit_code == 2 and "--boot-delay" in bad_delay.output
    no_folder = runner.invoke(app, ["bench", "soak", "--json", str(tmp_path / "no" / "f.json")])
    assert no_folder.exit_code == 2 and "no folder" in no_folder.output
    bad_mock = runner.invoke(app, ["bench", "soak", "--mock-options", "--latency soon"],
                             env={"COLUMNS": "300"})
    assert bad_mock.exit_code == 2 and "mock-node-api: Invalid value for '--latency'" in (
        bad_mock.output), bad_mock.output


@pytest.mark.e2e
def test_a_short_soak_samples_the_running_stack_and_stops_every_process(
        tmp_path: Path) -> None:
    from provisioner.cli import app

    out = tmp_path / "soak.json"
    result = CliRunner().invoke(app, [
        "bench", "soak", "--minutes", "0.3", "--every", "3", "--replicas", "2",
        "--arrival-rate", "600", "--kill-every", "7", "--json", str(out),
        "--mock-options", "--answer-latency 0.5"])

    assert result.exit_code == 0, result.output
    run = json.loads(out.read_text())
    assert run["failed"] == [] and run["exited"] == {}
    # killed at 7 and 14 s (replica-1, replica-2): neither counts as stopped, both run again
    assert run["kills"] == 2 and "2 replica(s) killed and started again" in result.output
    samples = run["samples"]
    assert len(samples) >= 5 and samples[-1]["t_s"] >= 18
    assert samples[0]["rss_mb"]["replica-1"] > 0 and samples[-1]["rss_mb"]["replica-2"] > 0
    assert all(s["api_nodes"] >= 0 for s in samples)
    assert any(s["checked"] for s in samples)  # one loop and client serve every check
    assert samples[-1]["stats"]["activities"] > 0 and samples[-1]["sizes"]["active"] > 0
    assert any(s["checked"] for s in samples)
    assert set(samples[-1]["rss_mb"]) >= {"server", "mock-node-api", "replica-1", "simulator"}
    assert set(run["logs"]) == {"mock-node-api", "replica-1", "replica-2", "simulator"}
    assert "server memory (MB)" in result.output
    assert " (--answer-latency 0.5)  replicas' metrics" in result.output, result.output
    checked = sum(s["checked"] for s in samples)
    assert (f"invariants checked in {checked} of {len(samples)} samples" in result.output
            and "broken in 0;" in result.output), result.output
    for name in ("replica-1", "replica-2"):  # each started twice, logging on to one file
        log = (Path(run["logdir"]) / f"{name}.log").read_text()
        assert log.count(f"replica {name} running pool") == 2, log
    # every process the stack started was stopped and reaped
    assert set(run["pids"]) == set(run["logs"])
    for pid in run["pids"].values():
        assert not Path(f"/proc/{pid}").exists()


@pytest.mark.e2e
def test_a_soak_with_writes_refused_for_a_while_loses_no_event(tmp_path: Path) -> None:
    """The server refuses every write for 14 s (maxmemory 1), longer than the 10 s a replica
    held a refused batch before it held one for --event-hold: no replica drops an event, the
    soak says when the writes were refused, and the invariants hold."""
    from provisioner.cli import app

    out = tmp_path / "soak.json"
    result = CliRunner().invoke(app, [
        "bench", "soak", "--minutes", "0.5", "--every", "5", "--replicas", "2",
        "--arrival-rate", "600", "--refuse-writes-at", "4", "--refuse-writes-for", "14",
        "--json", str(out)], env={"COLUMNS": "300"})

    assert result.exit_code == 0, result.output
    run = json.loads(out.read_text())
    assert run["failed"] == []
    start, end = run["refused"]
    assert 4 <= start < 5 and 18 <= end < 19.5, run["refused"]
    assert run["dropped"] == {"replica-1": 0, "replica-2": 0}, run["dropped"]
    assert (f"the server refused writes (maxmemory 1) from {start:.0f} s to {end:.0f} s; events "
            "dropped by the replicas over the run: replica-1 0, replica-2 0") in result.output


def test_a_refusal_first_looked_at_past_its_window_still_refuses_and_leaves_no_spin(
        sync_redis: redis.Redis) -> None:
    """The run's loop looks at the refusal between samples and kills: one that took longer
    than the refusal (a sample waiting on a replica being restarted) first looked at it past
    its end. It was never started, said nothing, and its next change stayed in the past, so
    the loop slept 0 s a turn for the rest of the run, spinning a core beside the replicas
    it measures."""
    refusal = soak._Refusal(sync_redis, 10.0, 2.0, 0.0)
    try:
        refusal.turn(12.5)  # the first look, 2.5 s after the refusal was due
        assert sync_redis.config_get("maxmemory")["maxmemory"] == "1", "never refused"
        assert refusal.spans == [12.5]
        assert refusal.next_change() > 12.5, "a change in the past: the loop sleeps 0 s a turn"
        refusal.turn(refusal.next_change())
        assert len(refusal.spans) == 2
        assert refusal.spans[1] - refusal.spans[0] == pytest.approx(2.0)
    finally:
        refusal.end(100.0)
    assert sync_redis.config_get("maxmemory")["maxmemory"] == "0"
    assert refusal.next_change() == float("inf")
