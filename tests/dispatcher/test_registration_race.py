"""Two dispatchers starting together on an empty database register the same new GPU at once.

Under READ COMMITTED a locking read of a row that does not exist yet locks nothing, so both found no row and
both INSERTed; the second then failed on the key (the compose stack's two dispatchers hit it: one died with
"Duplicate entry 'g1'"). Registrations now take one lock first (``gpus.in_turn``): the second waits for the
first's commit, then judges the row it finds. The test makes the interleaving exact: the other dispatcher's
registration has begun (its turn taken, its row not yet written) when this one starts its own. MariaDB only:
SQLite lets one writer in at a time (BEGIN IMMEDIATE).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from dispatcher.db.engine import make_engine, transaction, utcnow
from dispatcher.db.gpus import GpuRow, in_turn, register_new
from tests.dispatcher.helpers import fleet_engine


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = fleet_engine(database_url, {})
    yield eng
    eng.dispose()


@pytest.mark.parametrize("same_url", [True, False])
def test_a_gpu_registered_by_another_dispatcher_meanwhile_is_judged_not_fatal(engine, database_url, same_url):
    # GIVEN another dispatcher registering g9, its transaction still open
    theirs = "http://a/g9" if not same_url else "http://b/g9"
    other = make_engine(database_url)
    outcome: list[GpuRow | BaseException | None] = []

    def this_one() -> None:
        try:
            outcome.append(
                transaction(
                    engine,
                    register_new,
                    gpu_id="g9",
                    url="http://b/g9",
                    pool="default",
                    slot_count=2,
                    now=utcnow(),
                )
            )
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    try:
        with other.connect() as conn:
            with conn.begin():
                in_turn(conn)  # the other's registration has begun: its look found no g9
                # WHEN this one registers g9 as http://b/g9 meanwhile
                starting = threading.Thread(target=this_one)
                starting.start()
                starting.join(0.5)
                assert starting.is_alive(), "it did not wait for the other's registration"
                assert (
                    register_new(conn, gpu_id="g9", url=theirs, pool="default", slot_count=4, now=utcnow())
                    is None
                )
            starting.join(30)
    finally:
        other.dispose()

    # THEN it did not die on the duplicate key nor write over the other's row: the same registration is fine,
    # a different one is reported (the caller stops with one line), and the other's stands with its 4 slots
    assert len(outcome) == 1 and not isinstance(outcome[0], BaseException), outcome
    known = outcome[0]
    if same_url:
        assert known is None
    else:
        assert known is not None and known.url == "http://a/g9"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT url FROM gpus WHERE gpu_id = 'g9'")).scalar_one() == theirs
        assert conn.execute(text("SELECT COUNT(*) FROM slots WHERE gpu_id = 'g9'")).scalar_one() == 4
