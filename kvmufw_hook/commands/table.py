"""Tables for people (``status``, ``forward list``): every cell escaped, so that text from
XML (a comment, a name) can neither draw a row of its own nor move the cursor; ``--json``
keeps the exact text."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import printable, shown


def table(rows: Sequence[Sequence[object]]) -> str:
    """The rows, the first being the header, in columns two spaces apart; the last column
    (free text) is not padded."""
    cells = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]) - 1)]
    return "".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False))
                   + "  " + row[-1] + "\n" for row in cells)


def shown_name(name: str) -> str:
    """A name in a table: quoted when a space at either end would hide what it is
    (``domain 'victim '`` beside ``domain victim``), and never with raw control text."""
    return printable(name) if name == name.strip() and name else shown(name)
