"""The operator queries of ``sql/queries.sql``, loaded into a dict by name (procrastinate keeps its SQL the
same way): the SQL stays plain SQL that a DBA can paste into a MySQL shell, and the CLI runs it by name.

A block starts with ``-- name: NAME``; the comment lines right after it are its description, an optional
``-- params: minutes=60 (1..5256000), …`` line gives defaults for its ``:name`` parameters, each with the
whole numbers it may take where a value outside them is nonsense (a negative window, or one past what
MySQL's date arithmetic holds, which it answers with wrong rows rather than an error), and the rest up to
the next block is the statement.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

_NAME = re.compile(r"^--\s*name:\s*([A-Za-z_][A-Za-z0-9_]*)\s*$")
_PARAMS = re.compile(r"^--\s*params:\s*(.*)$")
_BIND = re.compile(r"(?<![:\w]):([A-Za-z_][A-Za-z0-9_]*)")
#: ``60 (1..5256000)``: a default, and the whole numbers the parameter may take.
_RANGED = re.compile(r"^(?P<default>.*?)\s*\((?P<low>-?[0-9]+)\.\.(?P<high>-?[0-9]+)\)$")
WHOLE = re.compile(r"-?[0-9]+")  # fullmatch: ASCII digits only, unlike str.isdigit ("²")


@dataclass(frozen=True, slots=True)
class Query:
    name: str
    sql: str
    doc: str = ""
    defaults: dict[str, str] = field(default_factory=dict)
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # inclusive

    @property
    def parameters(self) -> list[str]:
        return list(dict.fromkeys(_BIND.findall(self.sql)))


def sql_dir() -> Path:
    """``GPUQ_SQL_DIR`` (set in the container image), else ``sql/`` beside the package in a checkout, else
    the package itself: an installed gpuq carries ``queries.sql`` as package data."""
    if os.environ.get("GPUQ_SQL_DIR"):
        return Path(os.environ["GPUQ_SQL_DIR"])
    checkout = Path(__file__).resolve().parents[2] / "sql"
    return checkout if (checkout / "queries.sql").is_file() else Path(__file__).resolve().parent


def parse(text: str) -> dict[str, Query]:
    blocks: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        match = _NAME.match(line.strip())
        if match:
            if any(name == match.group(1) for name, _ in blocks):
                raise ValueError(f"query {match.group(1)!r} is defined twice")
            blocks.append((match.group(1), []))
        elif blocks:
            blocks[-1][1].append(line)
    return dict(_query(name, lines) for name, lines in blocks)


def _query(name: str, lines: list[str]) -> tuple[str, Query]:
    doc: list[str] = []
    defaults: dict[str, str] = {}
    ranges: dict[str, tuple[int, int]] = {}
    body: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("--"):
            if body:
                continue  # a comment inside the statement: not part of the description
            params = _PARAMS.match(stripped)
            if params:
                for item in filter(None, (p.strip() for p in params.group(1).split(","))):
                    key, _, value = item.partition("=")
                    key, value = key.strip(), value.strip()
                    ranged = _RANGED.match(value)
                    if ranged:
                        value = ranged["default"]
                        ranges[key] = _range(name, key, value, int(ranged["low"]), int(ranged["high"]))
                    defaults[key] = value
            else:
                doc.append(stripped.removeprefix("--").strip())
        elif stripped or body:
            body.append(line.rstrip())
    sql = "\n".join(body).strip().rstrip(";").strip()
    if not sql:
        raise ValueError(f"query {name!r} has no SQL")
    return name, Query(name, sql, " ".join(doc), defaults, ranges)


def _range(name: str, key: str, default: str, low: int, high: int) -> tuple[int, int]:
    """A file whose own default is outside its range would fail every run that leaves it out: refused when
    the file is read instead."""
    if low > high or not WHOLE.fullmatch(default) or not low <= int(default) <= high:
        raise ValueError(f"query {name!r}: parameter {key} default {default!r} is not within {low}..{high}")
    return low, high


@lru_cache(maxsize=4)
def load(path: Path | None = None) -> dict[str, Query]:
    """The queries of ``path`` (default ``sql_dir()/queries.sql``), parsed once."""
    return parse((path or sql_dir() / "queries.sql").read_text(encoding="utf-8"))
