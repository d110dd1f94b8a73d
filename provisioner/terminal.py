"""What the commands write to a terminal: text from outside (ids and values another writer put
in Redis, a model file's field names) without the control characters a terminal acts on.

A node id `n1\\x1b]0;TITLE\\x07\\x1b[2J` shown by `provisioner nodes` set the terminal's title
and cleared its screen (a review); Rich escapes its own markup, not a terminal's escape
sequences. So every console of the commands is a `SafeConsole`: the text it renders has such
characters written as their Python escapes (`\\x1b`), and only the styles Rich adds itself
reach the terminal as escape sequences. JSON output (`--json`) escapes them already.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

from rich.console import Console
from rich.segment import Segment

# Controls (C0, DEL, C1), format characters (bidi overrides, zero-width), line and paragraph
# separators, and lone surrogates: what moves a cursor, a line or the reading order. Spaces of
# other widths (a no-break space) are text.
_ACTING = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def printable(text: str, keep: str = "") -> str:
    """`text` with every character a terminal would act on written as its escape (`\\x1b`,
    `\\u202e`), but those in `keep`."""
    if text.isprintable():
        return text
    return "".join(
        c if c in keep or unicodedata.category(c) not in _ACTING else repr(c)[1:-1]
        for c in text)


class SafeConsole(Console):
    """A Rich console whose rendered text is `printable` (line breaks kept: Rich lays lines out
    with them); the escape sequences of its own styles and controls go out as they are.
    Emoji codes are left as written (`uniform:A:B` is not `uniform🅰B`)."""

    def __init__(self, **kwargs: object) -> None:
        kwargs.setdefault("emoji", False)
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def _render_buffer(self, buffer: Iterable[Segment]) -> str:
        return super()._render_buffer(
            segment if segment.control else Segment(printable(segment.text, "\n"),
                                                    segment.style, segment.control)
            for segment in buffer)
