"""Fewer round trips per hand-off batch (issue 12): the end, its history rows and the snapshot go out in one
round trip on the hot connection (``db/pipeline.py``, ``db/handoff.py _end_folded``), the claim stays the
conditional UPDATE. Real MariaDB (several statements per query) and SQLite (one after the other, same code).

What must not change: a stale or repeated callback in a folded batch neither ends anything nor hands its
task's live slot to another job; the history has one row per attempt ended; a statement of the pipeline that
fails fails the whole transaction (nothing of it stays) and a lost connection is rerun like any other.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from dispatcher.db.attempts import slot_drift
from dispatcher.db.engine import transaction
from dispatcher.db.handoff import HandOff
from dispatcher.db.pipeline import hot_engine, multi_statements, pipeline, round_trips
from dispatcher.states import Outcome
from tests.dispatcher.helpers import fleet, hand_off, kill_connection, on_hot_thread, start

SLOTS = 4


@pytest.fixture
def engine(any_database_url: str) -> Iterator[Engine]:
    with fleet(any_database_url, {"g0": SLOTS}) as e:
        yield e


@pytest.fixture
def hot(engine: Engine) -> Iterator[Engine]:
    """The hot threads' kind of connection: several statements per query on MariaDB."""
    h = hot_engine(engine, pool_size=1)
    yield h
    if h is not engine:
        h.dispose()


def _mariadb(engine: Engine) -> bool:
    return engine.dialect.name in ("mysql", "mariadb")


def _item(task_id: str, attempt: int = 1) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "attempt": attempt,
        "outcome": Outcome.FINISHED,
        "result": {"ok": task_id},
        "error": None,
        "reported": "finished",
    }


def _batch(
    hot: Engine, items: list[dict[str, Any]], candidates: list[str], *, fold: bool = True
) -> tuple[HandOff, int]:
    """One group-commit batch on a hot connection; returns it and the round trips it took (COMMIT included)."""
    with hot.connect() as conn:
        before = round_trips(conn)
        with conn.begin():
            out = hand_off(conn, items, candidates, fold=fold)
        return out, round_trips(conn) - before


def _slots(engine: Engine) -> dict[int, str | None]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT slot_index, task_id FROM slots WHERE gpu_id = 'g0'")).all()
    return {int(r.slot_index): r.task_id for r in rows}


def _history(engine: Engine) -> list[tuple[str, int, str]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT task_id, attempt, outcome FROM attempts ORDER BY task_id")).all()
    return [(r.task_id, int(r.attempt), r.outcome) for r in rows]


def _states(engine: Engine) -> dict[str, tuple[str, int]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT task_id, state, attempt FROM tasks")).all()
    return {r.task_id: (r.state, int(r.attempt)) for r in rows}


def test_a_saturated_batch_hands_off_in_three_round_trips_instead_of_six_and_two_on_a_hot_thread(
    engine: Engine, hot: Engine
) -> None:
    start(engine, ["t1", "t2", "t3", "t4"])
    before = _slots(engine)
    out, trips = _batch(hot, [_item("t1"), _item("t2")], ["n1", "n2"])
    assert [f.code for f in out.finishes] == ["applied", "applied"]
    assert out.result is not None and sorted(p.job.task_id for p in out.result.placed) == ["n1", "n2"]
    after = _slots(engine)
    # Each freed slot went straight to a new job; the others kept theirs.
    assert {after[i] for i, t in before.items() if t in ("t1", "t2")} == {"n1", "n2"}
    assert {after[i] for i, t in before.items() if t in ("t3", "t4")} == {"t3", "t4"}
    assert _history(engine) == [("t1", 1, "finished"), ("t2", 1, "finished")]
    assert transaction(engine, slot_drift) == []
    out2, unfolded = _batch(hot, [_item("t3"), _item("t4")], ["n3", "n4"], fold=False)
    assert out2.result is not None and len(out2.result.placed) == 2
    if _mariadb(engine):
        with hot.connect() as conn:
            assert multi_statements(conn)
        # end + history + snapshot in one, then claim + insert + which won in one, COMMIT; before: end,
        # history, snapshot, claim, insert, COMMIT.
        assert (trips, unfolded) == (3, 6)
    else:  # SQLite: the same statements one by one (BEGIN IMMEDIATE counts too); no network to save
        assert trips == unfolded
    out3, hot_trips = on_hot_thread(
        engine, lambda conn: hand_off(conn, [_item("n1"), _item("n3")], ["n5", "n6"])
    )  # n1..n4 run
    assert [f.code for f in out3.finishes] == ["applied", "applied"]
    assert out3.result is not None and sorted(p.job.task_id for p in out3.result.placed) == ["n5", "n6"]
    assert sorted(t for t in _slots(engine).values() if t is not None) == ["n2", "n4", "n5", "n6"]
    assert _states(engine)["n5"] == ("processing", 1) and _states(engine)["n1"] == ("finished", 1)
    assert transaction(engine, slot_drift) == []
    if _mariadb(engine):  # the COMMIT went with the claim: SQLAlchemy sent none of its own
        assert hot_trips == 2


@pytest.mark.parametrize("kind", ["stale", "repeat"])
def test_a_stale_or_repeated_callback_in_a_folded_batch_hands_off_nothing_of_its_own(
    engine: Engine, hot: Engine, kind: str
) -> None:
    """The snapshot of the folded round trip counts every task of the batch as ending; one that did not end
    (t2 still runs at attempt 1) must not lose its slot to a waiting job, nor get a history row."""
    start(engine, ["t1", "t2", "t3", "t4"])
    if kind == "repeat":
        _batch(hot, [_item("t3")], [])  # t3 ended; its callback comes again below
        start(engine, ["t5"])
        items = [_item("t1"), _item("t3"), _item("t2", attempt=7)]
        codes = ["applied", "repeat", "stale"]
    else:
        items = [_item("t1"), _item("t2", attempt=7)]
        codes = ["applied", "stale"]
    slot_of_t2 = next(i for i, t in _slots(engine).items() if t == "t2")
    out, trips = _batch(hot, items, ["n1", "n2", "n3"])
    assert [f.code for f in out.finishes] == codes
    assert out.result is not None and [p.job.task_id for p in out.result.placed] == ["n1"]  # t1's slot only
    slots = _slots(engine)
    assert slots[slot_of_t2] == "t2"
    assert sorted(t for t in slots.values() if t is not None) == sorted(
        ["n1", "t2", "t4", "t5" if kind == "repeat" else "t3"]
    )
    assert _states(engine)["t2"] == ("processing", 1)
    ended = [("t1", 1, "finished")] + ([("t3", 1, "finished")] if kind == "repeat" else [])
    assert _history(engine) == ended
    assert transaction(engine, slot_drift) == []
    if _mariadb(engine):
        # the folded round trip, the classifying read, a fresh snapshot, claim + insert + which won, COMMIT
        assert trips == 5


def test_a_failing_statement_in_a_pipeline_fails_the_transaction_and_leaves_nothing(
    engine: Engine, hot: Engine
) -> None:
    start(engine, ["t1"])
    bump = text("UPDATE tasks SET error = 'touched' WHERE task_id = 't1'")
    duplicate = text("INSERT INTO slots SELECT * FROM slots")  # every primary key taken
    never = text("UPDATE tasks SET error = 'never' WHERE task_id = 't1'")
    with hot.connect() as conn:
        with pytest.raises(IntegrityError), conn.begin():
            pipeline(conn, [(bump, {}), (duplicate, {}), (never, {})])
        assert not conn.invalidated
        with conn.begin():  # the connection serves the next transaction
            res = pipeline(conn, [(text("SELECT error FROM tasks WHERE task_id = 't1'"), {}), (bump, {})])
    assert res[0].rows[0].error is None  # the first statement was rolled back with the rest
    assert res[1].rowcount == 1
    assert _states(engine)["t1"] == ("processing", 1)


def test_a_connection_lost_before_the_folded_round_trip_reruns_the_batch_once(engine: Engine) -> None:
    """The pipeline's error is the ``DBAPIError`` ``conn.execute`` would raise, connection invalidated: the
    hot thread opens a new connection and runs the batch again; it ends the attempt and hands off once."""
    if not _mariadb(engine):
        pytest.skip("KILL: MariaDB only")
    start(engine, ["t1", "t2", "t3", "t4"])
    runs: list[int] = []

    def batch(conn: Any) -> HandOff:
        runs.append(1)
        if len(runs) == 1:
            kill_connection(int(conn.execute(text("SELECT CONNECTION_ID()")).scalar_one()))
        return hand_off(conn, [_item("t1")], ["n1"])

    out, _ = on_hot_thread(engine, batch)
    assert len(runs) == 2
    assert [f.code for f in out.finishes] == ["applied"]
    assert out.result is not None and [p.job.task_id for p in out.result.placed] == ["n1"]
    assert _history(engine) == [("t1", 1, "finished")]
    assert sorted(t for t in _slots(engine).values() if t is not None) == ["n1", "t2", "t3", "t4"]
    assert transaction(engine, slot_drift) == []


def test_the_pipeline_raises_the_lost_connection_as_an_invalidated_dbapi_error(
    engine: Engine, hot: Engine
) -> None:
    if not _mariadb(engine):
        pytest.skip("KILL: MariaDB only")
    with hot.connect() as conn:
        conn_id = int(conn.execute(text("SELECT CONNECTION_ID()")).scalar_one())
        conn.commit()
        kill_connection(conn_id)
        with pytest.raises(DBAPIError) as caught:
            pipeline(conn, [(text("SELECT 1"), {}), (text("SELECT 2"), {})])
        assert caught.value.connection_invalidated
        assert conn.invalidated


def test_a_batch_with_nothing_to_hand_off_ends_frees_and_counts_in_two_round_trips_and_one_on_a_hot_thread(
    engine: Engine, hot: Engine
) -> None:
    start(engine, ["t1", "t2", "t3", "t4"])
    out, trips = _batch(hot, [_item("t1"), _item("t2")], [])
    assert [f.code for f in out.finishes] == ["applied", "applied"]
    assert out.free == {"default": 2} and out.freed_pools == {"default"}  # the room the loop is woken for
    assert sorted(t for t in _slots(engine).values() if t is not None) == ["t3", "t4"]
    out2, unfolded = _batch(hot, [_item("t3")], [], fold=False)
    assert out2.free == {"default": 3}
    assert _history(engine) == [("t1", 1, "finished"), ("t2", 1, "finished"), ("t3", 1, "finished")]
    assert transaction(engine, slot_drift) == []
    if _mariadb(engine):
        # end + history + free + promote + snapshot in one, COMMIT; before: end, free, promote (a slot's
        # standby takes it, db/promote.py), history, snapshot, COMMIT.
        assert (trips, unfolded) == (2, 6)
    out3, hot_trips = on_hot_thread(
        engine, lambda conn: hand_off(conn, [_item("t4"), _item("t9")], [])
    )  # t9: unknown, the rows are read
    assert [f.code for f in out3.finishes] == ["applied", "unknown"]
    assert out3.free == {"default": 4}
    assert transaction(engine, slot_drift) == []
    if _mariadb(engine):  # on a hot thread the COMMIT goes with them too
        assert hot_trips == 1


def test_a_stale_callback_in_a_batch_with_nothing_to_hand_off_keeps_its_live_slot(
    engine: Engine, hot: Engine
) -> None:
    """The free of the folded query is sent before anyone knows which callbacks applied: it must free only
    the slots of attempts this transaction ended (t2 runs on at attempt 1; its callback names attempt 7)."""
    start(engine, ["t1", "t2", "t3", "t4"])
    out, _ = _batch(hot, [_item("t1"), _item("t2", attempt=7)], [])
    assert [f.code for f in out.finishes] == ["applied", "stale"]
    assert out.free == {"default": 1}
    assert sorted(t for t in _slots(engine).values() if t is not None) == ["t2", "t3", "t4"]
    assert _states(engine)["t2"] == ("processing", 1)
    assert _history(engine) == [("t1", 1, "finished")]
    assert transaction(engine, slot_drift) == []
