"""``gpuq db init`` and ``gpuq sql``: the schema, and the named operator queries of sql/queries.sql."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, ProgrammingError

from dispatcher.cli.context import stores
from dispatcher.cli.errors import BadArgument
from dispatcher.cli.render import console, rows_table
from dispatcher.cli.sql_queries import WHOLE, Query, load
from dispatcher.db.engine import driver_error, init_schema
from dispatcher.db.schema import SCHEMA_VERSION

db_app = typer.Typer(help="The database schema.", no_args_is_help=True)


@db_app.command()
def init(ctx: typer.Context) -> None:
    """Create or upgrade the schema (idempotent; every dispatcher also does it when it starts)."""
    s = stores(ctx)
    init_schema(s.make_engine(create=True))
    console().print(f"schema version {SCHEMA_VERSION} ready in {s.db_where()}", soft_wrap=True)


def _value(raw: str) -> Any:
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def _within(whole: str, low: int, high: int) -> bool:
    try:
        return low <= int(whole) <= high
    except ValueError:  # past int()'s 4,300-digit limit: far outside any range
        return False


def _shown(query: Query, param: str) -> str:
    """``minutes=60 (1..5256000)`` in ``gpuq sql --list``: the values refused are no surprise."""
    low_high = query.ranges.get(param)
    limits = f" ({low_high[0]}..{low_high[1]})" if low_high else ""
    return f"{param}={query.defaults.get(param, '?')}{limits}"


def _bind(query: Query, given: list[str]) -> dict[str, Any]:
    values = dict(query.defaults)
    for item in given:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadArgument(f"--param {item!r} is not NAME=VALUE")
        if key not in query.parameters:
            takes = ", ".join(query.parameters) or "none"
            raise BadArgument(f"query {query.name} has no parameter {key!r} (it takes: {takes})")
        default = query.defaults.get(key, "")
        if WHOLE.fullmatch(default) and not WHOLE.fullmatch(value.strip()):
            # MySQL would read "abc" as 0 and answer rows for it: refuse instead
            raise BadArgument(f"--param {key}={value!r}: a whole number, like its default {default}")
        if key in query.ranges:
            # a window of -5 minutes answered negative busy seconds and a 10^20 one no attempts at all (an
            # outside trial): MySQL computes either without complaint
            low, high = query.ranges[key]
            if not _within(value, low, high):
                shown = value.strip() if len(value.strip()) <= 24 else value.strip()[:20] + "…"
                raise BadArgument(
                    f"--param {key}={shown}: out of range for {query.name}, which takes a whole"
                    f" number from {low} to {high} (default {default})"
                )
        values[key] = value
    missing = [p for p in query.parameters if p not in values]
    if missing:
        raise BadArgument(f"query {query.name} needs --param {missing[0]}=VALUE")
    return {k: _value(v) for k, v in values.items() if k in query.parameters}


def sql(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="A query of sql/queries.sql.")] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the queries.")] = False,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="NAME=VALUE.")] = None,
) -> None:
    """Run a named operator query (MySQL/MariaDB) and print its rows as a table."""
    queries = load()
    if list_ or name is None:
        console().print(
            rows_table(
                ("query", "parameters", "what it shows"),
                ((q.name, ", ".join(_shown(q, p) for p in q.parameters), q.doc) for q in queries.values()),
            )
        )
        return
    query = queries.get(name)
    if query is None:
        raise BadArgument(f"no query named {name!r}; known: {', '.join(queries)}")
    params = _bind(query, param or [])
    s = stores(ctx)
    try:
        with s.engine.connect() as conn:
            result = conn.execute(text(query.sql), params)
            columns = list(result.keys())
            rows = result.all()
    except ProgrammingError as exc:
        if driver_error(exc)[1] == 1146:  # no gpuq tables: app.py says "run `gpuq db init`"
            raise
        raise BadArgument(f"query {name} failed: {exc.orig}") from exc
    except DBAPIError as exc:
        if s.engine.dialect.name != "sqlite":
            raise  # the database went away: app.py reports it as unreachable
        raise BadArgument(
            f"query {name} is MySQL SQL; the embedded SQLite database cannot run it ({exc.orig})"
        ) from exc
    console().print(rows_table(columns, rows, title=f"{name} ({len(rows)} rows)", title_justify="left"))
