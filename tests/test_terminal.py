"""The commands' consoles: text from outside reaches a terminal without what a terminal acts
on, laid out as shown, and the styles the console adds itself still go out."""

from __future__ import annotations

import io
import logging

from rich.table import Table
from rich.text import Text

from provisioner.logs import TextFormatter
from provisioner.terminal import SafeConsole, outside, printable

HOSTILE = "n1\x1b]0;TITLE\x07\x1b[2J\u202e\u200b"


def test_printable_escapes_what_a_terminal_acts_on_and_keeps_text() -> None:
    assert printable("n1\x1b]0;T\x07\x9b31m\u202e\u200b\r\x7f\u2028") == \
        "n1\\x1b]0;T\\x07\\x9b31m\\u202e\\u200b\\r\\x7f\\u2028"
    text = "ü 😀 👨\u200d👩\u200d👧 a\u00a0b soft\u00adhyphen C:\\Users\\x\\"
    assert printable(text) == text
    assert printable("a\nb\tc") == "a\\nb\\tc" and printable("a\nb", keep="\n") == "a\nb"



def test_text_escaped_before_layout_keeps_a_table_in_line() -> None:
    """Escaped after Rich had measured it, a cell came out wider than its column (a review):
    the table fell out of line and the live view stopped redrawing in place."""
    out = io.StringIO()
    table = Table()
    table.add_column("node")
    table.add_column("state")
    table.add_row(outside(HOSTILE), "ready")
    table.add_row("n2", "ready")
    SafeConsole(file=out, width=120).print(table)
    lines = out.getvalue().splitlines()
    assert "\\x1b]0;TITLE\\x07\\x1b[2J\\u202e\\u200b" in out.getvalue()
    assert "\x1b" not in out.getvalue() and len({len(line) for line in lines}) == 1, lines


def test_what_reaches_a_safe_console_unescaped_is_dropped_in_place() -> None:
    """The console's own net: a character a terminal acts on is replaced by the cells Rich
    measured it as (none), so nothing moves, and the console's styles still go out."""
    out = io.StringIO()
    console = SafeConsole(file=out, force_terminal=True, width=200, color_system="standard")
    console.print("[red]error:[/red] uniform:A:B " + HOSTILE)
    console.print(Text(HOSTILE, style="bold"))
    written = out.getvalue()
    assert "\x1b[31merror:" in written and "\x1b[1m" in written  # its own styles
    assert "\x1b]0" not in written and "\x1b[2J" not in written and "\u202e" not in written
    assert "uniform:" in written and "\U0001f170" not in written  # no emoji for ":A:"
    plain = io.StringIO()
    table = Table()
    table.add_column("node")
    table.add_row(Text(HOSTILE))
    table.add_row("n2")
    SafeConsole(file=plain, width=120).print(table)
    assert len({len(line) for line in plain.getvalue().splitlines()}) == 1, plain.getvalue()


def test_log_lines_as_text_escape_what_a_terminal_acts_on() -> None:
    record = logging.LogRecord("x", logging.WARNING, "f", 1, "node %s is gone", (HOSTILE,),
                               None)
    line = TextFormatter("%(message)s").format(record)
    assert line == "node n1\\x1b]0;TITLE\\x07\\x1b[2J\\u202e\\u200b is gone"
