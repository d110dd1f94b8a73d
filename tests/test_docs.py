"""The README's tables against what the commands wrote: a figure typed by hand, or pasted over
by the wrong table, fails here rather than reading as a result."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE_HEADER = "| trace | policy | connects | misses | miss rate |"


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table of a text, as rows of cells (the header first, the rule dropped)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] | None = None
    for line in text.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                tables.append(current)
            if not re.fullmatch(r"\|( *:?-+:? *\|)+", line.strip()):
                current.append(_cells(line))
        else:
            current = None
    return tables


def _suite_table(text: str) -> list[list[str]]:
    (table,) = [t for t in _tables(text)
                if t and " | ".join(t[0]).startswith(SUITE_HEADER.strip("| "))]
    return table


def test_every_readme_table_row_has_its_headers_number_of_cells() -> None:
    for name in ("README.md", "docs/history.md"):
        for table in _tables((ROOT / name).read_text()):
            ragged = [row for row in table if len(row) != len(table[0])]
            assert not ragged, f"{name}: rows of another width under {table[0]}: {ragged}"


def test_the_readme_suite_table_is_the_committed_suite_but_for_its_wall_clock() -> None:
    readme = _suite_table((ROOT / "README.md").read_text())
    committed = _suite_table((ROOT / "docs/bench/results.md").read_text())
    assert readme[0] == committed[0] and readme[0][-1] == "wall (s)"
    assert [row[:-1] for row in readme] == [row[:-1] for row in committed]
