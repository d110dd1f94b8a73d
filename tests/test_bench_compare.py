"""Two result sets compared replay by replay: the totals, the standard errors, the pairing."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from provisioner.bench.bar import BarError
from provisioner.bench.compare import compare, load_tree, paired
from provisioner.cli import app


def _row(trace: str, misses: int, cost: float, *, policy: str = "provisioner",
         connects: int = 200) -> dict[str, Any]:
    return {"trace": trace, "policy": policy, "detail": "", "connects": connects,
            "misses": misses, "miss_rate": misses / connects, "node_hours": cost * 40.0,
            "busy_hours": 40.0, "cost_ratio": cost}


def test_the_standard_error_comes_from_the_spread_of_the_differences() -> None:
    # differences 1, -1, 3: total 3, mean 1, sample variance (0 + 4 + 4) / 2 = 4
    result = paired([0, 1, 2], [1, 0, 5])
    assert (result.n, result.before, result.after, result.difference) == (3, 3, 6, 3)
    assert result.se_total == pytest.approx(math.sqrt(3 * 4))
    assert result.se_mean == pytest.approx(math.sqrt(3 * 4) / 3)
    # the same shift on every pair is no noise at all; one pair has no spread to measure
    assert paired([1, 2, 3], [3, 4, 5]).se_total == 0
    assert paired([1], [4]).se_total is None


def test_rows_pair_by_results_file_and_trace_and_the_rest_is_named() -> None:
    before = {"seed1": [_row("a", 2, 1.30), _row("b", 0, 1.40), _row("a", 0, 1.5,
                                                                       policy="static-best")],
              "seed2": [_row("a", 1, 1.20)]}
    after = {"seed1": [_row("a", 1, 1.28), _row("c", 5, 1.10), _row("b", 1, 1.45)],
             "seed3": [_row("a", 0, 1.00)]}
    result = compare(before, after)
    assert result.pairs == ["seed1: a", "seed1: b"]  # static-best's row is not the policy's
    assert (result.misses.before, result.misses.after) == (2, 2)
    assert result.cost.difference == pytest.approx(-0.02 + 0.05)
    assert (result.cheaper, result.dearer, result.connects) == (1, 1, 400)
    assert result.unpaired == ["seed2: only before", "seed3: only after",
                               "seed1: c only after"]
    assert result.as_dict()["cost_difference"] == pytest.approx(0.015)


def test_rows_that_are_not_the_same_replay_are_refused() -> None:
    with pytest.raises(BarError, match="not the same replay"):
        compare({"s": [_row("a", 0, 1.3)]}, {"s": [_row("a", 0, 1.3, connects=199)]})
    with pytest.raises(BarError, match="nothing to compare"):
        compare({"s": [_row("a", 0, 1.3)]}, {"t": [_row("a", 0, 1.3)]})
    with pytest.raises(BarError, match="two rows for a"):
        compare({"s": [_row("a", 0, 1.3), _row("a", 1, 1.3)]}, {"s": [_row("a", 0, 1.3)]})


def _tree(root: Path, sets: dict[str, list[dict[str, Any]]]) -> Path:
    for name, rows in sets.items():
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(rows))
    return root


def test_bench_compare_reads_two_folders_of_suites(tmp_path: Path) -> None:
    old = _tree(tmp_path / "old", {".": [_row("steady", 2, 1.30)],
                                   "draw-997": [_row("steady", 0, 1.25)]})
    new = _tree(tmp_path / "new", {".": [_row("steady", 1, 1.28)],
                                   "draw-997": [_row("steady", 1, 1.24)]})
    assert sorted(load_tree(old)) == ["draw-997/results.json", "results.json"]
    out = CliRunner().invoke(app, ["bench", "compare", str(old), str(new)])
    assert out.exit_code == 0, out.output
    assert "2 pairs of provisioner (400 connects before)" in out.output
    # differences -1 and +1: sample variance 2, so sqrt(2 x 2) for the total
    assert "misses: 2 before, 2 after, +0 ± 2.0" in out.output
    assert "1.2750 before, 1.2600 after, -0.0150 ± 0.0050" in out.output
    assert "cost lower on 2 pairs, higher on 0" in out.output
    data = json.loads(CliRunner().invoke(app, ["bench", "compare", str(old), str(new),
                                               "--json"]).output)
    assert (data["pairs"], data["misses_difference"], data["unpaired"]) == (2, 0, [])
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = CliRunner().invoke(app, ["bench", "compare", str(old), str(empty)])
    # The error is laid out at 80 columns and the folder's path moves where it wraps: as user
    # `u` (/tmp/pytest-of-u/...) it broke "no results.json\nunder it" and failed this test.
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "no results.json under it" in said, refused.output


def test_a_trace_on_one_side_only_named_like_rich_markup_is_shown_as_it_is(
        tmp_path: Path) -> None:
    """FORMAT.md leaves a trace's name free, and `bench suite` writes it into its results as it
    is: named as not paired, `bad[/]name` was shown as `badname`, `[bold]loud` as `loud`, and
    `a[/b]c` raised rich's MarkupError after the totals (a traceback, exit 1, the rest of the
    names lost)."""
    names = ("bad[/]name", "[bold]loud", "a[/b]c")
    old = _tree(tmp_path / "old", {".": [_row("steady", 2, 1.30),
                                         *(_row(name, 1, 1.2) for name in names)]})
    new = _tree(tmp_path / "new", {".": [_row("steady", 1, 1.28)]})
    out = CliRunner().invoke(app, ["bench", "compare", str(old), str(new)])
    assert out.exit_code == 0, (out.output, out.exception)
    for name in names:
        assert f"not paired: results.json: {name} only before" in out.output, out.output
