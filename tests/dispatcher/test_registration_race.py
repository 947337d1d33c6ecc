"""Two dispatchers starting together on an empty database register the same new GPU at once.

Under READ COMMITTED a locking read of a row that does not exist yet locks nothing, so both find no row and
both INSERT; the second then fails on the key. The compose stack's two dispatchers hit it (one died with
"Duplicate entry 'g1'"). The test makes the interleaving exact: the other dispatcher's row is committed
right before this one's INSERT runs. MariaDB only: SQLite lets one writer in at a time (BEGIN IMMEDIATE).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Connection, Engine, event, text

from dispatcher.db.engine import make_engine, transaction, utcnow
from dispatcher.db.gpus import register_new
from tests.dispatcher.helpers import fleet_engine


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = fleet_engine(database_url, {})
    yield eng
    eng.dispose()


def _other_dispatcher_commits_first(engine: Engine, database_url: str, url: str) -> tuple[list[bool], Engine]:
    """Commit another dispatcher's registration of g9 just before this engine's INSERT INTO gpus runs."""
    other = make_engine(database_url)
    fired: list[bool] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _race(conn: Connection, cursor: object, statement: str, *args: object) -> None:
        if fired or not statement.lstrip().upper().startswith("INSERT INTO GPUS"):
            return
        fired.append(True)
        transaction(other, register_new, gpu_id="g9", url=url, pool="default", slot_count=4, now=utcnow())

    return fired, other


@pytest.mark.parametrize("same_url", [True, False])
def test_a_gpu_registered_by_another_dispatcher_meanwhile_is_judged_not_fatal(engine, database_url, same_url):
    # GIVEN another dispatcher that registers g9 between this one's look and its INSERT
    theirs = "http://a/g9" if not same_url else "http://b/g9"
    fired, other = _other_dispatcher_commits_first(engine, database_url, theirs)

    # WHEN this one registers g9 as http://b/g9
    known = transaction(
        engine, register_new, gpu_id="g9", url="http://b/g9", pool="default", slot_count=4, now=utcnow()
    )

    # THEN it did not die on the duplicate key: the same registration is fine, a different one is reported
    # (the caller stops with one line), and the other's registration stands with its 4 slots
    assert fired == [True]
    if same_url:
        assert known is None
    else:
        assert known is not None and known.url == "http://a/g9"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT url FROM gpus WHERE gpu_id = 'g9'")).scalar_one() == theirs
        assert conn.execute(text("SELECT COUNT(*) FROM slots WHERE gpu_id = 'g9'")).scalar_one() == 4
    other.dispose()
