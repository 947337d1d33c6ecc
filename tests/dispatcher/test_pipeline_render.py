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
from sqlalchemy import Engine, text
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


def _by_sqlalchemy(conn: Any, cursor: Any, stmt: Any, params: dict[str, Any]) -> str:
    """What ``_render`` sent before: SQLAlchemy's expanded state, bound by the driver."""
    state = stmt.compile(dialect=conn.dialect).construct_expanded_state(params)
    values = dict(state.parameters)
    for name, process in state.processors.items():
        if name in values and process is not None:
            values[name] = process(values[name])
    return str(cursor.mogrify(state.statement, values))


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
    free, free_params = _free_ended(items, NOW)
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
