"""Issue 4's bar, judged from a suite's results.

A policy meets the bar on a trace when, against the same suite's static-best row for that trace
(the smallest static pool with miss rate <= 1%, chosen with hindsight):

- its miss rate is at most 1%;
- its cost ratio is at most 0.02 above static-best's;
- where traffic changes fast (by default the traces named spike and diurnal, as the issue
  names them), its idle node-hours (node hours - busy hours) are at most half of
  static-best's.

`bench suite` writes `results.json`; `judge()` reads those rows, so the README's counts of
traces that meet the bar come from a command, not from reading tables by eye.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioner import jsontext
from provisioner.bench.baselines import STATIC_BEST

#: the shipped service's name as a policy (service_policy.NAME): the one judged unless told
#: otherwise
SERVICE = "provisioner"
MISS_RATE_LIMIT = 0.01
COST_MARGIN = 0.02
IDLE_SHARE = 0.5
FAST_CHANGING = ("spike", "diurnal")

_NUMBERS = ("connects", "misses", "node_hours", "busy_hours", "cost_ratio")


class BarError(ValueError):
    """Results that cannot be judged: unreadable, malformed, or missing a row the bar needs."""


@dataclass(frozen=True)
class Verdict:
    """One trace: the policy's figures, the limits static-best sets, and which halves failed."""

    trace: str
    policy: str
    connects: int
    misses: int
    cost_ratio: float
    static_cost_ratio: float  # static-best's, on the same replay
    idle_hours: float
    idle_limit: float | None  # only where traffic changes fast
    static_detail: str  # e.g. "K=4"

    @property
    def cost_limit(self) -> float:
        return self.static_cost_ratio + COST_MARGIN

    @property
    def miss_rate(self) -> float:
        return self.misses / self.connects if self.connects else 0.0

    @property
    def failed(self) -> tuple[str, ...]:
        """The parts of the bar this trace fails: "misses", "cost", "idle"; empty if met."""
        out = []
        if self.miss_rate > MISS_RATE_LIMIT:
            out.append("misses")
        if self.cost_ratio > self.cost_limit:
            out.append("cost")
        if self.idle_limit is not None and self.idle_hours > self.idle_limit:
            out.append("idle")
        return tuple(out)

    @property
    def met(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict[str, Any]:
        return strict({
                "trace": self.trace, "policy": self.policy, "connects": self.connects,
                "misses": self.misses, "miss_rate": round(self.miss_rate, 6),
                "cost_ratio": round(self.cost_ratio, 6),
                "cost_limit": round(self.cost_limit, 6),
                "static_cost_ratio": round(self.static_cost_ratio, 6),
                "idle_hours": round(self.idle_hours, 4),
                "idle_limit": None if self.idle_limit is None else round(self.idle_limit, 4),
                "static_best": self.static_detail, "met": self.met,
                "failed": list(self.failed)})


def idle_limit_hours(static: Mapping[str, Any], fast: bool) -> float:
    """The most idle node-hours (node hours - busy hours) a policy may spend on a trace and
    still meet the bar, by static-best's row of it: node/busy <= static + 0.02 is idle <=
    (static + 0.02 - 1) x busy, with the policy's busy hours taken as static-best's (the same
    sessions; they differ only by the waits of missed users); where traffic changes fast, at
    most half of static-best's idle hours too. For a policy known only by its idle hours, such
    as the rate oracle of `bound.py`."""
    limit = (float(static["cost_ratio"]) + COST_MARGIN - 1.0) * float(static["busy_hours"])
    if fast:
        limit = min(limit, IDLE_SHARE * (float(static["node_hours"])
                                         - float(static["busy_hours"])))
    return limit


def _row(raw: object, where: str) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise BarError(f"{where}: a row must be an object, not {type(raw).__name__}")
    for key in ("trace", "policy"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise BarError(f"{where}: '{key}' must be a non-empty string")
    row = dict(raw)
    # Node time with no busy time is an infinite cost ratio, written as null (strict JSON).
    infinite_cost = "cost_ratio" in raw and raw["cost_ratio"] is None
    if infinite_cost:
        raw = dict(raw, cost_ratio=0.0)  # for the checks below
    for key in _NUMBERS:
        value = raw.get(key)
        # the range first: an integer of 500 digits does not fit the float isfinite takes
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not 0 <= value <= 1e15 or not math.isfinite(value):
            raise BarError(f"{where} ({raw['trace']} / {raw['policy']}): '{key}' must be a "
                           f"finite number in [0, 1e15], not {str(value)[:40]}")
    what = f"{where} ({raw['trace']} / {raw['policy']})"
    for key in ("connects", "misses"):
        if raw[key] != int(raw[key]):
            raise BarError(f"{what}: '{key}' must be a whole number, not {raw[key]}")
    if raw["misses"] > raw["connects"]:
        raise BarError(f"{what}: more misses than connects")
    # node time holds busy time (FORMAT.md)
    if raw["busy_hours"] > raw["node_hours"] * (1 + 1e-9):
        raise BarError(f"{what}: more busy hours ({raw['busy_hours']}) than node hours "
                       f"({raw['node_hours']})")
    if infinite_cost:
        if raw["busy_hours"] != 0 or raw["node_hours"] == 0:
            raise BarError(f"{what}: 'cost_ratio' is null, which only a row with node hours "
                           "and no busy hours may have")
        row["cost_ratio"] = math.inf
    else:
        # The bar judges the cost ratio as written: it must be the row's node / busy hours
        # (0 with no node time at all), or the verdict is of a figure the replay never had.
        node, busy = raw["node_hours"], raw["busy_hours"]
        expected = node / busy if busy else 0.0
        if not math.isclose(raw["cost_ratio"], expected, rel_tol=1e-9, abs_tol=1e-12):
            raise BarError(f"{what}: 'cost_ratio' {raw['cost_ratio']} is not node / busy hours "
                           f"({expected:.6g})")
    return row


def markdown_grid(judged: Sequence[tuple[str, Sequence[Verdict]]]) -> str:
    """Verdicts as one Markdown table: a row per trace, a column per result set (a seed, a
    draw), and how many of its cells meet the bar. Each cell is misses / connects, the cost
    ratio (the idle hours where the bar limits them), then static-best's pool and cost ratio,
    and in bold the halves that fail: the held-out tables of `docs/benchmark.md` are this
    command's output. A grid of another policy than the service names it in its first header
    cell, so that a reference's verdicts cannot read as the service's."""
    columns = [name for name, _ in judged]
    cells: dict[str, dict[str, Verdict]] = {}
    for name, verdicts in judged:
        for v in verdicts:
            cells.setdefault(v.trace, {})[name] = v
    policies = sorted({v.policy for _, verdicts in judged for v in verdicts} - {SERVICE})
    first = f"trace ({', '.join(policies)})" if policies else "trace"
    lines = [f"| {first} | " + " | ".join(columns) + " | met |",
             "| --- | " + " | ".join("---" for _ in columns) + " | ---: |"]
    for trace in sorted(cells):
        row = []
        for name in columns:
            if name not in cells[trace]:
                row.append("—")
                continue
            v = cells[trace][name]
            cell = f"{v.misses}/{v.connects}, {v.cost_ratio:.3f}"
            if v.idle_limit is not None:
                cell += f", {v.idle_hours:.1f} h"
            static = f"{v.static_detail}: " if v.static_detail else ""
            cell += f" ({static}{v.static_cost_ratio:.3f})"
            if v.failed:
                cell += " **" + ", ".join(v.failed) + "**"
            row.append(cell)
        shown = cells[trace].values()
        lines.append(f"| {trace} | " + " | ".join(row)
                     + f" | {sum(v.met for v in shown)} of {len(shown)} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class TraceSummary:
    """One trace name over many result sets (seeds, draws): how many meet the bar, the misses
    and connects summed, the mean cost ratio and idle hours, and how often each half fails."""

    trace: str
    judged: int
    met: int
    misses: int
    connects: int
    mean_cost_ratio: float
    mean_idle_hours: float
    failed: dict[str, int]  # "misses" / "cost" / "idle": on how many result sets

    def as_dict(self) -> dict[str, Any]:
        return {"trace": self.trace, "judged": self.judged, "met": self.met,
                "misses": self.misses, "connects": self.connects,
                "mean_cost_ratio": round(self.mean_cost_ratio, 6),
                "mean_idle_hours": round(self.mean_idle_hours, 4), "failed": self.failed}

    @property
    def fails_on(self) -> str:
        """The failing halves and how often, e.g. "misses 5, cost 2"; "—" when none fail."""
        return ", ".join(f"{half} {n}" for half, n in self.failed.items()) or "—"


def summarize_by_trace(judged: Sequence[tuple[str, Sequence[Verdict]]]) -> list[TraceSummary]:
    """The verdicts of many result sets summed per trace name, in trace order: the README's
    tables by shape over the held-out seeds (`docs/benchmark.md`) are this, not a sum by hand."""
    by_trace: dict[str, list[Verdict]] = {}
    for _, verdicts in judged:
        for v in verdicts:
            by_trace.setdefault(v.trace, []).append(v)
    out = []
    for trace in sorted(by_trace):
        vs = by_trace[trace]
        failed = {half: sum(half in v.failed for v in vs) for half in ("misses", "cost", "idle")}
        out.append(TraceSummary(
            trace=trace, judged=len(vs), met=sum(v.met for v in vs),
            misses=sum(v.misses for v in vs), connects=sum(v.connects for v in vs),
            mean_cost_ratio=sum(v.cost_ratio for v in vs) / len(vs),
            mean_idle_hours=sum(v.idle_hours for v in vs) / len(vs),
            failed={half: n for half, n in failed.items() if n}))
    return out


def markdown_by_trace(summaries: Sequence[TraceSummary]) -> str:
    """`summarize_by_trace` as one Markdown table, a row per trace and one for all of them."""
    lines = ["| trace | met | misses / connects | mean cost ratio | mean idle h | fails on |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for t in summaries:
        lines.append(f"| {t.trace} | {t.met} of {t.judged} | {t.misses}/{t.connects} | "
                     f"{t.mean_cost_ratio:.3f} | {t.mean_idle_hours:.1f} | {t.fails_on} |")
    judged = sum(t.judged for t in summaries)
    lines.append(f"| all | {sum(t.met for t in summaries)} of {judged} | "
                 f"{sum(t.misses for t in summaries)}/{sum(t.connects for t in summaries)} | "
                 "| | |")
    return "\n".join(lines)


#: the fields of a row that name its replay beyond the trace (suite.draw_fields)
DRAW_FIELDS = ("boot_offset", "warm_up")


def other_draw(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    """How two rows of one trace differ in their replay (boot draw, warm-up), or None when they
    agree or either row does not say (rows written before the fields were)."""
    for key in DRAW_FIELDS:
        if key in a and key in b and a[key] != b[key]:
            return f"{key} {a[key]} against {b[key]}"
    return None


def strict(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row as strict JSON can hold it: a score with no value (the cost ratio of node time
    with no busy time, infinite) is null, which `_row` reads back as infinite."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in row.items()}


def not_the_same_replay(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    """Why two rows of one trace are not the same replay, or None when nothing tells them
    apart: their connects (the same users make the same), then their draw (other_draw)."""
    if a["connects"] != b["connects"]:
        return f"{a['connects']} connects against {b['connects']}"
    return other_draw(a, b)


def rows_by_trace(rows: Iterable[Mapping[str, Any]],
                  source: str = "results") -> dict[str, dict[str, dict[str, Any]]]:
    """A suite's rows, each checked, as {trace: {policy: row}}; two rows of one trace and
    policy are refused."""
    by_trace: dict[str, dict[str, dict[str, Any]]] = {}
    for i, raw in enumerate(rows):
        row = _row(raw, f"{source} row {i + 1}")
        seen = by_trace.setdefault(row["trace"], {})
        if row["policy"] in seen:
            raise BarError(f"{source}: two rows for {row['trace']} / {row['policy']}")
        seen[row["policy"]] = row
    return by_trace


def judge(rows: Iterable[Mapping[str, Any]], policy: str = SERVICE,
          fast: Sequence[str] = FAST_CHANGING, source: str = "results") -> list[Verdict]:
    """One verdict per trace the policy ran on, in trace order. Every such trace needs exactly
    one static-best row and one row of the policy."""
    by_trace = rows_by_trace(rows, source)
    verdicts = []
    for trace in sorted(by_trace):
        judged = by_trace[trace].get(policy)
        if judged is None:
            continue
        static = by_trace[trace].get(STATIC_BEST)
        if static is None:
            raise BarError(f"{source}: {trace} has no {STATIC_BEST} row to judge {policy} by "
                           f"(run `bench suite` with --policy {STATIC_BEST})")
        differ = other_draw(judged, static)
        if differ:
            raise BarError(f"{source}: {trace}'s {policy} and {STATIC_BEST} rows are not the "
                           f"same replay ({differ})")
        static_idle = static["node_hours"] - static["busy_hours"]
        verdicts.append(Verdict(
            trace=trace, policy=policy, connects=int(judged["connects"]),
            misses=int(judged["misses"]), cost_ratio=float(judged["cost_ratio"]),
            static_cost_ratio=float(static["cost_ratio"]),
            idle_hours=judged["node_hours"] - judged["busy_hours"],
            idle_limit=IDLE_SHARE * static_idle if trace in fast else None,
            static_detail=str(static.get("detail", ""))))
    if not verdicts:
        raise BarError(f"{source}: no row of policy {policy!r}")
    return verdicts


def with_static_best(rows: Iterable[Mapping[str, Any]],
                     static_rows: Iterable[Mapping[str, Any]], policy: str = SERVICE,
                     source: str = "results", static_source: str = "static") -> list[Any]:
    """The policy's rows of one result set, each with the static-best row of the same trace
    from another: a screen that replayed the policy alone, judged against a committed suite of
    the same replays. Static-best rows of the screen itself are left out. Each pair must have
    the same connects (the same users and boot draws), or it is refused."""
    mine = rows_by_trace(rows, source)
    theirs = rows_by_trace(static_rows, static_source)
    merged: list[Any] = []
    for trace in sorted(mine):
        row = mine[trace].get(policy)
        if row is None:
            continue
        static = theirs.get(trace, {}).get(STATIC_BEST)
        if static is None:
            raise BarError(f"{static_source}: {trace} has no {STATIC_BEST} row to judge "
                           f"{policy} of {source} by")
        differ = not_the_same_replay(row, static)
        if differ:
            raise BarError(f"{source}: {trace} and {static_source}'s {STATIC_BEST} row: "
                           f"{differ}: not the same replay")
        merged += [static, row]
    if not merged:
        raise BarError(f"{source}: no row of policy {policy!r}")
    return merged


def load_results(path: Path) -> list[Any]:
    """The rows of a suite's results.json (given as the file or the folder holding it)."""
    file = path / "results.json" if path.is_dir() else path
    try:
        data = jsontext.loads(file.read_text())
    except OSError as exc:
        raise BarError(f"{file}: {exc.strerror or exc}") from None
    except ValueError as exc:  # not JSON, not UTF-8, nested too deep
        raise BarError(f"{file}: not JSON ({exc})") from None
    if not isinstance(data, list):
        raise BarError(f"{file}: expected a list of rows, as `bench suite` writes")
    return data
