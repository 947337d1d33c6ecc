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


def rows_table(columns: Sequence[str], rows: Iterable[Sequence[Any] | Mapping[str, Any]], **kw: Any) -> Table:
    table = Table(*columns, **kw)
    for row in rows:
        values = [row[c] for c in columns] if isinstance(row, Mapping) else list(row)
        table.add_row(*(cell(v) for v in values))
    return table
