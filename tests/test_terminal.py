"""The commands' consoles: text from outside reaches a terminal without what a terminal acts
on, and the styles the console adds itself still do."""

from __future__ import annotations

import io

from rich.text import Text

from provisioner.terminal import SafeConsole, printable


def test_printable_escapes_what_a_terminal_acts_on_and_keeps_text() -> None:
    assert printable("n1\x1b]0;T\x07\x9b31m\u202e\u200b\r\x7f") == \
        "n1\\x1b]0;T\\x07\\x9b31m\\u202e\\u200b\\r\\x7f"
    assert printable("ü 😀 a\u00a0b C:\\Users\\x\\") == "ü 😀 a\u00a0b C:\\Users\\x\\"
    assert printable("a\nb\tc") == "a\\nb\\tc" and printable("a\nb", keep="\n") == "a\nb"


def test_a_safe_console_escapes_the_text_and_keeps_its_own_styles() -> None:
    out = io.StringIO()
    console = SafeConsole(file=out, force_terminal=True, width=200, color_system="standard")
    console.print("[red]error:[/red] n1\x1b[2J uniform:A:B")
    console.print(Text("u1\x1b]0;TITLE", style="bold"))
    written = out.getvalue()
    assert "\x1b[31merror:" in written and "\x1b[1m" in written  # its own styles
    # the text's, escaped (the highlighter styles the "[" after the first)
    assert written.count("\\x1b") == 2 and "\\x1b]0;TITLE" in written
    assert "\x1b[2J" not in written and "\x1b]0" not in written
    assert "uniform:" in written and "\U0001f170" not in written  # no emoji for ":A:"
