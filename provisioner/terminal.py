"""What the commands write to a terminal: text from outside (ids and values another writer put
in Redis, a model file's field names) without the characters a terminal acts on.

A node id `n1\\x1b]0;TITLE\\x07\\x1b[2J` shown by `provisioner nodes` set the terminal's title
and cleared its screen (a review); Rich escapes its own markup, not a terminal's escape
sequences. Two layers:

- where such text becomes something to show (a table's cell, a decision, a message), it goes
  through `printable` (or `outside`, for a Rich `Text`), which writes each of those characters
  as its Python escape, `\\x1b`, before Rich lays the line out, so columns and the live view's
  redraw measure what is shown;
- every console of the commands is a `SafeConsole`, which drops whatever of them still reaches
  it, after the layout: each is replaced by as many spaces as Rich measured it (none, for all
  but a few), so nothing moves; only the styles Rich adds itself go out as escape sequences.

JSON output (`--json`) escapes them already.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

from rich.cells import cell_len
from rich.console import Console
from rich.segment import Segment
from rich.text import Text

# Controls (C0, DEL, C1), line and paragraph separators, lone surrogates, and the format
# characters (bidi overrides and marks, zero-width spaces, a byte order mark): what moves a
# cursor, a line or the reading order, or hides in an id. The joiners inside an emoji and the
# soft hyphen are text; so are spaces of other widths.
_ACTING = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_TEXT = frozenset({"\u200c", "\u200d", "\u00ad"})


def _acts(c: str) -> bool:
    return c not in _TEXT and unicodedata.category(c) in _ACTING


def printable(text: str, keep: str = "") -> str:
    """`text` with every character a terminal would act on written as its escape (`\\x1b`,
    `\\u202e`), but those in `keep`."""
    if text.isprintable():
        return text
    return "".join(c if c in keep or not _acts(c) else repr(c)[1:-1] for c in text)


def outside(text: str, style: str = "") -> Text:
    """Text from outside as a Rich `Text`: `printable`, and not read as markup."""
    return Text(printable(text), style=style)


def _inert(text: str) -> str:
    """`text` with what a terminal acts on replaced by the spaces Rich measured it as (line
    breaks kept: Rich lays lines out with them)."""
    if text.isprintable():
        return text
    return "".join(" " * cell_len(c) if c != "\n" and _acts(c) else c for c in text)


class SafeConsole(Console):
    """A Rich console whose rendered text has nothing a terminal acts on (`_inert`), whatever
    reached it unescaped; the escape sequences of its own styles and controls go out as they
    are. Emoji codes are left as written (`uniform:A:B` is not `uniform🅰B`)."""

    def __init__(self, **kwargs: object) -> None:
        kwargs.setdefault("emoji", False)
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def _render_buffer(self, buffer: Iterable[Segment]) -> str:
        return super()._render_buffer(
            segment if segment.control else Segment(_inert(segment.text), segment.style)
            for segment in buffer)
