"""What the command line shows: tables for lists and progress bars for long work, with rich."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Piped or captured output is not cut to a terminal's width: ids stay whole for grep.
_WIDE = 400


def console(*, stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = shutil.get_terminal_size().columns if stream.isatty() else _WIDE
    return Console(file=stream, width=width, highlight=False, soft_wrap=False)


def show(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]], noun: str) -> None:
    """A table of ``rows`` under ``columns``, then how many there are."""
    table = Table(*columns, title=title, title_justify="left", box=None, pad_edge=False)
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    out = console()
    if rows:
        out.print(table)
    out.print(f"{len(rows)} {noun}(s)")


@contextmanager
def progress(description: str, total: int | None) -> Iterator[Progress]:
    """A progress bar on stderr (only when it is a terminal), advanced by the caller."""
    out = console(stderr=True)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=out,
        disable=not out.is_terminal,
        transient=True,
    )
    with bar:
        bar.add_task(description, total=total)
        yield bar
