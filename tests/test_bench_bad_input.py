"""`provisioner bench` given input it cannot use: a clear error and a non-zero exit, never a
traceback, a hang, a file its own tools refuse, or a figure silently wrong. Found by a review
that probed every subcommand; each test failed on the code before its fix."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from provisioner.bench.baselines import StaticPolicy
from provisioner.bench.bound import windows
from provisioner.bench.features import samples
from provisioner.bench.generate import SHAPES
from provisioner.bench.generate import write_trace as generate
from provisioner.bench.trace import TraceError, load_trace
from provisioner.bench.world import run_replay
from provisioner.cli import app
from provisioner.config import MAX_NODES_LIMIT
from provisioner.events import ID_PATTERN
from provisioner.model import FORMAT as MODEL_FORMAT
from tests.test_bench_world import write_trace


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}")
    return result.exit_code, " ".join(result.output.split())


def stdout_of(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    return result.stdout


def strict_json(text: str) -> object:
    def refuse(name: str) -> object:
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def row(policy: str, **changes: object) -> dict[str, object]:
    base: dict[str, object] = {"trace": "t", "policy": policy, "detail": "", "connects": 100,
                               "misses": 0, "node_hours": 2.0, "busy_hours": 1.5,
                               "cost_ratio": 2.0 / 1.5}
    return base | changes


# --- traces -------------------------------------------------------------------------------


def test_a_gzip_trace_damaged_inside_is_a_trace_error(tmp_path: Path) -> None:
    good = write_trace(tmp_path / "t.jsonl.gz", [(1.0, "connect", "u1")])
    data = bytearray(good.read_bytes())
    data[30] ^= 0xFF  # inside the deflate stream: zlib.error, not an OSError
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(TraceError, match=r"bad\.jsonl\.gz"):
        load_trace(bad)
    code, output = invoke("bench", "replay", str(bad), "--policy", "static-1")
    assert code == 2 and "bad.jsonl.gz" in output, output


def test_an_event_after_the_traces_duration_is_refused(tmp_path: Path) -> None:
    """The books close at duration_s (FORMAT.md): an event after it was replayed cold and, with
    --warm-up, put the copies out of time order, so the scored play's connects were lost."""
    path = write_trace(tmp_path / "late.jsonl", [(10.0, "connect", "u1"),
                                                 (100.0, "disconnect", "u1")], duration=50.0)
    with pytest.raises(TraceError, match=r"late.jsonl:3: event at t=100.0 is after the trace's "
                                         r"duration_s 50"):
        load_trace(path)
    at_the_end = write_trace(tmp_path / "end.jsonl", [(50.0, "connect", "u1")], duration=50.0)
    assert len(load_trace(at_the_end).events) == 1


def test_a_trace_longer_than_31_days_is_refused(tmp_path: Path) -> None:
    """A replay ticks through every second: 10^9 s of an empty trace ran for days."""
    with pytest.raises(TraceError, match="duration_s must be at most 2678400"):
        load_trace(write_trace(tmp_path / "long.jsonl", [], duration=1e9))
    assert load_trace(write_trace(tmp_path / "month.jsonl", [], duration=2_678_400.0))


def test_warm_up_keeps_the_scored_play_and_every_user_id_the_contract_allows(
    tmp_path: Path,
) -> None:
    """A 128-character id, allowed, became 131 with the warm-up's suffix: the service dropped
    its events and the replay blamed the policy."""
    long_a, long_b = "a" * 128, "a" * 127 + "b"
    trace = load_trace(write_trace(tmp_path / "t.jsonl", [
        (10.0, "connect", long_a), (20.0, "connect", long_b), (50.0, "disconnect", long_a),
        (60.0, "disconnect", long_b), (70.0, "connect", "u1")]))
    warm = trace.warmed_up(2)
    ids = {e.msg["user_id"] for e in warm.events}
    assert all(ID_PATTERN.match(i) for i in ids)
    # distinct per user and per copy (u1's session is open at the end: warm-up copies leave
    # it out)
    assert len(ids) == 2 * 3 + 1
    assert {e.msg["user_id"] for e in warm.events[-5:]} == {long_a, long_b, "u1"}  # scored play
    assert run_replay(warm, StaticPolicy(2)).connects == run_replay(trace,
                                                                    StaticPolicy(2)).connects
    scores = stdout_of("bench", "replay", str(tmp_path / "t.jsonl"), "--json", "--warm-up", "1")
    assert json.loads(scores)["connects"] == 3


def test_a_suite_refuses_two_traces_of_one_name_before_any_replay(tmp_path: Path) -> None:
    traces = tmp_path / "traces"
    traces.mkdir()
    write_trace(traces / "tiny.jsonl", [(1.0, "connect", "u1")])
    write_trace(traces / "tiny.jsonl.gz", [(1.0, "connect", "u1")])
    code, output = invoke("bench", "suite", str(traces), "--policy", "static-best",
                          "--policy", "static-2", "--out", str(tmp_path / "out"))
    assert code == 2 and "both named 'tiny'" in output, output
    assert not (tmp_path / "out" / "results.json").exists()


def test_check_names_an_unreadable_trace_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "steady.jsonl.gz").write_bytes(b"")
    code, output = invoke("bench", "check", str(tmp_path))
    assert code == 2 and "steady.jsonl.gz: empty file" in output, output


def test_generate_writes_the_same_bytes_for_the_same_seed(tmp_path: Path) -> None:
    """The gzip header held the time of writing: the help's "the same seed writes the same
    files" held for the text only."""
    shape = SHAPES["constant"]
    digests = []
    for run in ("a", "b"):
        path = tmp_path / f"{run}.jsonl.gz"
        generate(shape, 7, path)
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


# --- options --------------------------------------------------------------------------------


def test_set_is_refused_for_a_run_without_the_service(tmp_path: Path) -> None:
    """A baseline ignores the service's settings: the replay ran, and a suite's notes said
    the service ran with them."""
    (tmp_path / "traces").mkdir()
    trace = write_trace(tmp_path / "traces" / "t.jsonl", [(1.0, "connect", "u1")])
    code, output = invoke("bench", "replay", str(trace), "--policy", "static-2",
                          "--set", "buffer_sd=9", "--json")
    assert code == 2 and "--set" in output, output
    code, output = invoke("bench", "suite", str(tmp_path / "traces"), "--policy", "static-2",
                          "--set", "buffer_sd=9", "--out", str(tmp_path / "out"))
    assert code == 2 and "--set" in output, output


def test_settings_the_service_refuses_with_a_traces_quota_are_refused(tmp_path: Path) -> None:
    """`min_ready` above a trace's `max_nodes` replayed (the scripts capped the creates at the
    quota), where the service refuses to start with it; a suite refuses before any replay."""
    (tmp_path / "traces").mkdir()
    small = write_trace(tmp_path / "traces" / "small.jsonl", [(1.0, "connect", "u1")],
                        max_nodes=3)
    write_trace(tmp_path / "traces" / "big.jsonl", [(1.0, "connect", "u1")], max_nodes=30)
    code, output = invoke("bench", "replay", str(small), "--set", "min_ready=5", "--json")
    assert code == 2 and "small: with the trace's quota, max_nodes=3" in output, output
    assert "min_ready must not exceed max_nodes" in output, output
    code, output = invoke("bench", "suite", str(tmp_path / "traces"), "--policy", "provisioner",
                          "--set", "min_ready=5", "--out", str(tmp_path / "out"))
    assert code == 2 and "max_nodes=3" in output, output
    assert not (tmp_path / "out").exists()
    # Within the quota it runs, and so do baselines, which take no settings.
    code, output = invoke("bench", "replay", str(small), "--set", "min_ready=3", "--json")
    assert code == 0, output
    (tmp_path / "traces" / "empty.jsonl").write_bytes(b"")
    code, output = invoke("bench", "suite", str(tmp_path / "traces"), "--policy", "provisioner",
                          "--out", str(tmp_path / "out"))
    assert code == 2 and "empty.jsonl: empty file" in output, output


def test_a_traces_quota_outside_the_services_range_is_replayed_not_refused(
        tmp_path: Path) -> None:
    """FORMAT.md bounds no `max_nodes`, and the loader takes any of 0 and more: a quota of 0
    (every create fails) or above the service's MAX_NODES_LIMIT was refused under the default
    policy as an "Invalid value for --set" no one gave, where the baselines replayed it. The
    pool keeps to its range; the world holds the creates to the trace's quota."""
    events = [(1.0, "connect", "u1"), (50.0, "connect", "u2"), (60.0, "disconnect", "u2")]
    for max_nodes in (0, MAX_NODES_LIMIT + 1):
        trace = write_trace(tmp_path / f"q{max_nodes}.jsonl", events, max_nodes=max_nodes)
        scores = strict_json(stdout_of("bench", "replay", str(trace), "--json"))
        assert isinstance(scores, dict)
        baseline = strict_json(stdout_of("bench", "replay", str(trace), "--policy", "static-1",
                                         "--json"))
        assert isinstance(baseline, dict)
        assert scores["connects"] == baseline["connects"] == 2, scores
        if max_nodes == 0:  # two misses, both abandoned: u2 left waiting, u1 waits at the end
            for figures in (scores, baseline):
                assert (figures["misses"], figures["abandoned"], figures["nodes_created"],
                        figures["node_hours"]) == (2, 2, 0, 0.0), figures
        else:
            assert scores["nodes_created"] >= 1 and scores["abandoned"] == 0, scores


def test_a_trace_name_like_rich_markup_is_shown_as_it_is(tmp_path: Path) -> None:
    """FORMAT.md leaves a trace's name free: `bad[/]name` raised rich's MarkupError after the
    replay (a traceback, exit 1, the scores lost) and `[bold]x` was shown as `x`; a suite's
    progress line and table did the same, and a user id like markup quoted in its error."""
    (tmp_path / "traces").mkdir()
    for file, name in (("close", "bad[/]name"), ("bold", "[bold]loud")):
        path = write_trace(tmp_path / "traces" / f"{file}.jsonl", [(1.0, "connect", "u1")])
        header, *events = path.read_text().splitlines()
        path.write_text("\n".join([json.dumps(json.loads(header) | {"name": name}), *events]))
        code, output = invoke("bench", "replay", str(path), "--policy", "static-1")
        assert code == 0 and f"{name} under static-1" in output, output
    code, output = invoke("bench", "suite", str(tmp_path / "traces"), "--policy", "static-1",
                          "--out", str(tmp_path / "out"))
    assert code == 0 and "bad[/]name" in output and "[bold]loud" in output, output
    (tmp_path / "ids").mkdir()
    write_trace(tmp_path / "ids" / "id.jsonl", [(1.0, "connect", "u[/]1")])
    code, output = invoke("bench", "suite", str(tmp_path / "ids"), "--policy", "static-1",
                          "--out", str(tmp_path / "out2"))
    assert code == 2 and "user_id 'u[/]1' is not an id" in output, output




@pytest.mark.parametrize("shift_s", [3600, -86_400])
def test_activity_timestamps_off_epoch_plus_t_are_replayed_and_said(
        tmp_path: Path, shift_s: int) -> None:
    """FORMAT.md puts an activity's timestamp at epoch + t. One written by another clock is
    published as the trace holds it, and the service's scores move with it (the baselines read
    none): a review saw 12 misses of 20 become 16, an hour ahead with one log line, a day
    behind with none. The replay goes on, the traffic being the trace's, and says so; the
    recorded traces, a second early at most, are not named."""
    events = [(float(t), "activity", f"u{t % 5}") for t in range(1, 60)]
    events += [(60.0, "connect", "u1"), (80.0, "disconnect", "u1")]
    kept = write_trace(tmp_path / "kept.jsonl", events)
    code, output = invoke("bench", "replay", str(kept), "--policy", "static-1")
    assert code == 0 and "note:" not in output, output
    header, *lines = kept.read_text().splitlines()
    moved = []
    for line in lines:
        event = json.loads(line)
        if event["ch"] == "user:activity":
            event["msg"]["timestamp"] += shift_s
        moved.append(json.dumps(event))
    shifted = tmp_path / "shifted.jsonl"
    shifted.write_text("\n".join([header, *moved]) + "\n")
    code, output = invoke("bench", "replay", str(shifted), "--policy", "static-1")
    assert code == 0, output
    assert (f"note: 59 of 59 activity timestamps are more than 1 s from epoch + t, where "
            f"FORMAT.md puts them (up to {abs(shift_s)} s)") in output, output


def test_whole_numbers_written_as_floats_and_a_byte_order_mark_are_the_same_trace(
        tmp_path: Path) -> None:
    """A writer that keeps every number a float writes `epoch` 1767225600.0, `max_nodes` 10.0
    and whole-second timestamps as 1767225610.0, and some editors put a byte-order mark first:
    FORMAT.md's integers all the same, refused before (a review). The trace so written
    replays as the one of integers, under the service too, which takes such a timestamp."""
    events = [(float(t), "activity", f"u{t % 4}") for t in range(1, 40)]
    events += [(40.0, "connect", "u1"), (45.0, "connect", "u2"), (70.0, "disconnect", "u1")]
    plain = write_trace(tmp_path / "plain.jsonl", events)
    header, *lines = plain.read_text().splitlines()
    floats = json.loads(header)
    floats["epoch"] = float(floats["epoch"])
    floats["nodes"]["max_nodes"] = float(floats["nodes"]["max_nodes"])
    written = [json.dumps(floats)]
    for line in lines:
        event = json.loads(line)
        if event["ch"] == "user:activity":
            event["msg"]["timestamp"] = float(event["msg"]["timestamp"])
        written.append(json.dumps(event))
    assert '"max_nodes": 10.0' in written[0] and ".0}}" in written[1]
    other = tmp_path / "other.jsonl"
    other.write_text("\ufeff" + "\n".join(written) + "\n", encoding="utf-8")
    for policy in ("static-1", "provisioner"):
        scores = [strict_json(stdout_of("bench", "replay", str(path), "--policy", policy,
                                        "--json")) for path in (plain, other)]
        assert scores[0] == scores[1], (policy, scores)
    for bad, said in ((10.5, "nodes.max_nodes must be a non-negative integer, got 10.5"),
                      (True, "nodes.max_nodes must be a non-negative integer, got True")):
        floats["nodes"]["max_nodes"] = bad
        other.write_text("\n".join([json.dumps(floats), *written[1:]]) + "\n")
        code, output = invoke("bench", "replay", str(other), "--policy", "static-1")
        assert code == 2 and said in output, output


def test_a_model_the_pool_refuses_is_a_clear_error(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.jsonl", [(1.0, "connect", "u1")])
    model = tmp_path / "m.json"
    model.write_text(json.dumps({"format": MODEL_FORMAT, "fields": {"bogus": 1}}))
    code, output = invoke("bench", "replay", str(trace), "--model", str(model))
    assert code == 2 and "the pool refused it" in output and "bogus" in output, output


def test_a_price_per_miss_that_is_not_a_number_is_refused(tmp_path: Path) -> None:
    traces = tmp_path / "traces"
    traces.mkdir()
    write_trace(traces / "t.jsonl", [(1.0, "connect", "u1"), (30.0, "disconnect", "u1")],
                duration=600.0)
    out = tmp_path / "out"
    assert invoke("bench", "suite", str(traces), "--policy", "static-best", "--policy",
                  "static-2", "--out", str(out))[0] == 0
    for theta in ("nan", "inf"):
        code, output = invoke("bench", "oracle-bar", str(traces), "--results", str(out),
                              "--policy", "static-2", "--theta", theta, "--sim-seconds", "1000",
                              "--jobs", "1", "--json")
        assert code == 2 and "--theta" in output, output


def test_features_takes_no_sample_at_a_time_that_is_not_a_number(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t.jsonl", [(1.0, "activity", "u1")], duration=600.0)
    code, output = invoke("bench", "features", str(path), "--step", "inf")
    assert code == 2, output
    assert all(math.isfinite(s.age_s) for s in samples(load_trace(path), 30.0, 86400.0))


# --- the rate oracle's windows --------------------------------------------------------------


def test_the_rate_oracle_reads_no_rate_from_a_trace_of_no_time_or_a_sliver_of_a_window(
    tmp_path: Path,
) -> None:
    """A 0 s trace divided by zero; a last window of 0.1 s read one connect as 10 a second,
    and the bands simulated for it ran past a minute."""
    empty = load_trace(write_trace(tmp_path / "empty.jsonl", [], duration=0.0))
    assert [(w.length_s, w.connects) for w in windows(empty, 600.0)] == [(0.0, 0)]
    sliver = load_trace(write_trace(tmp_path / "sliver.jsonl", [(10.0, "connect", "u1"),
                                                                (599.95, "connect", "u2")],
                                    duration=600.0))
    assert [(w.start_s, round(w.length_s, 6), w.connects)
            for w in windows(sliver, 599.9)] == [(0.0, 600.0, 2)]
    assert [(w.start_s, w.length_s) for w in windows(sliver, 400.0)] == [(0.0, 400.0),
                                                                        (400.0, 200.0)]
    code, output = invoke("bench", "bound", str(tmp_path / "empty.jsonl"), "--jobs", "1",
                          "--sim-seconds", "1000")
    assert code == 0, output
    code, output = invoke("bench", "bound", str(tmp_path / "sliver.jsonl"), "--window", "599.9",
                          "--jobs", "1", "--sim-seconds", "1000")
    assert code == 0, output


# --- results files --------------------------------------------------------------------------


def test_a_replay_with_no_busy_time_writes_strict_json_that_bar_reads_back(
    tmp_path: Path,
) -> None:
    """Node time with no busy time is an infinite cost ratio: written as `Infinity`, it made
    the file unreadable to every later --append-to, bar and compare."""
    idle = write_trace(tmp_path / "idle.jsonl", [], duration=600.0)
    busy = write_trace(tmp_path / "busy.jsonl", [(1.0, "connect", "u1")], duration=600.0)
    results = tmp_path / "results.json"
    for trace in (idle, busy):
        code, output = invoke("bench", "replay", str(trace), "--policy", "static-2",
                              "--append-to", str(results))
        assert code == 0, output
    rows = strict_json(results.read_text())
    assert isinstance(rows, list) and rows[0]["cost_ratio"] is None
    assert rows[1]["trace"] == "busy" and math.isfinite(rows[1]["cost_ratio"])
    traces = tmp_path / "traces"
    traces.mkdir()
    idle.rename(traces / "idle.jsonl")
    out = tmp_path / "out"
    assert invoke("bench", "suite", str(traces), "--policy", "static-best", "--policy",
                  "static-2", "--out", str(out))[0] == 0
    strict_json((out / "results.json").read_text())
    verdicts = strict_json(stdout_of("bench", "bar", str(out), "--policy", "static-2",
                                     "--json"))
    assert isinstance(verdicts, dict)
    [verdict] = verdicts["results"][0]["traces"]
    assert verdict["cost_ratio"] is None and verdict["failed"] == ["cost"]
    code, output = invoke("bench", "compare", str(out / "results.json"),
                          str(out / "results.json"), "--policy", "static-2")
    assert code == 2 and "no busy time" in output, output


def test_bar_refuses_a_row_that_contradicts_itself(tmp_path: Path) -> None:
    bad = {"busy > node": row("provisioner", busy_hours=3.0, cost_ratio=2 / 3),
           "cost not node / busy": row("provisioner", cost_ratio=1.2),
           "cost with no time": row("provisioner", node_hours=0.0, busy_hours=0.0),
           "fraction": row("provisioner", connects=100.7),
           "null cost": row("provisioner", cost_ratio=None)}
    for what, broken in bad.items():
        (tmp_path / "results.json").write_text(json.dumps([row("static-best", detail="K=3"),
                                                           broken]))
        code, output = invoke("bench", "bar", str(tmp_path))
        assert code == 2, (what, output)


def test_bar_counts_one_results_file_once(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps([row("static-best", detail="K=3"),
                                                       row("provisioner")]))
    code, output = invoke("bench", "bar", str(tmp_path), str(tmp_path / "results.json"))
    assert code == 2 and "given twice" in output, output
    code, output = invoke("bench", "bar", str(tmp_path), "--json")
    assert code == 0 and json.loads(output)["judged"] == 1


def test_a_results_file_is_paired_with_a_file_and_a_folder_with_a_folder(
    tmp_path: Path,
) -> None:
    """A file was keyed by its name, `results.json`, and so paired with the top-level file of
    the folder on the other side: another draw, judged as the same replays."""
    recorded, draw = tmp_path / "recorded", tmp_path / "recorded" / "draw-7"
    draw.mkdir(parents=True)
    for folder, cost in ((recorded, 1.2), (draw, 1.4)):
        (folder / "results.json").write_text(json.dumps([
            row("static-best", detail="K=3", node_hours=1.5 * cost, cost_ratio=cost),
            row("provisioner")]))
    for before, after in ((recorded, draw / "results.json"), (draw / "results.json", recorded)):
        code, output = invoke("bench", "compare", str(before), str(after))
        assert code == 2 and "a folder with a folder" in output, output
    code, output = invoke("bench", "bar", str(draw / "results.json"), "--static-from",
                          str(recorded))
    assert code == 2 and "a folder with a folder" in output, output
    # two files are paired with each other, whatever their names
    other = tmp_path / "screen.json"
    other.write_text(json.dumps([row("provisioner")]))
    code, output = invoke("bench", "bar", str(other), "--static-from",
                          str(draw / "results.json"), "--json")
    assert code == 0, output
    assert json.loads(output)["results"][0]["traces"][0]["static_cost_ratio"] == 1.4


def test_rows_of_another_boot_draw_or_warm_up_are_not_the_same_replay(tmp_path: Path) -> None:
    """The connects depend only on the users, so equal connects could not tell two draws of
    boots apart: `compare` paired draw 997 with draw 1994 as if the same replays. New rows say
    their draw and warm-up; rows that do not (written before) are paired as before."""
    traces = tmp_path / "traces"
    traces.mkdir()
    write_trace(traces / "t.jsonl", [(1.0, "connect", "u1"), (30.0, "disconnect", "u1")],
                duration=600.0)
    for name, offset in (("a", "0"), ("b", "1")):
        assert invoke("bench", "suite", str(traces), "--policy", "static-best", "--policy",
                      "static-2", "--boot-offset", offset, "--out", str(tmp_path / name))[0] == 0
    rows = strict_json((tmp_path / "b" / "results.json").read_text())
    assert isinstance(rows, list) and {(r["boot_offset"], r["warm_up"]) for r in rows} == {(1, 0)}
    code, output = invoke("bench", "compare", str(tmp_path / "a"), str(tmp_path / "b"),
                          "--policy", "static-2")
    assert code == 2 and "boot_offset 0 against 1: not the same replay" in output, output
    code, output = invoke("bench", "bar", str(tmp_path / "b"), "--policy", "static-2",
                          "--static-from", str(tmp_path / "a"))
    assert code == 2 and "not the same replay" in output, output
    appended = tmp_path / "appended.json"
    assert invoke("bench", "replay", str(traces / "t.jsonl"), "--policy", "static-2",
                  "--warm-up", "1", "--append-to", str(appended))[0] == 0
    rows = strict_json(appended.read_text())
    assert isinstance(rows, list) and (rows[0]["boot_offset"], rows[0]["warm_up"]) == (0, 1)
    for folder in ("a", "b"):  # rows that do not say their draw are paired as before
        path = tmp_path / folder / "results.json"
        path.write_text(json.dumps([{k: v for k, v in r.items() if k not in ("boot_offset",
                                                                            "warm_up")}
                                    for r in json.loads(path.read_text())]))
    assert invoke("bench", "compare", str(tmp_path / "a"), str(tmp_path / "b"),
                  "--policy", "static-2")[0] == 0
