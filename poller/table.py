"""Aligned text tables for the operator commands.

On a terminal the header is bold and wide columns are cut to the
terminal's width; anywhere else (a pipe, a file, cron mail) the table is
plain text with every cell in full.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence

import click

GAP = "  "
MIN_COLUMN_WIDTH = 6  # a cut column keeps at least this many characters
ELLIPSIS = "…"


def one_line(value: object) -> str:
    """Render a cell on one line: None as empty, newlines and tabs as spaces."""
    if value is None:
        return ""
    return " ".join(str(value).split())


def fit_widths(natural: Sequence[int], width: int) -> list[int]:
    """Shrink the widest columns until the row, with gaps, fits in `width` characters."""
    widths = list(natural)
    budget = width - len(GAP) * (len(widths) - 1)
    while sum(widths) > budget:
        widest = max(range(len(widths)), key=lambda index: widths[index])
        if widths[widest] <= MIN_COLUMN_WIDTH:
            break  # too many columns for this terminal: let the lines wrap
        widths[widest] -= 1
    return widths


def cut(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    return text[: width - 1] + ELLIPSIS


def render_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], *, width: int | None = None, bold: bool = False
) -> str:
    """Render rows under headers, columns separated by two spaces.

    With `width`, cells are cut (ending in …) so that each line fits. The
    last column is not padded, so no line ends in spaces.
    """
    cells = [[one_line(value) for value in row] for row in rows]
    natural = [max([len(header)] + [len(row[index]) for row in cells]) for index, header in enumerate(headers)]
    widths = natural if width is None else fit_widths(natural, width)

    def line(values: Sequence[str]) -> str:
        padded = [cut(value, size).ljust(size) for value, size in zip(values, widths, strict=True)]
        return GAP.join(padded).rstrip()

    header = line(list(headers))
    if bold:
        header = click.style(header, bold=True)
    return "\n".join([header, *(line(row) for row in cells)])


def echo_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a table on stdout, fitted and styled only when stdout is a terminal."""
    if sys.stdout.isatty():
        width = shutil.get_terminal_size().columns
        click.echo(render_table(headers, rows, width=width, bold=True))
    else:
        click.echo(render_table(headers, rows))
