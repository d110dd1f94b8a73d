"""Two runs of the same replays, compared pair by pair.

A screen replays a variant on the traces and boot draws the shipped policy was replayed on, so
each replay has a twin: the same users, the same boot delays. The difference within each pair is
what the change did to that replay plus that replay's luck; the spread of those differences
gives the standard error of their total (and of their mean), which says how large a change in
misses or cost the screen can tell from noise (`docs/history.md`, "How much a screen can tell").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioner.bench.bar import (
    SERVICE,
    BarError,
    load_results,
    not_the_same_replay,
    rows_by_trace,
)


@dataclass(frozen=True)
class Paired:
    """One figure over n pairs: the totals before and after, and the standard error of the
    total of the differences (sqrt(n) x their sample deviation; None under two pairs). The means
    divide by n: compare() refuses result sets with no pair."""

    n: int
    before: float
    after: float
    se_total: float | None

    @property
    def difference(self) -> float:
        return self.after - self.before

    @property
    def mean_before(self) -> float:
        return self.before / self.n

    @property
    def mean_after(self) -> float:
        return self.after / self.n

    @property
    def mean_difference(self) -> float:
        return self.difference / self.n

    @property
    def se_mean(self) -> float | None:
        return None if self.se_total is None else self.se_total / self.n


def paired(before: Sequence[float], after: Sequence[float]) -> Paired:
    """Totals of two equally long sequences of paired figures, and the standard error of the
    total difference."""
    if len(before) != len(after):
        raise ValueError("paired figures must come in pairs")
    n = len(before)
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    se = None
    if n >= 2:
        mean = sum(diffs) / n
        variance = sum((d - mean) ** 2 for d in diffs) / (n - 1)
        se = math.sqrt(n * variance)
    return Paired(n=n, before=float(sum(before)), after=float(sum(after)), se_total=se)


@dataclass(frozen=True)
class Comparison:
    """A policy's rows in two result sets, paired by (results file, trace)."""

    pairs: list[str]  # "results file: trace", in order
    misses: Paired
    cost: Paired  # of the cost ratios (their means: .mean_before, .mean_after)
    connects: int  # of the "before" rows
    cheaper: int  # pairs whose cost ratio fell
    dearer: int  # pairs whose cost ratio rose
    unpaired: list[str]  # rows or files present on one side only

    def as_dict(self) -> dict[str, Any]:
        n = self.misses.n

        def rounded(value: float | None, digits: int) -> float | None:
            return None if value is None else round(value, digits)

        return {
            "pairs": n, "connects": self.connects,
            "misses_before": int(self.misses.before), "misses_after": int(self.misses.after),
            "misses_difference": int(self.misses.difference),
            "misses_difference_se": rounded(self.misses.se_total, 2),
            "cost_before": round(self.cost.mean_before, 4),
            "cost_after": round(self.cost.mean_after, 4),
            "cost_difference": round(self.cost.mean_difference, 4),
            "cost_difference_se": rounded(self.cost.se_mean, 4),
            "cheaper": self.cheaper, "dearer": self.dearer, "unpaired": self.unpaired}


def _policy_rows(rows: Sequence[Mapping[str, Any]], policy: str,
                 source: str) -> dict[str, dict[str, Any]]:
    """The policy's row of each trace (the rows checked as `bench bar` checks them)."""
    return {trace: by_policy[policy] for trace, by_policy in rows_by_trace(rows, source).items()
            if policy in by_policy}


def compare(before: Mapping[str, Sequence[Mapping[str, Any]]],
            after: Mapping[str, Sequence[Mapping[str, Any]]],
            policy: str = SERVICE) -> Comparison:
    """Pair the policy's rows of two result sets, each keyed by a name for its results file
    (the same name on both sides for the same traces and boot draws)."""
    labels: list[str] = []
    misses_b: list[float] = []
    misses_a: list[float] = []
    cost_b: list[float] = []
    cost_a: list[float] = []
    unpaired = [f"{name}: only before" for name in sorted(set(before) - set(after))]
    unpaired += [f"{name}: only after" for name in sorted(set(after) - set(before))]
    connects = cheaper = dearer = 0
    for name in sorted(set(before) & set(after)):
        b = _policy_rows(before[name], policy, f"{name} (before)")
        a = _policy_rows(after[name], policy, f"{name} (after)")
        unpaired += [f"{name}: {t} only before" for t in sorted(set(b) - set(a))]
        unpaired += [f"{name}: {t} only after" for t in sorted(set(a) - set(b))]
        for trace in sorted(set(a) & set(b)):
            differ = not_the_same_replay(b[trace], a[trace])
            if differ:
                raise BarError(f"{name}: {trace} before and after: {differ}: not the same "
                               "replay")
            if math.isinf(b[trace]["cost_ratio"]) or math.isinf(a[trace]["cost_ratio"]):
                raise BarError(f"{name}: {trace} has no busy time (an infinite cost ratio): "
                               "no cost to compare")
            labels.append(f"{name}: {trace}")
            misses_b.append(b[trace]["misses"])
            misses_a.append(a[trace]["misses"])
            cost_b.append(b[trace]["cost_ratio"])
            cost_a.append(a[trace]["cost_ratio"])
            connects += int(b[trace]["connects"])
            cheaper += a[trace]["cost_ratio"] < b[trace]["cost_ratio"]
            dearer += a[trace]["cost_ratio"] > b[trace]["cost_ratio"]
    if not labels:
        raise BarError(f"no pair of {policy!r} rows: nothing to compare")
    return Comparison(pairs=labels, misses=paired(misses_b, misses_a),
                      cost=paired(cost_b, cost_a), connects=connects, cheaper=cheaper,
                      dearer=dearer, unpaired=unpaired)


def same_kind(a: Path, b: Path, what: str = "") -> None:
    """Refuse to pair a results file with a folder: a file is keyed by its name, and would be
    paired with the folder's own top-level results.json, another replay."""
    if a.is_file() != b.is_file():
        raise BarError(f"{a} and {what}{b}: a results file is paired with a file, and a folder "
                       "with a folder (each results.json by its path in it)")


def load_tree(root: Path) -> dict[str, list[Any]]:
    """Every results.json under root (or root itself, a file), by its path relative to root."""
    if root.is_file():
        return {root.name: load_results(root)}
    files = sorted(root.rglob("results.json"))
    if not files:
        raise BarError(f"{root}: no results.json under it")
    return {str(f.relative_to(root)): load_results(f) for f in files}
