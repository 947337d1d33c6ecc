"""Several statements in one round trip to the database, for the hot path's group commit.

Each round trip of a batch waits for a MariaDB thread and the hot thread to be scheduled; on a loaded box that
wait, not the statements' work, is most of a slot's turnaround (bench/RESULTS.md, issue 12). Statements whose
parameters do not depend on each other's results go out together: the hot connection is opened with
``CLIENT.MULTI_STATEMENTS`` (``hot_engine``) and ``pipeline`` sends them as one ``a; b; c`` query, then reads
one result per statement, in order, as if each had been executed alone. The server runs them in order in the
same transaction and stops at the first error, which is raised as ``conn.execute`` would raise it (a
``DBAPIError``, the connection invalidated when it was lost), so the caller's retry and rollback are the same.

Values are bound by the driver's own escaping (``cursor.mogrify``, what PyMySQL does for every statement
anyway: it has no server-side parameters), never pasted in. Any other connection (SQLite, the pool's
connections, a driver without the flag) runs the same statements one after the other through
``conn.execute``: same results, more round trips.

``round_trips`` counts what a connection sent (statements, pipelines, COMMITs and ROLLBACKs): the figure
issue 12 is about, visible to tests and ``python -m bench.handoff``.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import Executable
from sqlalchemy.sql.cache_key import NO_CACHE

_TRIPS = "gpuq_round_trips"


@dataclass(slots=True)
class Outcome:
    """One statement's result: rows changed (or matched, as ``conn.execute`` counts them), rows read."""

    rowcount: int
    rows: list[Any] = field(default_factory=list)  # attribute access by column name, as ``Row``


def hot_engine(engine: Engine, *, pool_size: int) -> Engine:
    """An engine like ``engine`` whose connections accept several statements per query (MySQL/MariaDB), for
    the hot threads only; SQLite's engine is returned as it is (no network, nothing to save)."""
    if engine.dialect.name not in ("mysql", "mariadb"):
        count_round_trips(engine)
        return engine
    from pymysql.constants import CLIENT

    hot = create_engine(
        engine.url,
        pool_size=pool_size,
        max_overflow=0,
        pool_recycle=3600,
        pool_reset_on_return=None,
        isolation_level="READ COMMITTED",
        connect_args={"connect_timeout": 5, "read_timeout": 30, "write_timeout": 30},
    )

    @event.listens_for(hot, "do_connect")
    def _multi(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
        # Added to the flags SQLAlchemy sets (FOUND_ROWS: rowcount counts matched rows), not instead of them.
        cparams["client_flag"] = int(cparams.get("client_flag", 0)) | CLIENT.MULTI_STATEMENTS

    _commits_in_pipeline(hot)
    count_round_trips(hot)
    return hot


#: ``conn.info`` key: the transaction may be committed by its last pipeline (set by the hot thread around the
#: whole transaction). That it was is an attribute of the driver's connection (``_COMMITTED``), which every
#: hook below can reach (SQLAlchemy hands some of them a pool record without ``info``).
MAY_COMMIT = "gpuq_may_commit"
#: ``conn.info`` key: called as the committing pipeline goes out (the hot thread's ``STATEMENTS_DONE``: the
#: next batch may start its statements while this one's last round trip runs).
LAST_TRIP = "gpuq_last_trip"
_COMMITTED = "_gpuq_committed"


def _driver(connection: Any) -> Any:
    """The driver's own connection behind a pool proxy (or the driver's connection itself)."""
    return getattr(connection, "dbapi_connection", connection)


def _commits_in_pipeline(hot: Engine) -> None:
    """Let a pipeline's COMMIT stand for the transaction's: SQLAlchemy ends ``with conn.begin()`` by sending
    COMMIT, one more round trip after a pipeline that ended in one already. The flag is dropped by any
    ROLLBACK too, so it never outlives the transaction that set it."""
    dialect = hot.dialect
    commit, rollback = dialect.do_commit, dialect.do_rollback

    def do_commit(dbapi_connection: Any) -> None:
        driver = _driver(dbapi_connection)
        if getattr(driver, _COMMITTED, False):
            setattr(driver, _COMMITTED, False)
        else:
            commit(dbapi_connection)

    def do_rollback(dbapi_connection: Any) -> None:
        driver = _driver(dbapi_connection)
        if getattr(driver, _COMMITTED, False):
            setattr(driver, _COMMITTED, False)
        rollback(dbapi_connection)

    dialect.do_commit = do_commit  # type: ignore[method-assign]
    dialect.do_rollback = do_rollback  # type: ignore[method-assign]

    @event.listens_for(hot, "before_cursor_execute")
    def _nothing_after_commit(conn: Connection, *_args: Any) -> None:
        # A statement after the COMMIT would run in a transaction of its own that nobody commits (SQLAlchemy
        # skips its COMMIT): lost, or committed with the connection's next transaction. Refused loudly.
        if not conn.invalidated and getattr(_driver(conn.connection), _COMMITTED, False):
            raise RuntimeError("a statement after the COMMIT a pipeline sent for this transaction")


def may_commit(conn: Connection) -> bool:
    """Whether the caller's last pipeline may end the transaction (``pipeline(commit=True)``): only on a hot
    thread's connection, inside the transaction it runs (``HotThread``), where nothing follows the work."""
    return bool(conn.info.get(MAY_COMMIT)) and multi_statements(conn)


def count_round_trips(engine: Engine) -> None:
    """Count per connection (``round_trips``) the statements, COMMITs and ROLLBACKs SQLAlchemy sends."""
    if event.contains(engine, "before_cursor_execute", _count_statement):
        return
    event.listen(engine, "before_cursor_execute", _count_statement)
    event.listen(engine, "commit", _count_commit)
    event.listen(engine, "rollback", _count_end)


def _count_statement(conn: Connection, *_args: Any) -> None:
    _count_end(conn)


def _count_commit(conn: Connection) -> None:
    if conn.invalidated or not getattr(_driver(conn.connection), _COMMITTED, False):
        _count_end(conn)  # else it went out with the last pipeline, counted there


def _count_end(conn: Connection) -> None:
    if not conn.invalidated:  # a lost connection's info would reconnect to be read; nobody counts it now
        conn.info[_TRIPS] = conn.info.get(_TRIPS, 0) + 1


def round_trips(conn: Connection) -> int:
    """Round trips this connection made so far (counted where ``count_round_trips`` was set up, else 0)."""
    return int(conn.info.get(_TRIPS, 0))


def multi_statements(conn: Connection) -> bool:
    """Whether this connection takes several statements in one query."""
    if conn.dialect.name not in ("mysql", "mariadb"):
        return False
    from pymysql.constants import CLIENT

    return bool(getattr(conn.connection.dbapi_connection, "client_flag", 0) & CLIENT.MULTI_STATEMENTS)


def pipeline(
    conn: Connection, statements: Sequence[tuple[Executable, dict[str, Any]]], *, commit: bool = False
) -> list[Outcome]:
    """Run ``statements`` in order, in the caller's transaction, in one round trip where the connection
    allows it; one ``Outcome`` per statement. The first error stops the rest and is raised. ``commit``
    (only where ``may_commit``): a COMMIT goes out with them, the transaction's own; the caller sends
    nothing more in it."""
    if commit and not may_commit(conn):
        raise ValueError("this connection's transaction cannot be committed by a pipeline")
    if (len(statements) < 2 and not commit) or not multi_statements(conn):
        out = []
        for statement, params in statements:
            result = conn.execute(statement, params)
            read: list[Any] = list(result.all()) if result.returns_rows else []
            out.append(Outcome(int(result.rowcount), read))
        return out
    dbapi_conn = conn.connection.dbapi_connection
    assert dbapi_conn is not None
    cursor = dbapi_conn.cursor()
    parts = [_render(conn, cursor, statement, params) for statement, params in statements]
    sql = ";\n".join([*parts, "COMMIT"] if commit else parts)
    # One round trip, seen by the engine's listeners as one statement (``round_trips``, tests' recorders).
    for listener in conn.dispatch.before_cursor_execute:
        listener(conn, cursor, sql, None, None, False)
    if commit and (last_trip := conn.info.pop(LAST_TRIP, None)) is not None:
        last_trip()
    try:
        out = []
        cursor.execute(sql)
        for i in range(len(statements)):
            if i:
                cursor.nextset()  # raises the error of statement i, if it failed
            rows = []
            if cursor.description is not None:
                row_type = _row_type(tuple(d[0] for d in cursor.description))
                rows = [row_type(*r) for r in cursor.fetchall()]
            out.append(Outcome(int(cursor.rowcount), rows))
        if commit:
            if statements:
                cursor.nextset()  # the COMMIT's answer: raises if it failed
            # Only now: a COMMIT that never ran (a statement before it failed, the error handled by the
            # caller, a savepoint rolled back) must not make SQLAlchemy skip the transaction's own.
            setattr(dbapi_conn, _COMMITTED, True)
        cursor.close()
        return out
    except conn.dialect.loaded_dbapi.Error as exc:
        lost = conn.dialect.is_disconnect(exc, dbapi_conn, cursor)
        if lost:
            conn.invalidate(exc)
        raise DBAPIError.instance(
            sql, None, exc, conn.dialect.loaded_dbapi.Error, connection_invalidated=lost, dialect=conn.dialect
        ) from exc


_ROW_TYPES: dict[tuple[str, ...], Any] = {}


def _row_type(columns: tuple[str, ...]) -> Any:
    """A row class with attribute access by column name (made once per column list: ~0.1 ms each)."""
    row_type = _ROW_TYPES.get(columns)
    if row_type is None:
        if len(_ROW_TYPES) >= 256:
            _ROW_TYPES.clear()
        row_type = _ROW_TYPES[columns] = namedtuple("Row", columns, rename=True)
    return row_type


#: How to render each statement, by its SQL and bound types: compiling a statement again per batch cost
#: ~0.1 ms of CPU each, as much as the round trip saved on a quiet machine. Bounded: the SQL of a batch varies
#: only with its size and which values its items share.
_PLANS: dict[tuple[Any, ...], _Plan] = {}
_PLANS_MAX = 512


@dataclass(slots=True)
class _Plan:
    """A compiled statement and, where it allows, the driver's own SQL for it with its lists still to spell
    out (``template``). SQLAlchemy's general way (``construct_expanded_state``) took a seventh of a hand-off
    batch's CPU; this is a dict and a string replace per list."""

    compiled: Any
    template: str | None  # None: render through SQLAlchemy
    processors: dict[str, Any]
    names: tuple[str, ...]  # the parameters it binds, lists included
    lists: tuple[str, ...]  # the expanding parameters, each ``(__[POSTCOMPILE_name])`` in the template


def _plan(conn: Connection, statement: Executable) -> _Plan:
    sql = getattr(statement, "text", None)
    binds = getattr(statement, "_bindparams", {})
    if sql is None or any(b.value is not None or b.callable is not None for b in binds.values()):
        # Not a text() (no cheap key), or values bound in it, which its SQL does not show: compiled each time.
        return _make_plan(conn.dialect, statement)
    dialect = conn.dialect
    # A type's arguments count (a processor may depend on them), and so does the paramstyle (the SQL's).
    shape = tuple((name, b.type._static_cache_key, b.expanding) for name, b in binds.items())
    if any(type_key is NO_CACHE for _, type_key, _ in shape):  # a type that cannot say what it depends on
        return _make_plan(dialect, statement)
    key = (dialect.name, dialect.paramstyle, sql, shape)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        plan = _PLANS[key] = _make_plan(conn.dialect, statement)
    return plan


def _make_plan(dialect: Any, statement: Executable) -> _Plan:
    compiled = statement.compile(dialect=dialect)  # type: ignore[attr-defined]
    lists = tuple(bind.key for bind in compiled.binds.values() if bind.expanding)
    plain = (
        dialect.paramstyle == "pyformat"
        and not compiled.positional
        and not compiled.literal_execute_params
        and not compiled.escaped_bind_names  # a name SQLAlchemy respelled in the SQL
        and {bind.key for bind in compiled.post_compile_params} == set(lists)
        # each list as a bare token: not wrapped in its type's SQL expression (bind_expression)
        and all(f"(__[POSTCOMPILE_{name}])" in compiled.string for name in lists)
    )
    names = tuple(dict.fromkeys(compiled.bind_names.values()))
    processors = dict(compiled._bind_processors)
    return _Plan(compiled, compiled.string if plain else None, processors, names, lists)


def _render(conn: Connection, cursor: Any, statement: Executable, params: dict[str, Any]) -> str:
    """``statement`` with ``params`` bound as the driver would bind them (types' processors applied)."""
    plan = _plan(conn, statement)
    if plan.template is not None:
        rendered = _render_plain(plan, plan.template, cursor, params)
        if rendered is not None:
            return rendered
    state = plan.compiled.construct_expanded_state(params)
    values = dict(state.parameters)
    # As SQLAlchemy executes it: the statement's processors, and those of the lists' spelled-out items.
    processors = {**plan.processors, **state.processors}
    for name, process in processors.items():
        if name in values and process is not None:
            values[name] = process(values[name])
    return str(cursor.mogrify(state.statement, values))


def _render_plain(plan: _Plan, sql: str, cursor: Any, params: dict[str, Any]) -> str | None:
    """``_render`` without SQLAlchemy: each list spelled out as placeholders of its own, values processed
    as SQLAlchemy would (a list's processor applies to each item), all escaped by the driver. None for what
    only SQLAlchemy spells (an empty list, a list of tuples) or says is wrong (a parameter missing)."""
    try:
        values = {name: params[name] for name in plan.names}
    except KeyError:
        return None
    for name in plan.lists:
        items = values.pop(name)
        if not items or any(isinstance(item, (tuple, list)) for item in items):
            return None  # SQLAlchemy spells an empty list, and a list of tuples as a tuple IN
        process = plan.processors.get(name)
        keys = [f"{name}__{i}" for i in range(len(items))]
        if any(key in values for key in keys):
            return None
        for key, item in zip(keys, items, strict=True):
            values[key] = item if process is None else process(item)
        sql = sql.replace(f"__[POSTCOMPILE_{name}]", ", ".join(f"%({key})s" for key in keys))
    for name, process in plan.processors.items():
        if name in values and name not in plan.lists:
            values[name] = process(values[name])
    return str(cursor.mogrify(sql, values))
