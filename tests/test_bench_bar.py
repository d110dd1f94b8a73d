"""Issue 4's bar judged from suite results: each half, its limits, and bad input refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from provisioner.bench.bar import (
    BarError,
    idle_limit_hours,
    judge,
    load_results,
    markdown_by_trace,
    markdown_grid,
    summarize_by_trace,
    with_static_best,
)
from provisioner.cli import app


def _row(trace: str, policy: str, *, connects: int = 200, misses: int = 0,
         cost: float = 1.3, idle: float = 10.0, detail: str = "") -> dict[str, Any]:
    """A row of this cost ratio and idle time, its node and busy hours made to agree with
    both (the bar refuses a cost ratio that is not node / busy hours)."""
    assert cost > 1 or idle == 0
    busy = idle / (cost - 1) if cost > 1 else 40.0
    return {"trace": trace, "policy": policy, "detail": detail, "connects": connects,
            "misses": misses, "miss_rate": misses / connects, "node_hours": busy + idle,
            "busy_hours": busy, "cost_ratio": cost}


def _pair(trace: str = "steady", **service: Any) -> list[dict[str, Any]]:
    """static-best at cost 1.332 with 10 idle hours, and the service as given."""
    return [_row(trace, "static-best", cost=1.332, idle=10.0,
                 detail="K=3"),
            _row(trace, "provisioner", **service)]


def test_a_trace_inside_every_limit_meets_the_bar() -> None:
    (verdict,) = judge(_pair(misses=1, cost=1.30))
    assert verdict.met and verdict.failed == ()
    assert verdict.static_cost_ratio == pytest.approx(1.332)
    assert verdict.cost_limit == pytest.approx(1.352)
    assert verdict.as_dict()["static_cost_ratio"] == pytest.approx(1.332)
    assert verdict.idle_limit is None  # steady: no idle half
    assert verdict.static_detail == "K=3"


def test_one_percent_of_misses_is_inside_the_bar_and_one_more_is_not() -> None:
    assert judge(_pair(connects=200, misses=2))[0].met
    assert judge(_pair(connects=200, misses=3))[0].failed == ("misses",)


def test_a_cost_exactly_at_static_best_plus_two_hundredths_meets_it() -> None:
    assert judge(_pair(cost=1.352))[0].met  # 1.332 + 0.02: the limit itself is inside
    assert judge(_pair(cost=1.353))[0].failed == ("cost",)


def test_idle_time_is_judged_only_where_traffic_changes_fast() -> None:
    # static-best idles 10 h, so the fast traces allow 5 h; the service idles 6 h.
    idle_six = {"idle": 6.0}
    (spike,) = judge(_pair("spike", **idle_six))
    assert spike.failed == ("idle",)
    assert (spike.idle_hours, spike.idle_limit) == (pytest.approx(6.0), pytest.approx(5.0))
    assert judge(_pair("steady", **idle_six))[0].met
    assert judge(_pair("steady", **idle_six), fast=("steady",))[0].failed == ("idle",)
    assert judge(_pair("diurnal", idle=5.0))[0].met


def test_every_failed_half_is_named() -> None:
    (verdict,) = judge(_pair("diurnal", connects=100, misses=5, cost=1.5, idle=20.0))
    assert verdict.failed == ("misses", "cost", "idle")
    assert verdict.as_dict()["failed"] == ["misses", "cost", "idle"]
    assert verdict.as_dict()["met"] is False


def test_traces_are_judged_in_order_and_those_the_policy_skipped_are_left_out() -> None:
    rows = [*_pair("steady"), *_pair("browsers", cost=1.4),
            _row("spike", "static-best"), _row("spike", "reactive")]
    verdicts = judge(rows)
    assert [(v.trace, v.met) for v in verdicts] == [("browsers", False), ("steady", True)]
    assert [v.trace for v in judge(rows, policy="reactive")] == ["spike"]


@pytest.mark.parametrize(("rows", "message"), [
    ([_row("steady", "provisioner")], "steady has no static-best row"),
    ([*_pair(), _row("steady", "provisioner")], "two rows for steady / provisioner"),
    ([_row("steady", "static-best")], "no row of policy 'provisioner'"),
    ([_row("steady", "static-best"), "not a row"], "row 2: a row must be an object"),
    ([{**_row("steady", "provisioner"), "cost_ratio": "1.3"}], "'cost_ratio' must be"),
    ([{**_row("steady", "provisioner"), "node_hours": float("nan")}], "'node_hours' must be"),
    ([{**_row("steady", "provisioner"), "misses": True}], "'misses' must be"),
    ([{**_row("steady", "provisioner"), "trace": ""}], "'trace' must be"),
    ([_row("steady", "provisioner", connects=2, misses=3)], "more misses than connects"),
])
def test_results_the_bar_cannot_judge_are_refused_by_name(rows: list[Any], message: str) -> None:
    with pytest.raises(BarError, match=message):
        judge(rows)


def test_results_load_from_the_file_or_its_folder_and_bad_files_are_refused(
        tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps(_pair()))
    assert load_results(tmp_path) == load_results(tmp_path / "results.json") == _pair()
    (tmp_path / "object.json").write_text("{}")
    with pytest.raises(BarError, match="expected a list of rows"):
        load_results(tmp_path / "object.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(BarError, match="not JSON"):
        load_results(tmp_path / "broken.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BarError, match=r"empty/results\.json"):
        load_results(tmp_path / "empty")


def test_bench_bar_prints_each_verdict_and_the_count(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "results.json").write_text(json.dumps(_pair("steady") + _pair("segments",
                                                                           cost=1.353)))
    (second / "results.json").write_text(json.dumps(_pair("spike", idle=6.0)))
    result = CliRunner().invoke(app, ["bench", "bar", str(first), str(second)])
    assert result.exit_code == 0, result.output
    assert "fails: cost" in result.output and "fails: idle" in result.output
    assert "met on 1 of 2" in result.output and "in all: met on 1 of 3" in result.output
    printed = CliRunner().invoke(app, ["bench", "bar", str(first), str(second), "--json"])
    report = json.loads(printed.stdout)
    assert (report["met"], report["judged"]) == (1, 3)
    assert [[t["trace"] for t in r["traces"]] for r in report["results"]] == [
        ["segments", "steady"], ["spike"]]


def test_bench_bar_refuses_unjudgeable_results_with_exit_code_2(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps([_row("steady", "provisioner")]))
    result = CliRunner().invoke(app, ["bench", "bar", str(tmp_path)])
    assert result.exit_code == 2
    assert "steady has no static-best row" in " ".join(result.output.split())


def test_a_screen_of_the_policy_alone_takes_static_best_from_another_result_set() -> None:
    committed = [*_pair("steady", cost=1.40), *_pair("spike")]
    # the screen ran the service alone, and its own static-best row is not the one judged by
    screen = [_row("steady", "provisioner", cost=1.353),
              _row("spike", "static-best", cost=9.0, detail="K=99"),
              _row("spike", "provisioner", cost=1.30, idle=4.0)]
    merged = with_static_best(screen, committed)
    assert [(r["trace"], r["policy"], r["cost_ratio"]) for r in merged] == [
        ("spike", "static-best", 1.332), ("spike", "provisioner", 1.30),
        ("steady", "static-best", 1.332), ("steady", "provisioner", 1.353)]
    assert [(v.trace, v.failed) for v in judge(merged)] == [("spike", ()),
                                                            ("steady", ("cost",))]


@pytest.mark.parametrize(("screen", "committed", "message"), [
    ([_row("steady", "provisioner", connects=201)], _pair("steady"), "not the same replay"),
    ([_row("segments", "provisioner")], _pair("steady"), "segments has no static-best row"),
    ([_row("steady", "reactive")], _pair("steady"), "no row of policy 'provisioner'"),
])
def test_a_screen_that_does_not_match_the_result_set_is_refused(
        screen: list[Any], committed: list[Any], message: str) -> None:
    with pytest.raises(BarError, match=message):
        with_static_best(screen, committed)


def _write(folder: Path, rows: list[Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(rows))


def test_bench_bar_judges_a_screen_tree_against_the_committed_tree(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Relative folders: the table's title names them, and an absolute path longer than the
    # table is broken inside a word ("res ults.json"): with a pytest base folder of 32
    # characters or more (/tmp/pytest-of-USER/pytest-0 for a USER of 8 letters) this failed.
    monkeypatch.chdir(tmp_path)
    committed, screen = Path("committed"), Path("screen")
    _write(committed, _pair("steady") + _pair("segments"))
    _write(committed / "seed1", _pair("spike"))
    _write(committed / "seed2", _pair("ramp"))  # not screened: left out
    _write(screen, [_row("steady", "provisioner"), _row("segments", "provisioner", cost=1.353)])
    _write(screen / "seed1", [_row("spike", "provisioner", idle=6.0)])
    result = CliRunner().invoke(app, ["bench", "bar", str(screen), "--static-from",
                                      str(committed)])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "fails: cost" in output and "fails: idle" in output
    assert "in all: met on 1 of 3" in output
    assert f"against {committed}'s static-best" in output
    printed = CliRunner().invoke(app, ["bench", "bar", str(screen), "--static-from",
                                       str(committed), "--json"])
    report = json.loads(printed.stdout)
    assert (report["met"], report["judged"], report["static_from"]) == (1, 3, str(committed))
    assert [r["source"] for r in report["results"]] == [
        str(screen / "results.json"), str(screen / "seed1" / "results.json")]
    # without the option a screen has no static-best rows to be judged by
    alone = CliRunner().invoke(app, ["bench", "bar", str(screen)])
    assert alone.exit_code == 2


def test_bench_bar_refuses_a_screen_file_the_result_set_lacks(tmp_path: Path) -> None:
    committed, screen = tmp_path / "committed", tmp_path / "screen"
    _write(committed, _pair("steady"))
    _write(screen / "seed9", [_row("steady", "provisioner")])
    result = CliRunner().invoke(app, ["bench", "bar", str(screen), "--static-from",
                                      str(committed)])
    assert result.exit_code == 2
    assert "no seed9/results.json to take" in " ".join(result.output.split())


def test_the_markdown_grid_has_a_row_per_trace_and_a_column_per_result_set() -> None:
    seed1 = judge(_pair("steady", misses=3, cost=1.36) + _pair("spike", idle=4.0))
    seed2 = judge(_pair("steady", misses=1, cost=1.30))
    lines = markdown_grid([("seed1", seed1), ("seed2", seed2)]).splitlines()
    assert lines[0] == "| trace | seed1 | seed2 | met |"
    assert lines[2] == "| spike | 0/200, 1.300, 4.0 h (K=3: 1.332) | — | 1 of 1 |"
    assert lines[3] == ("| steady | 3/200, 1.360 (K=3: 1.332) **misses, cost** "
                        "| 1/200, 1.300 (K=3: 1.332) | 1 of 2 |")


def test_a_markdown_grid_of_another_policy_names_it() -> None:
    rows = [*_pair("steady"), _row("steady", "rate-oracle-0.5", misses=4, cost=1.31)]
    oracle = judge(rows, policy="rate-oracle-0.5")
    lines = markdown_grid([("draw-997", oracle)]).splitlines()
    assert lines[0] == "| trace (rate-oracle-0.5) | draw-997 | met |"
    assert lines[2] == "| steady | 4/200, 1.310 (K=3: 1.332) **misses** | 0 of 1 |"
    assert markdown_grid([("draw-997", judge(rows))]).startswith("| trace | draw-997 |")


def test_bench_bar_prints_the_markdown_grid_and_the_count(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps(_pair("segments", cost=1.353)))
    result = CliRunner().invoke(app, ["bench", "bar", str(tmp_path), "--markdown"])
    assert result.exit_code == 0, result.output
    assert f"| trace | {tmp_path} | met |" in result.stdout
    assert "1.353 (K=3: 1.332) **cost** | 0 of 1 |" in result.stdout
    assert result.stdout.rstrip().endswith("met on 0 of 1")


def test_verdicts_are_summed_per_trace_name_over_result_sets() -> None:
    seed1 = judge(_pair("steady", misses=3, cost=1.36) + _pair("spike", idle=4.0))
    seed2 = judge(_pair("steady", misses=1, cost=1.30, idle=8.0))
    spike, steady = summarize_by_trace([("seed1", seed1), ("seed2", seed2)])
    assert (spike.trace, spike.judged, spike.met, spike.failed) == ("spike", 1, 1, {})
    assert (steady.judged, steady.met, steady.misses, steady.connects) == (2, 1, 4, 400)
    assert steady.mean_cost_ratio == pytest.approx(1.33)
    assert steady.mean_idle_hours == pytest.approx(9.0)  # (10 + 8) / 2
    assert steady.failed == {"misses": 1, "cost": 1}
    lines = markdown_by_trace([spike, steady]).splitlines()
    assert lines[3] == "| steady | 1 of 2 | 4/400 | 1.330 | 9.0 | misses 1, cost 1 |"
    assert lines[-1].startswith("| all | 2 of 3 | 4/600 |")


def test_bench_bar_by_trace_sums_every_results_file_given(tmp_path: Path) -> None:
    for seed, misses in (("seed1", 3), ("seed2", 0)):
        (tmp_path / seed).mkdir()
        (tmp_path / seed / "results.json").write_text(json.dumps(
            _pair("steady", misses=misses) + _pair("spike", idle=7.0)))
    folders = [str(tmp_path / "seed1"), str(tmp_path / "seed2")]
    result = CliRunner().invoke(app, ["bench", "bar", *folders, "--by-trace", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["met"], report["judged"], report["result_sets"]) == (1, 4, 2)
    spike, steady = report["by_trace"]
    assert (spike["trace"], spike["met"], spike["failed"]) == ("spike", 0, {"idle": 2})
    assert (steady["met"], steady["misses"], steady["failed"]) == (1, 3, {"misses": 1})
    shown = CliRunner().invoke(app, ["bench", "bar", *folders, "--by-trace", "--markdown"])
    assert "| steady | 1 of 2 | 3/400 | 1.300 | 10.0 | misses 1 |" in shown.stdout
    assert shown.stdout.rstrip().endswith("met on 1 of 4, over 2 result sets")


def test_bench_bar_by_trace_folds_a_wide_figure_instead_of_cutting_it(tmp_path: Path) -> None:
    for seed in ("seed1", "seed2"):
        (tmp_path / seed).mkdir()
        (tmp_path / seed / "results.json").write_text(json.dumps(
            _pair("a-trace-with-a-long-name", connects=60000, misses=700)))
    folders = [str(tmp_path / "seed1"), str(tmp_path / "seed2")]
    shown = CliRunner().invoke(app, ["bench", "bar", *folders, "--by-trace"],
                               env={"COLUMNS": "60"})
    assert shown.exit_code == 0, shown.output
    assert "…" not in shown.stdout
    misses = [line.split("│")[3].strip() for line in shown.stdout.splitlines()
              if line.count("│") == 7]  # the body's rows, the misses column
    assert "".join(misses) == "1400/120000"


def test_bench_bar_recursive_judges_every_results_file_under_a_folder(tmp_path: Path) -> None:
    (tmp_path / "draw").mkdir()
    (tmp_path / "results.json").write_text(json.dumps(_pair("steady")))
    (tmp_path / "draw" / "results.json").write_text(json.dumps(_pair("steady", misses=3)))
    top = CliRunner().invoke(app, ["bench", "bar", str(tmp_path), "--json"])
    assert json.loads(top.stdout)["judged"] == 1  # the folder's own results.json only
    every = CliRunner().invoke(app, ["bench", "bar", "-r", str(tmp_path), "--json"])
    assert every.exit_code == 0, every.output
    report = json.loads(every.stdout)
    assert (report["met"], report["judged"]) == (1, 2)
    assert [r["source"] for r in report["results"]] == [str(tmp_path / "draw"), str(tmp_path)]


def test_replays_appending_to_one_file_at_once_keep_every_row(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    import provisioner.bench.bar as bar
    from provisioner.bench.cli import append_row

    out = tmp_path / "results.json"
    out.write_text("[]")
    read = bar.load_results

    def slow_read(path: Path) -> list[Any]:
        rows = read(path)
        time.sleep(0.05)  # widen the gap between reading the file and writing it back
        return rows

    monkeypatch.setattr(bar, "load_results", slow_read)
    start = threading.Barrier(6)

    def add(i: int) -> None:
        start.wait()
        append_row(out, _row(f"trace-{i}", "provisioner"))

    threads = [threading.Thread(target=add, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(row["trace"] for row in load_results(out)) == [f"trace-{i}" for i in range(6)]
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left
    with pytest.raises(typer.BadParameter, match="has a row of trace-0 / provisioner already"):
        append_row(out, _row("trace-0", "provisioner"))


def test_the_idle_limit_is_the_idle_time_of_the_cost_bar_and_where_fast_half_of_static() -> None:
    static = _row("spike", "static-best", cost=1.25, idle=10.0)  # 50 node, 40 busy hours
    # node/busy <= 1.27 with 40 busy hours: at most 50.8 node-hours, 10.8 of them idle.
    assert idle_limit_hours(static, fast=False) == pytest.approx(10.8)
    # Where traffic changes fast, also at most half of static-best's 10 idle hours.
    assert idle_limit_hours(static, fast=True) == pytest.approx(5.0)


def _trace_file(path: Path, connects: int) -> Path:
    header = {"format": "provisioner-trace/1", "name": path.name.split(".")[0],
              "description": "hand-made", "epoch": 1_767_225_600, "duration_s": 1200.0,
              "seed": 0, "users": connects, "events": connects,
              "nodes": {"boot_delay_s": [30.0, 90.0], "api_latency_s": 0.2,
                        "terminate_delay_s": 5.0, "max_nodes": 20}}
    lines = [json.dumps(header)] + [
        json.dumps({"t": 60.0 * i, "ch": "user:connect", "msg": {"user_id": f"u{i}"}})
        for i in range(connects)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bench_oracle_bar_judges_the_oracle_at_one_price_beside_the_policy(
        tmp_path: Path) -> None:
    traces = tmp_path / "traces"
    traces.mkdir()
    _trace_file(traces / "steady.jsonl", 15)
    results = tmp_path / "results.json"
    results.write_text(json.dumps([
        _row("steady", "static-best", connects=15, cost=1.5, idle=2.0, detail="K=2"),
        _row("steady", "provisioner", connects=15, misses=1, cost=1.4, idle=1.6)]))
    result = CliRunner().invoke(app, ["bench", "oracle-bar", str(traces), "--results",
                                      str(results), "--theta", "0.5", "--sim-seconds", "1000",
                                      "--jobs", "1", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    (trace,) = out["traces"]
    assert trace["trace"] == "steady" and trace["connects"] == 15
    assert trace["idle_limit_hours"] == pytest.approx((1.52 - 1) * 4.0)
    # The policy is judged by the bar as `bench bar` judges it: 1 of 15 missed is over 1%.
    assert trace["verdict"]["met"] is False and out["policy_met"] == 0
    (oracle,) = trace["oracle"]
    assert oracle["theta"] == 0.5 and 0.0 <= oracle["chance_to_meet"] <= 1.0
    assert out["oracle_expected_met"] == [{"theta": 0.5,
                                           "met": pytest.approx(oracle["chance_to_meet"])}]


def test_bench_oracle_bar_refuses_a_trace_without_a_static_best_row(tmp_path: Path) -> None:
    traces = tmp_path / "traces"
    traces.mkdir()
    _trace_file(traces / "steady.jsonl", 3)
    _trace_file(traces / "other.jsonl", 3)
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_pair("steady")))
    result = CliRunner().invoke(app, ["bench", "oracle-bar", str(traces), "--results",
                                      str(results), "--sim-seconds", "1000"])
    assert result.exit_code == 2
    assert "no static-best row for other" in " ".join(result.output.split())


def test_bench_oracle_bar_refuses_results_of_other_traffic(tmp_path: Path) -> None:
    traces = tmp_path / "traces"
    traces.mkdir()
    _trace_file(traces / "steady.jsonl", 3)
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_pair("steady")))  # 200 connects, not 3
    result = CliRunner().invoke(app, ["bench", "oracle-bar", str(traces), "--results",
                                      str(results), "--sim-seconds", "1000", "--jobs", "1"])
    assert result.exit_code == 2
    assert "has 200 connects and the trace 3" in " ".join(result.output.split())


def test_idle_hours_exactly_at_half_of_static_best_meet_the_idle_half() -> None:
    # Binary-exact hours, so that the limit is the limit: static-best idles 30 - 20 = 10 h,
    # the fast trace allows 5; the service idles 25 - 20 = 5 h exactly, inside it (as the
    # cost half's limit itself is), and 25.5 - 20 = 5.5 h is not.
    static = {"trace": "spike", "policy": "static-best", "connects": 200, "misses": 0,
              "node_hours": 30.0, "busy_hours": 20.0, "cost_ratio": 1.5}
    at = {**static, "policy": "provisioner", "node_hours": 25.0, "cost_ratio": 1.25}
    (verdict,) = judge([static, at])
    assert (verdict.idle_hours, verdict.idle_limit) == (5.0, 5.0)
    assert verdict.met
    over = {**at, "node_hours": 25.5, "cost_ratio": 1.275}
    assert judge([static, over])[0].failed == ("idle",)
