"""The README's tables, and `docs/benchmark.md`'s, against what the commands wrote: a figure
typed by hand, or pasted over by the wrong table, fails here rather than reading as a result."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE_HEADER = "| trace | policy | connects | misses | miss rate |"
#: Where the figures from `docs/bench` are quoted: the README and the benchmark's own page.
DOCS = ("README.md", "docs/benchmark.md", "docs/verification.md", "docs/history.md",
        "docs/improvements.md")


def _quoted() -> str:
    return "\n\n".join((ROOT / name).read_text() for name in DOCS[:2])


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
    for name in DOCS:
        for table in _tables((ROOT / name).read_text()):
            ragged = [row for row in table if len(row) != len(table[0])]
            assert not ragged, f"{name}: rows of another width under {table[0]}: {ragged}"


def test_the_readme_suite_table_is_the_committed_suite_but_for_its_wall_clock() -> None:
    readme = _suite_table((ROOT / "README.md").read_text())
    committed = _suite_table((ROOT / "docs/bench/results.md").read_text())
    assert readme[0] == committed[0] and readme[0][-1] == "wall (s)"
    assert [row[:-1] for row in readme] == [row[:-1] for row in committed]


def _folder(column: str) -> Path | None:
    """The docs/bench folder a grid's column stands for: "seed 11", "draw-997", "warm"; or
    docs/later-shapes' for "later seed 3"."""
    seed = re.fullmatch(r"(later )?seed (\d+)", column)
    if seed:
        if seed.group(1):
            return ROOT / "docs/later-shapes" / f"seed{seed.group(2)}"
        return ROOT / "docs/bench" / f"held-out-seed{seed.group(2)}"
    if re.fullmatch(r"draw-\d+|warm", column):
        return ROOT / "docs/bench" / column
    return None


def test_the_readme_grids_of_the_bar_are_what_bench_bar_says_of_docs_bench() -> None:
    from provisioner.bench.bar import judge, load_results, markdown_grid

    grids = [t for t in _tables(_quoted())
             if re.fullmatch(r"trace( \(.+\))?", t[0][0]) and t[0][-1] == "met"
             and len(t[0]) > 2 and all(_folder(c) for c in t[0][1:-1])]
    # the service on seeds 1-7, 11-15, 21-25, 41-45, 51-55, the draws and warm; the rate
    # oracle on the draws and warm
    assert len(grids) >= 9
    for grid in grids:
        named = re.fullmatch(r"trace \((.+)\)", grid[0][0])
        policy = named[1] if named else "provisioner"
        folders = [_folder(c) for c in grid[0][1:-1]]
        judged = [(c, judge(load_results(f), policy=policy, source=str(f)))
                  for c, f in zip(grid[0][1:-1], folders, strict=True) if f is not None]
        expected = _tables(markdown_grid(judged))[0]
        assert grid == expected, f"README's grid of {grid[0][1:-1]} is not `bench bar`'s"


def test_the_later_shapes_by_shape_are_bench_bar_by_trace_of_their_seeds() -> None:
    from provisioner.bench.bar import judge, load_results, summarize_by_trace

    (table,) = [t for t in _tables(_quoted())
                if t[0] == ["shape", "service: met, misses, mean cost",
                            "rate oracle: met, misses, mean cost"]]
    seeds = sorted((ROOT / "docs/later-shapes").glob("seed*"))
    assert len(seeds) == 8
    columns = [
        [f"{t.met} of {t.judged}, {t.misses}/{t.connects}, {t.mean_cost_ratio:.3f}"
         for t in summarize_by_trace([(str(f), judge(load_results(f), policy=policy,
                                                     source=str(f))) for f in seeds])]
        for policy in ("provisioner", "rate-oracle-0.5")]
    assert [row[1:] for row in table[1:]] == [list(r) for r in zip(*columns, strict=True)]
    assert [row[0] for row in table[1:]] == ["crowd", "fast-boots", "flash", "heavy-browsing",
                                             "no-warning", "sparse"]


def test_the_readme_service_columns_by_shape_are_bench_bar_by_trace_of_the_seeds() -> None:
    from provisioner.bench.bar import judge, load_results, summarize_by_trace

    (table,) = [t for t in _tables(_quoted())
                if t[0][:3] == ["shape", "the service: met", "misses, idle"]]
    seeds = sorted((ROOT / "docs/bench").glob("held-out-seed*"))
    summaries = summarize_by_trace([(str(f), judge(load_results(f), source=str(f)))
                                    for f in seeds])
    assert len(seeds) == 27
    assert [row[:3] for row in table[1:]] == [
        [t.trace, str(t.met), f"{t.misses}, {t.mean_idle_hours:.1f} h"] for t in summaries]


def test_the_readme_oracle_columns_are_the_replays_in_docs_bench() -> None:
    from provisioner.bench.bar import Verdict, judge, load_results, summarize_by_trace

    def verdicts(seeds: list[int], policy: str) -> list[tuple[str, list[Verdict]]]:
        return [(str(n), judge(load_results(ROOT / f"docs/bench/held-out-seed{n}"),
                               policy=policy)) for n in seeds]

    every = sorted(int(f.name.removeprefix("held-out-seed"))
                   for f in (ROOT / "docs/bench").glob("held-out-seed*"))
    tables = _tables(_quoted())
    (shapes,) = [t for t in tables if t[0][:3] == ["shape", "the service: met", "misses, idle"]]
    oracle = summarize_by_trace(verdicts(every, "rate-oracle-0.5"))
    assert [row[3:5] for row in shapes[1:]] == [
        [str(t.met), f"{t.misses}, {t.mean_idle_hours:.1f} h"] for t in oracle]
    (groups,) = [t for t in tables if t[0][:2] == ["traces", "the service"]]
    checked = 0
    for row in groups[1:]:
        label = row[0].strip("*")
        span = re.fullmatch(r"seeds (\d+)\u2013(\d+) \((\d+)\)", label)  # an en dash
        if span:
            seeds = [n for n in every if int(span[1]) <= n <= int(span[2])]
            judged = [[v for _, vs in verdicts(seeds, p) for v in vs]
                      for p in ("provisioner", "rate-oracle-0.5")]
            count = span[3]
        elif label.startswith("all held-out"):
            judged = [[v for _, vs in verdicts(every, p) for v in vs]
                      for p in ("provisioner", "rate-oracle-0.5")]
            count = re.fullmatch(r"all held-out \((\d+)\)", label)[1]  # type: ignore[index]
        elif label.startswith("recorded, cold"):
            judged = [judge(load_results(ROOT / "docs/bench"), policy=p)
                      for p in ("provisioner", "rate-oracle-0.5")]
            count = re.fullmatch(r"recorded, cold \((\d+)\)", label)[1]  # type: ignore[index]
        else:
            raise AssertionError(f"a row the test does not know: {row[0]}")
        met = [sum(v.met for v in vs) for vs in judged]
        assert [row[1].strip("*"), row[3].strip("*")] == [str(m) for m in met], row[0]
        assert [count, count] == [str(len(vs)) for vs in judged], row[0]
        checked += 1
    assert checked == 7  # five groups of seeds, all of them, and the recorded traces


def test_the_key_schema_names_every_pool_key() -> None:
    """Each key of the vector the scripts receive has its row in the README's key schema (the
    prefixes by the keys made from them)."""
    from provisioner.keys import POOL_KEY_ORDER, PoolKeys

    rows = {row[0] for table in _tables((ROOT / "README.md").read_text()) for row in table
            if table[0][:2] == ["key", "type"]}
    keys = PoolKeys("P")
    made = {"node_prefix": "<id>", "acts_prefix": "<user>", "seen_prefix": "<user>"}
    missing = [name for name in POOL_KEY_ORDER
               if f"`{keys.key(name)}{made.get(name, '')}`" not in rows]
    assert missing == []


def test_the_key_schema_names_every_field_the_scripts_write_to_the_model() -> None:
    """The model hash's row of the README's key schema says what each of its fields is (an
    operator reads it before an edit by hand, or a `model import --replace`): each field a
    script names as it writes the model is in it (the forecast check's as `check_*`)."""
    [row] = [row for table in _tables((ROOT / "README.md").read_text()) for row in table
             if table[0][:2] == ["key", "type"] and row[0] == "`prov:{P}:model`"]
    written = set()
    for script in (ROOT / "lua").rglob("*.lua"):
        text = script.read_text()
        written |= set(re.findall(r"K\.model,\s*'([a-z0-9_]+)'", text))
        written |= set(re.findall(r"learn_mean\('([a-z0-9_]+)'", text))
    assert {"boot_ms", "last_ms", "rel"} <= written
    missing = sorted(f for f in written if f"`{f}`" not in row[2]
                     and not (f.startswith("check_") and "`check_*`" in row[2]))
    assert missing == []


def test_the_run_table_gives_every_option_its_variable_and_default() -> None:
    """The README's table of `run`'s options has a row for each, and no other, with its
    environment variable and default as the command has them (a review found three of its
    options named nowhere in the README)."""
    import typer.main

    from provisioner.cli import app

    command = typer.main.get_command(app).get_command(None, "run")  # type: ignore[attr-defined]
    rows = {row[0]: row[1:3] for table in _tables((ROOT / "README.md").read_text())
            if table[0][:3] == ["option", "environment variable", "default"] for row in table[1:]}
    expected = {}
    for param in command.params:
        default = param.default
        if isinstance(default, float) and default == int(default):
            default = int(default)
        expected[f"`{param.opts[0]}`"] = [
            f"`{param.envvar}`", "—" if default in (None, "") else f"`{default}`"]
    assert rows == expected


def test_the_metrics_table_names_every_series_a_replica_exports() -> None:
    """Each metric of provisioner.metrics has its row in the README's "Metrics" table, by the
    name a scrape shows (a counter's with `_total`), and the table names no other (a review
    found 12 of the replica's metrics named nowhere in the README)."""
    from prometheus_client.metrics import MetricWrapperBase

    from provisioner.metrics import Metrics

    metrics = Metrics()
    exported = {v._name + ("_total" if v._type == "counter" else "")
                for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)}
    named = {name for table in _tables((ROOT / "README.md").read_text()) for row in table
             if table[0][:2] == ["series", "labels"] for name in re.findall(r"`([a-z_]+)`", row[0])}
    assert exported - named == set() and named - exported == set()


def test_every_command_is_listed_on_one_line_of_its_own() -> None:
    """Rich help listed a command whose docstring's first paragraph spans lines with the
    docstring's breaks, wrapped again by the list's column, mid-sentence."""
    from typer.testing import CliRunner

    from provisioner.cli import app

    for group in ([], ["bench"], ["model"]):
        listing = CliRunner().invoke(app, [*group, "--help"], env={"COLUMNS": "1000"}).output
        rows = [line for line in listing.splitlines() if line.startswith("│ ")]
        commands = [row for row in rows if row[2] != " "]
        assert len(commands) >= 3 and commands == rows, (group, listing)


def _titles(text: str) -> list[str]:
    """A page's headings and the bold or italic titles its paragraphs and items open with."""
    found = re.findall(r"(?m)^#+ (.+)$", text)
    found += re.findall(r"(?m)^(?:- )?(?:\(later\) )?\*\*?([^*\n]+)\*", text)
    return [re.sub(r"[`*]", "", title).strip().lower() for title in found]


def test_every_test_the_readme_cites_is_a_test_of_the_suite() -> None:
    """A test named as the proof of a claim must exist: an audit found one the README cited
    long after it was renamed and joined with its twin. The README and the pages of the
    present are held to it; the history and verification pages quote names as they were."""
    defined: set[str] = set()
    for path in (ROOT / "tests").glob("*.py"):
        defined |= set(re.findall(r"(?m)^\s*(?:async )?def (test_\w+)", path.read_text()))
    for name in ("README.md", "docs/benchmark.md", "docs/improvements.md"):
        cited = set(re.findall(r"`(test_\w+)(?:\[[^\]`]*\])?`", (ROOT / name).read_text()))
        assert not cited - defined, (name, sorted(cited - defined))


def test_a_section_named_in_another_file_is_in_the_file_it_names() -> None:
    """Sections moved between the README and docs/ once; a comment, an alert or a page that
    names one by its title in a given file must still find it there."""
    reference = re.compile(r"""(README|docs/[a-z]+\.md)`?(?:,|'s|`? \()\s+\\?"([^"\\]+)\\?\"""")
    sources = [*ROOT.glob("provisioner/**/*.py"), *ROOT.glob("lua/**/*.lua"),
               ROOT / "docker-compose.yml", ROOT / "tests/alerts_test.yml",
               *(ROOT / name for name in DOCS[:3])]
    pages: dict[str, list[str]] = {}
    checked, stale = 0, []
    for source in sources:
        for page, title in reference.findall(source.read_text()):
            name = "README.md" if page == "README" else page
            if name not in pages:
                pages[name] = _titles((ROOT / name).read_text())
            # a title cut short with an ellipsis is matched on what comes before it
            wanted = re.sub(r"\s+", " ", title).split("\u2026")[0].strip().rstrip(".").lower()
            if not any(t.startswith(wanted) or wanted in t for t in pages[name]):
                stale.append(f"{source.relative_to(ROOT)}: {page}, {title!r}")
            checked += 1
    assert checked >= 20 and not stale, stale


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_of_the_pages_leads_somewhere() -> None:
    """A link to a file is relative to the page that holds it (a page moved into docs/ keeps
    the README's paths otherwise), and a link to a section names a heading of its page."""
    checked = 0
    for name in DOCS:
        page = ROOT / name
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{name}: a link to {target}, which is not there"
            if anchor:
                headings = re.findall(r"(?m)^#+ (.+)$", linked.read_text())
                assert anchor in {_slug(h) for h in headings}, f"{name}: no heading #{anchor}"
            checked += 1
    assert checked >= 10


def _option_defaults() -> dict[str, object]:
    """The default of each option of `run`, of `dev`'s where run has none of that name, and of
    `mock-node-api`'s where neither has."""
    import typer.main

    from provisioner.cli import app

    group = typer.main.get_command(app)
    found: dict[str, object] = {}
    for command in ("mock-node-api", "dev", "run"):  # run's last: its options win
        for param in group.get_command(None, command).params:  # type: ignore[attr-defined]
            for flag in param.opts:
                found[flag] = param.default
    return found


def test_the_readme_says_each_option_s_default_as_the_option_has_it() -> None:
    """The README gives defaults in passing ("`--idle-timeout` (60 s)", "`--boot-prior` 60 s",
    "`--new-session-frees` (0 to 1, 1 by default"): each is the option's own default, and a
    range said with it is the setting's. Nothing checked them: a default changed in the code
    left the README saying the old one (a mutation test)."""
    from dataclasses import replace

    from provisioner.config import PoolConfig

    text = re.sub(r"\s+", " ", (ROOT / "README.md").read_text())
    defaults = _option_defaults()
    said = re.compile(r"`(--[a-z-]+)`,? \(?(?:default )?(?:(\d+) to (\d+), )?"
                      r"(\d+(?:\.\d+)?)( s| min)?( by default)?(?=[ ,)])")
    checked = set()
    for flag, low, high, value, unit, _ in said.findall(text):
        assert flag in defaults, f"the README names {flag}, which no option of run, dev or " \
            "mock-node-api is"
        seconds = float(value) * (60 if unit == " min" else 1)
        assert defaults[flag] == seconds, f"README: {flag} {value}{unit}; the option's default " \
            f"is {defaults[flag]}"
        if low:
            name = flag[2:].replace("-", "_")
            assert replace(PoolConfig(), **{name: float(low)}).problems() == []
            assert replace(PoolConfig(), **{name: float(high)}).problems() == []
            assert replace(PoolConfig(), **{name: float(high) + 0.001}).problems()
            assert replace(PoolConfig(), **{name: float(low) - 0.001}).problems()
        checked.add(flag)
    # and the usage block's `provisioner dev [--replicas 2] ... [--arrival-rate 20]`
    (dev_usage,) = re.findall(r"provisioner dev (\[.*?)#", text)
    for flag, value in re.findall(r"\[(--[a-z-]+) (\d+(?:\.\d+)?)\]", dev_usage):
        assert defaults[flag] == float(value), (flag, value, defaults[flag])
        checked.add(flag)
    assert len(checked) >= 14, sorted(checked)


def test_the_readme_s_very_slow_boots_misses_are_the_replay_s(tmp_path: Path,
                                                               redis_url: str) -> None:
    # "misses 15 of 251 connects, all in the first N s": `bench generate DIR --shape
    # very-slow-boots` (seed 1) replayed by `bench replay --misses`, the command the figure
    # names (docs/improvements.md), read back; one service replay of a two-hour trace.
    import json

    from typer.testing import CliRunner

    from provisioner.bench.generate import SHAPES, write_trace
    from provisioner.cli import app

    figure = re.compile(r"misses (\d+) of (\d+) connects, all in the first (\d+) s")
    quoted = [figure.search((ROOT / name).read_text().replace("\n  ", " "))
              for name in ("README.md", "docs/improvements.md")]
    assert all(quoted), "the very-slow-boots figure is no longer where this test reads it"
    trace = tmp_path / "very-slow-boots.jsonl.gz"
    write_trace(SHAPES["very-slow-boots"], 1, trace)
    misses = tmp_path / "misses.jsonl"
    result = CliRunner().invoke(app, ["bench", "replay", str(trace), "--json",
                                      "--redis-url", redis_url, "--misses", str(misses)])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    last = max(json.loads(line)["t"] for line in misses.read_text().splitlines())
    for match in quoted:
        assert match is not None
        assert (scores["misses"], scores["connects"]) == (int(match[1]), int(match[2]))
        assert last <= int(match[3]), f"a miss at {last:.0f} s, after the first {match[3]} s"
