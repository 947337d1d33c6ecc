"""The operator queries of ``sql/queries.sql``, loaded into a dict by name (procrastinate keeps its SQL the
same way): the SQL stays plain SQL that a DBA can paste into a MySQL shell, and the CLI runs it by name.

A block starts with ``-- name: NAME``; the comment lines right after it are its description, an optional
``-- params: minutes=60, …`` line gives defaults for its ``:name`` parameters, and the rest up to the next
block is the statement.
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


@dataclass(frozen=True, slots=True)
class Query:
    name: str
    sql: str
    doc: str = ""
    defaults: dict[str, str] = field(default_factory=dict)

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
                    defaults[key.strip()] = value.strip()
            else:
                doc.append(stripped.removeprefix("--").strip())
        elif stripped or body:
            body.append(line.rstrip())
    sql = "\n".join(body).strip().rstrip(";").strip()
    if not sql:
        raise ValueError(f"query {name!r} has no SQL")
    return name, Query(name, sql, " ".join(doc), defaults)


@lru_cache(maxsize=4)
def load(path: Path | None = None) -> dict[str, Query]:
    """The queries of ``path`` (default ``sql_dir()/queries.sql``), parsed once."""
    return parse((path or sql_dir() / "queries.sql").read_text(encoding="utf-8"))
