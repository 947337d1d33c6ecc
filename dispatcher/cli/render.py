"""Small rendering helpers shared by the commands: durations, slot bars, tables of rows."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from rich.console import Console
from rich.table import Table


def console() -> Console:
    """A console made per use, so the terminal width (COLUMNS) is read when the command runs."""
    return Console(highlight=False)


BAR_WIDTH = 16


def age(seconds: float | None) -> str:
    """``4.2s``, ``3m12s``, ``2h05m``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def bar(busy: int, slots: int) -> str:
    """One cell per slot (``█`` busy, ``·`` free), scaled down past ``BAR_WIDTH`` slots."""
    if slots <= 0:
        return ""
    if slots <= BAR_WIDTH:
        return "█" * busy + "·" * (slots - busy)
    filled = round(BAR_WIDTH * busy / slots)
    return "█" * filled + "·" * (BAR_WIDTH - filled)


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    if isinstance(value, Decimal):
        return format(value.normalize(), "f") if value == value.to_integral() else str(value)
    return str(value)


#: Columns of free text: cut at the end. Every other long value (ids, URLs) is cut in the middle, where the
#: part that tells two apart (a UUID's tail, a URL's path) is kept at both ends.
_TEXT_COLUMNS = frozenset({"error", "last error", "last_error", "reason", "what it shows"})
_MIN_WIDTH = 9


def middle(text: str, width: int) -> str:
    """``0b3f5c2e-…-9d41a7c3e0f1``: ``text`` in ``width`` characters, cut in the middle."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


def _fit(columns: Sequence[str], cells: list[list[str]], width: int) -> list[int]:
    """Column widths whose table fits ``width``: the widest column gives up a character at a time."""
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    room = width - (3 * len(columns) + 1)  # rich's borders and padding
    while sum(widths) > room:
        i = max(range(len(widths)), key=widths.__getitem__)
        if widths[i] <= _MIN_WIDTH:
            break
        widths[i] -= 1
    return widths


def rows_table(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any] | Mapping[str, Any]],
    width: int | None = None,
    **kw: Any,
) -> Table:
    """A table that fits the terminal (``COLUMNS``; 80 columns stay readable): long values are shortened,
    ids and URLs in the middle, free text at the end, instead of rich wrapping or cutting ids at the end."""
    values = ([row[c] for c in columns] if isinstance(row, Mapping) else list(row) for row in rows)
    cells = [[cell(v) for v in vs] for vs in values]
    fit = _fit(columns, cells, width or console().width)
    table = Table(*columns, **kw)
    for row in cells:
        table.add_row(
            *(
                (v[: w - 1] + "…" if len(v) > w else v) if columns[i] in _TEXT_COLUMNS else middle(v, w)
                for i, (v, w) in enumerate(zip(row, fit, strict=True))
            )
        )
    return table
