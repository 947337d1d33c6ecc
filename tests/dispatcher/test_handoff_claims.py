"""A hand-off's claim, INSERT, free and COMMIT in one round trip (``db/handoff_claims.py``, issue 12).

Real MariaDB (several statements per query on the hot connection). What must hold as before: a job whose
claim lost a race gets no task row and goes back to the caller; the winners are recorded exactly once; the
slots of ended attempts no job took are free; and a COMMIT sent with a pipeline never stands in for a later
transaction's (the flag that tells SQLAlchemy not to send its own dies with the transaction that set it).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import IntegrityError

from dispatcher.db.attempts import slot_drift
from dispatcher.db.engine import transaction, utcnow
from dispatcher.db.handoff_claims import fits, place_fresh
from dispatcher.db.pipeline import MAY_COMMIT, hot_engine, may_commit, pipeline, round_trips
from dispatcher.db.snapshot import snapshot_ending
from tests.dispatcher.helpers import finished, fleet, hand_off, job, on_hot_thread, slot_holders, start


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    with fleet(database_url, {"g0": 2, "g1": 2}) as e:
        yield e


def _tasks(engine: Engine) -> dict[str, tuple[str, int, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT task_id, state, attempt, gpu_id FROM tasks")).all()
    return {r.task_id: (r.state, int(r.attempt), r.gpu_id) for r in rows}


def _end(conn: Connection, task_ids: list[str], now: Any) -> None:
    conn.execute(
        text("UPDATE tasks SET state = 'finished', updated_at = :now WHERE task_id IN :ids").bindparams(
            ids=task_ids
        ),
        {"now": now, "ids": task_ids},
    )


def test_a_claim_that_lost_its_race_records_no_task_and_the_others_run(engine: Engine) -> None:
    """t1 and t2 run, one per GPU; t1 ends, and the view this batch read offers t1's slot and the two free
    ones. Before the claim, another dispatcher takes one of the free ones: the job proposed for it must get no
    row (it goes back), the jobs on the other slots run, and nobody is on a slot twice."""
    start(engine, ["t1", "t2"])  # least loaded first: one on each GPU, one slot free on each
    busy = slot_holders(engine)
    free_g1 = next(k for k, v in busy.items() if v is None)

    def batch(conn: Connection) -> Any:
        now = utcnow()
        _end(conn, ["t1"], now)
        seen = snapshot_ending(conn, ending=["t1"])
        # the other dispatcher, committed meanwhile (its own connection)
        with engine.begin() as other:
            other.execute(
                text(
                    "UPDATE slots SET task_id = 'theirs', attempt = 1, dispatcher_id = 'd2', claimed_at = :now"
                    " WHERE gpu_id = :g AND slot_index = :i"
                ),
                {"now": now, "g": free_g1[0], "i": free_g1[1]},
            )
        chosen = [(job("t", task_id=f"n{i}"), "default") for i in range(3)]
        assert fits(conn, chosen, check_existing=False, now=now)
        return place_fresh(
            conn,
            chosen=chosen,
            seen=seen,
            ending=["t1"],
            dispatcher_id="d1",
            lease_seconds=600,
            max_attempts=3,
            now=now,
            rng=random.Random(3),
        )

    out, trips = on_hot_thread(engine, batch)
    placed = sorted(p.job.task_id for p in out.placed)
    unplaced = sorted(j.task_id for j, _ in out.unplaced)
    assert len(placed) == 2 and len(unplaced) == 1  # three slots looked free, one was taken meanwhile
    tasks = _tasks(engine)
    assert unplaced[0] not in tasks  # no row for the job that lost: it is still only in Redis
    assert all(tasks[t][:2] == ("processing", 1) for t in placed)
    slots = slot_holders(engine)
    assert sorted(v for v in slots.values() if v is not None) == sorted(["t2", "theirs", *placed])
    assert slots[free_g1] == "theirs"
    assert trips == 3  # the end, the snapshot, then the claim with everything else and the COMMIT


def test_a_slot_of_an_ended_attempt_no_job_takes_is_freed_in_the_same_round_trip(engine: Engine) -> None:
    start(engine, ["t1", "t2", "t3", "t4"])  # full

    def batch(conn: Connection) -> Any:
        return hand_off(conn, [finished("t1"), finished("t2"), finished("t3")], ["n1"])

    out, trips = on_hot_thread(engine, batch)
    assert [f.code for f in out.finishes] == ["applied"] * 3
    assert out.result is not None and [p.job.task_id for p in out.result.placed] == ["n1"]
    assert sorted(v for v in slot_holders(engine).values() if v is not None) == ["n1", "t4"]
    assert transaction(engine, slot_drift) == []
    assert trips == 2


def test_a_known_task_among_the_jobs_fails_the_whole_transaction(engine: Engine) -> None:
    """Its INSERT fails: nothing of the batch stays, not the end, not the other claims (the caller then ends
    the attempts without the hand-off, as before)."""
    start(engine, ["t1", "t2", "t3", "t4"])
    with pytest.raises(IntegrityError):
        on_hot_thread(engine, lambda conn: hand_off(conn, [finished("t1"), finished("t2")], ["n1", "t3"]))
    assert {t: s for t, (s, _, _) in _tasks(engine).items()} == dict.fromkeys(
        ["t1", "t2", "t3", "t4"], "processing"
    )
    assert sorted(v for v in slot_holders(engine).values() if v is not None) == ["t1", "t2", "t3", "t4"]


def test_a_pipeline_commit_that_failed_does_not_swallow_the_next_transactions_commit(engine: Engine) -> None:
    """The COMMIT of a pipeline whose statement failed never ran; the flag it set must not make SQLAlchemy
    skip the COMMIT of the connection's next transaction (its writes would be lost silently)."""
    hot = hot_engine(engine, pool_size=1)
    try:
        with hot.connect() as conn:
            failing = [
                (text("UPDATE tasks SET error = 'lost' WHERE 1 = 0"), {}),
                (text("INSERT INTO slots SELECT * FROM slots"), {}),  # every key taken
            ]
            with conn.begin():
                conn.info[MAY_COMMIT] = True
                assert may_commit(conn)
                with pytest.raises(IntegrityError):
                    pipeline(conn, failing, commit=True)
                conn.rollback()
            conn.info.pop(MAY_COMMIT, None)
            assert not may_commit(conn)
            before = round_trips(conn)
            with conn.begin():
                conn.execute(text("UPDATE gpus SET url = 'http://kept' WHERE gpu_id = 'g0'"))
            assert round_trips(conn) - before == 2  # the UPDATE and a COMMIT of its own
    finally:
        hot.dispose()
    with engine.connect() as conn:  # seen from another connection: it was committed
        assert conn.execute(text("SELECT url FROM gpus WHERE gpu_id = 'g0'")).scalar_one() == "http://kept"


def test_only_a_hot_threads_transaction_may_be_committed_by_a_pipeline(engine: Engine) -> None:
    hot = hot_engine(engine, pool_size=1)
    try:
        with hot.connect() as conn, conn.begin():
            assert not may_commit(conn)
            with pytest.raises(ValueError, match="cannot be committed"):
                pipeline(conn, [(text("SELECT 1"), {})], commit=True)
    finally:
        hot.dispose()
    seen: list[bool] = []
    on_hot_thread(engine, lambda conn: seen.append(may_commit(conn)))
    assert seen == [True]
