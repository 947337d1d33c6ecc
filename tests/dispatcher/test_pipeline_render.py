"""A pipeline renders its statements without SQLAlchemy's general expansion (``db/pipeline.py _render_plain``,
issue 12: a seventh of a hand-off batch's CPU). The SQL it sends must be exactly what SQLAlchemy's way gives,
for the hot path's real statements and for values a careless or hostile caller sends (quotes, ``%``,
placeholders in data, backslashes, NUL, non-ASCII, None, microseconds); what only SQLAlchemy spells (an empty
list) or rejects (a missing parameter) still goes its way. Real MariaDB: the driver's escaping is what counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    Engine,
    String,
    TypeDecorator,
    bindparam,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.exc import InvalidRequestError

from dispatcher.db import pipeline as pl
from dispatcher.db.batch import OURS, claim_statement, end_final_statement, statement
from dispatcher.db.engine import make_engine
from dispatcher.db.handoff import CURRENT, _free_ended, _history_of_ended
from dispatcher.db.handoff_claims import _insert_won
from dispatcher.db.snapshot import SNAPSHOT_ENDING
from dispatcher.states import Outcome

NOW = datetime(2026, 11, 30, 12, 0, 0, 123456)
HOSTILE = [
    "plain",
    "it's",
    'say "hi"',
    "100%",
    "%(now)s",
    "%s",
    "back\\slash",
    "nul\x00",
    "ü∑😀",
    "a;DROP",
    "",
]


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    e = make_engine(database_url)
    yield e
    e.dispose()


@pytest.fixture(autouse=True)
def _fresh_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pl, "_PLANS", {})


class _Captured(Exception):
    pass


def _by_sqlalchemy(conn: Any, cursor: Any, stmt: Any, params: dict[str, Any]) -> str:
    """What ``conn.execute`` would send for the statement on its own: the SQL and parameters SQLAlchemy hands
    the driver, bound by the driver (captured before it runs, which it then does not)."""
    sent: list[str] = []

    def capture(_conn: Any, _cursor: Any, sql: str, parameters: Any, *_: Any) -> None:
        sent.append(str(cursor.mogrify(sql, parameters)))
        raise _Captured

    event.listen(conn, "before_cursor_execute", capture)
    try:
        with pytest.raises(_Captured):
            conn.execute(stmt, params)
    finally:
        event.remove(conn, "before_cursor_execute", capture)
    conn.rollback()
    return sent[0]


def _sent(conn: Any, stmt: Any, params: dict[str, Any]) -> Any:
    """What the pipeline would send, run on its own: the row MariaDB answers."""
    cursor = conn.connection.dbapi_connection.cursor()
    return conn.exec_driver_sql(pl._render(conn, cursor, stmt, params).replace("%", "%%")).one()


class Prefixed(TypeDecorator[str]):
    """A type whose processor depends on its argument."""

    impl = String
    cache_ok = True

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return None if value is None else self.prefix + value


class Lowered(TypeDecorator[str]):
    """A type that wraps its parameter in SQL."""

    impl = String
    cache_ok = True

    def bind_expression(self, bindvalue: Any) -> Any:
        return func.lower(bindvalue)


def _statements() -> list[tuple[str, Any, dict[str, Any]]]:
    ids = HOSTILE
    picks = [
        {"gpu_id": f"g{i % 3}", "slot_index": i, "task_id": task_id, "attempt": 1}
        for i, task_id in enumerate(ids)
    ]
    claim, claim_params, _ = claim_statement(
        _Mysql(), picks=picks, now=NOW, lease=NOW, dispatcher_id="d'1", takeover=ids[:3]
    )
    items = [
        {"task_id": t, "attempt": 1 + i % 2, "final": "finished" if i % 2 else "failed", "error": t or None,
         "reported": "finished", "result": {"x": t} if i % 3 else None, "outcome": Outcome.FINISHED,
         "retry": False, "refund": False, "expiry": False}
        for i, t in enumerate(ids)
    ]  # fmt: skip
    for item in items:
        item["result"] = None if item["result"] is None else str(item["result"])
    end, end_params = end_final_statement(items=items, now=NOW)
    history, history_params = _history_of_ended(items, items, NOW)
    rows = [
        {"task_id": t, "queue": "q%", "type": "t'", "pool": "p", "priority": i, "data": '{"a": "%s"}',
         "enqueued_at": NOW}
        for i, t in enumerate(ids)
    ]  # fmt: skip
    insert, insert_params = _insert_won(rows, "d%1", 3, NOW)
    free, free_params = _free_ended(items, NOW, 60.0)
    return [
        ("claim with takeover", claim, claim_params),
        ("end of final attempts", end, end_params),
        ("history", history, history_params),
        ("insert of the won", insert, insert_params),
        ("free of the ended", free, free_params),
        ("current rows", CURRENT, {"ids": ids}),
        ("who won", OURS, {"ids": ids, "dispatcher_id": "d", "now": NOW}),
        ("snapshot of an ending", SNAPSHOT_ENDING, {"ending": ids}),
        ("one list of one", statement("SELECT :a, :b IN :l", lists=("l",)), {"a": None, "b": 7, "l": [1]}),
    ]


class _Mysql:
    """Enough of a connection for ``claim_statement`` to pick MySQL's spelling."""

    class dialect:
        name = "mysql"


@pytest.mark.parametrize("case", range(len(_statements())), ids=[c[0] for c in _statements()])
def test_the_sql_sent_is_what_sqlalchemy_renders(engine: Engine, case: int) -> None:
    _, stmt, params = _statements()[case]
    with engine.connect() as conn:
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        plan = pl._plan(conn, stmt)
        assert plan.template is not None, "the hot statements render without SQLAlchemy"
        assert pl._render_plain(plan, plan.template, cursor, params) is not None
        assert pl._render(conn, cursor, stmt, params) == _by_sqlalchemy(conn, cursor, stmt, params)


def test_rendered_values_reach_the_database_unchanged(engine: Engine) -> None:
    """Not only the same string: each hostile value comes back from MariaDB as it went in."""
    stmt = statement("SELECT :v AS v, :t AS ts, 1 IN :l AS hit", stamps=("t",), lists=("l",))
    with engine.connect() as conn:
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        for value in HOSTILE:
            sql = pl._render(conn, cursor, stmt, {"v": value, "t": NOW, "l": [value, 1]})
            row = conn.exec_driver_sql(sql.replace("%", "%%")).one()
            assert (row.v, row.ts, row.hit) == (value, str(NOW), 1)


def test_an_empty_list_goes_sqlalchemys_way(engine: Engine) -> None:
    stmt = statement("SELECT COUNT(*) FROM (SELECT 1 AS x) t WHERE x IN :l", lists=("l",))
    with engine.connect() as conn:
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        plan = pl._plan(conn, stmt)
        assert pl._render_plain(plan, plan.template or "", cursor, {"l": []}) is None
        sql = pl._render(conn, cursor, stmt, {"l": []})
        assert sql == _by_sqlalchemy(conn, cursor, stmt, {"l": []})
        assert conn.exec_driver_sql(sql).scalar_one() == 0


def test_a_missing_parameter_is_sqlalchemys_error_not_a_key_error(engine: Engine) -> None:
    with engine.connect() as conn:
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        with pytest.raises(InvalidRequestError, match="now"):
            pl._render(conn, cursor, OURS, {"ids": ["a"], "dispatcher_id": "d"})


def test_a_parameter_named_like_a_spelled_out_list_item_goes_sqlalchemys_way(engine: Engine) -> None:
    stmt = statement("SELECT :l__0 AS a, 2 IN :l AS hit", lists=("l",))
    params = {"l__0": "mine", "l": [2]}
    with engine.connect() as conn:
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        plan = pl._plan(conn, stmt)
        assert pl._render_plain(plan, plan.template or "", cursor, params) is None
        row = conn.exec_driver_sql(pl._render(conn, cursor, stmt, params)).one()
        assert (row.a, row.hit) == ("mine", 1)


def test_a_core_statement_is_rendered_too(engine: Engine) -> None:
    """Not a ``text()``: compiled each time (no cheap key), rendered the same way."""
    from sqlalchemy import column, literal, select

    stmt = select(literal("x'%").label("a")).where(column("b").in_([1, 2]))
    with engine.connect() as conn:
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        assert pl._render(conn, cursor, stmt, {}) == _by_sqlalchemy(conn, cursor, stmt, {})


def test_the_plans_kept_are_bounded(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pl, "_PLANS", {})
    monkeypatch.setattr(pl, "_PLANS_MAX", 4)
    with engine.connect() as conn:
        for i in range(10):
            pl._plan(conn, text(f"SELECT {i}"))
            assert len(pl._PLANS) <= 4


# -- from the outside review of the renderer: what must not share a plan, or not take the fast way ----------


def test_two_statements_whose_types_differ_only_in_arguments_do_not_share_a_plan(engine: Engine) -> None:
    sql = "SELECT :s AS s, 1 IN :l AS hit"
    a = text(sql).bindparams(bindparam("s", type_=Prefixed("A:")), bindparam("l", expanding=True))
    b = text(sql).bindparams(bindparam("s", type_=Prefixed("B:")), bindparam("l", expanding=True))
    with engine.connect() as conn:
        assert conn.execute(b, {"s": "x", "l": [1]}).one().s == "B:x"
        assert _sent(conn, a, {"s": "x", "l": [1]}).s == "A:x"
        assert _sent(conn, b, {"s": "x", "l": [1]}).s == "B:x"


def test_values_bound_in_a_statement_are_its_own(engine: Engine) -> None:
    one = text("SELECT :x AS x, 1 IN :l AS hit").bindparams(bindparam("l", expanding=True), x="one")
    two = text("SELECT :x AS x, 1 IN :l AS hit").bindparams(bindparam("l", expanding=True), x="two")
    with engine.connect() as conn:
        assert _sent(conn, one, {"l": [1]}).x == "one"
        assert _sent(conn, two, {"l": [1]}).x == "two"


def test_a_plan_made_for_another_paramstyle_is_not_reused(engine: Engine) -> None:
    other = create_engine(engine.url.render_as_string(hide_password=False), paramstyle="format")
    stmt = text("SELECT :a AS a, 1 IN :l AS hit").bindparams(bindparam("l", expanding=True))
    try:
        with other.connect() as conn:
            pl._plan(conn, stmt)
        with engine.connect() as conn:
            assert _sent(conn, stmt, {"a": "x", "l": [1]}).a == "x"
    finally:
        other.dispose()


def test_typed_parameters_are_processed_the_same_with_an_empty_list(engine: Engine) -> None:
    stmt = text("SELECT :s AS s, :j AS j, COUNT(*) AS n FROM (SELECT 1 AS x) t WHERE x IN :l").bindparams(
        bindparam("s", type_=Prefixed("P:")), bindparam("j", type_=JSON), bindparam("l", expanding=True)
    )
    with engine.connect() as conn:
        want = conn.execute(stmt, {"s": "x", "j": {"k": "v"}, "l": []}).one()
        assert (want.s, want.j) == ("P:x", '{"k": "v"}')
        assert tuple(_sent(conn, stmt, {"s": "x", "j": {"k": "v"}, "l": [1]}))[:2] == (want.s, want.j)
        assert tuple(_sent(conn, stmt, {"s": "x", "j": {"k": "v"}, "l": []}))[:2] == (want.s, want.j)


def test_a_list_whose_type_wraps_it_in_sql(engine: Engine) -> None:
    stmt = text("SELECT 'a' IN :l AS hit").bindparams(bindparam("l", expanding=True, type_=Lowered()))
    with engine.connect() as conn:
        assert conn.execute(stmt, {"l": ["A"]}).one().hit == 1
        assert _sent(conn, stmt, {"l": ["A"]}).hit == 1


def test_a_core_statement_with_a_respelled_parameter_name(engine: Engine) -> None:
    stmt = select(bindparam("a b", type_=String).label("v"))
    with engine.connect() as conn:
        assert conn.execute(stmt, {"a b": "x"}).one().v == "x"
        assert _sent(conn, stmt, {"a b": "x"}).v == "x"


def test_a_list_of_tuples_means_what_it_means_to_sqlalchemy(engine: Engine) -> None:
    stmt = text("SELECT ('c', 'd') IN :l AS hit").bindparams(bindparam("l", expanding=True))
    params = {"l": [("a", "b"), "cd"]}
    with engine.connect() as conn:
        assert conn.execute(stmt, params).one().hit == 1
        assert _sent(conn, stmt, params).hit == 1


class Uncached(TypeDecorator[str]):
    """A type that does not say it may be cached (no ``cache_ok``): its arguments are not in its cache key."""

    impl = String

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return None if value is None else self.prefix + value


@pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SAWarning")
def test_statements_of_a_type_without_a_cache_key_are_not_shared(engine: Engine) -> None:
    sql = "SELECT :s AS s, 1 IN :l AS hit"
    a = text(sql).bindparams(bindparam("s", type_=Uncached("A:")), bindparam("l", expanding=True))
    b = text(sql).bindparams(bindparam("s", type_=Uncached("B:")), bindparam("l", expanding=True))
    with engine.connect() as conn:
        assert _sent(conn, a, {"s": "x", "l": [1]}).s == "A:x"
        assert _sent(conn, b, {"s": "x", "l": [1]}).s == "B:x"
