"""`bench features`: browsing users sampled as the scripts see them, and the cuts scored."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from provisioner.bench.features import HINDSIGHT, Sample, measure, samples, score_cuts
from provisioner.bench.tickcost import AGES_MS, LEVELS
from provisioner.bench.trace import load_trace
from provisioner.cli import app
from tests.test_bench_world import write_trace


def _trace(tmp_path: Path) -> Path:
    # a: three requests, a session from 50 to 100, then one request after it.
    # b: a request at 0 and one at 500, after a silence the scripts forget (over 300 s).
    return write_trace(tmp_path / "users.jsonl", [
        (0.0, "activity", "a"), (0.0, "activity", "b"), (10.0, "activity", "a"),
        (20.0, "activity", "a"), (20.4, "activity", "a"),  # the same second: counted once
        (50.0, "connect", "a"), (100.0, "disconnect", "a"), (400.0, "activity", "a"),
        (500.0, "activity", "b")], duration=600.0)


def test_users_are_sampled_as_the_scripts_see_them(tmp_path: Path) -> None:
    found = samples(load_trace(_trace(tmp_path)), horizon_s=40.0, step_s=10.0)
    # Users in turn, each every 10 s from their first request. a before its session: the level
    # counts distinct seconds in the window; the connect at 50 is within 40 s from t = 10 on,
    # and later than every one of them (the hindsight cut's `converts`).
    assert found[:5] == [Sample(1, 0.0, 0.0, False, True), Sample(2, 10.0, 0.0, True, True),
                         Sample(3, 20.0, 0.0, True, True), Sample(3, 30.0, 10.0, True, True),
                         Sample(3, 40.0, 20.0, True, True)]
    # From 50 to 100 a holds a node, and after it its earlier requests are forgotten: not
    # browsing until 400, then first seen afresh, until its request leaves the window at 520.
    assert found[5:17] == [Sample(1, t, t, False) for t in range(0, 120, 10)]
    # b: its request at 0 until it leaves the window at 120; the one at 500 comes after a
    # silence the scripts forget, so b is young again; instants within the horizon of the end
    # (after 560) are left out.
    assert found[17:29] == [Sample(1, t, t, False) for t in range(0, 120, 10)]
    assert found[29:] == [Sample(1, t, t, False) for t in range(0, 70, 10)]


def test_a_cut_that_separates_the_connecting_users_knows_everything() -> None:
    found = [Sample(1, 0.0, 0.0, True)] * 10 + [Sample(5, 0.0, 0.0, False)] * 30
    one, exact = score_cuts(found, {"one": lambda s: (), "level": lambda s: (s.level,)})
    assert one.cells == 1 and exact.cells == 2
    assert one.variance == pytest.approx(0.25 * 0.75)
    assert one.log_loss == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    assert exact.variance == 0 and exact.log_loss == 0


def test_only_the_hindsight_cut_tells_apart_two_users_who_browse_alike(tmp_path: Path) -> None:
    # a and b browse alike; a connects at 100, b never does. Every cut a service could make
    # gives them the same cells; the one told who connects later knows everything here.
    path = write_trace(tmp_path / "twins.jsonl", [
        (t, "activity", user) for t in (0.0, 10.0, 20.0) for user in ("a", "b")]
        + [(100.0, "connect", "a")], duration=400.0)
    found = samples(load_trace(path), horizon_s=90.0, step_s=10.0)
    scores = {s.cut: s for s in score_cuts(found)}
    assert scores["level x age (shipped)"].variance > 0.2
    assert scores[HINDSIGHT].variance == 0 and scores[HINDSIGHT].log_loss == 0
    assert list(scores)[-1] == HINDSIGHT


def test_the_command_reports_every_cut(tmp_path: Path) -> None:
    path = _trace(tmp_path)
    result = CliRunner().invoke(app, ["bench", "features", str(path), "--horizon", "40",
                                      "--step", "10", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["samples"] == 36 and report["connecting"] == 4
    assert report["connects"] == 1 and report["browsing_connects"] == 1
    assert [s["cut"] for s in report["scores"]][:3] == ["one chance", "level",
                                                          "level x age (shipped)"]
    assert report == measure(load_trace(path), 40.0, 10.0).as_dict()
    shown = CliRunner().invoke(app, ["bench", "features", str(path)])
    assert shown.exit_code == 0 and "level x age" in shown.output and "÷ mean" in shown.output


def test_the_cells_measured_are_the_scripts_cells() -> None:
    # features.py (through tickcost.py) mirrors lua/includes/keys.lua's LEVELS and AGES.
    lua = (Path(__file__).parent.parent / "lua" / "includes" / "keys.lua").read_text()

    def table(name: str) -> tuple[int, ...]:
        found = re.search(rf"^local {name} = {{([\d, ]+)}}", lua, re.MULTILINE)
        assert found, name
        return tuple(int(v) for v in found.group(1).split(","))

    assert table("LEVELS") == LEVELS and table("AGES") == AGES_MS
