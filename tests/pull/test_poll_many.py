"""The agents' looks batched (``db/agents.py poll_many``): several waiting polls answered in one transaction
in a few statements, each as ``poll`` alone would have answered it in turn. Real MariaDB and SQLite.

What must hold: the same jobs to the same polls (a GPU polled twice in a batch splits its jobs in order),
the same statuses for wrong tokens and unknown GPUs, cancelled jobs released, the agent's "seen" mark and
return to rotation written once; and two dispatchers batching looks of one GPU at once never hand one job
to both (the batch reads the jobs it takes locked)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from dispatcher.db.agents import poll, poll_many, register_pull
from dispatcher.db.cancels import cancel_running
from dispatcher.db.engine import transaction, utcnow
from dispatcher.gpus.pull import hash_agent_token
from tests.dispatcher.helpers import fleet, place
from tests.dispatcher.helpers import job as make_job


@pytest.fixture
def engine(any_database_url: str) -> Iterator[Engine]:
    with fleet(any_database_url, {}) as e:
        yield e


def _look(gpu_id: str, token: str, now: datetime, max_jobs: int = 4, **more: Any) -> dict[str, Any]:
    return {
        "gpu_id": gpu_id,
        "token_hash": hash_agent_token(token),
        "max_jobs": max_jobs,
        "now": now,
        "lease_seconds": 600,
        "seen_until": more.pop("seen_until", now + timedelta(seconds=20)),
    } | more


def _pull(engine: Engine, gpu_id: str, slots: int) -> str:
    token = transaction(engine, register_pull, gpu_id=gpu_id, pool="default", slot_count=slots, now=utcnow())
    assert token is not None
    return token


def _state(conn: Any) -> tuple[Any, ...]:
    """What a look writes: tasks fetched, slots' leases and holders, GPUs' rotation and seen marks."""
    return (
        conn.execute(text("SELECT task_id, fetched_attempt, state FROM tasks ORDER BY task_id")).all(),
        conn.execute(
            text("SELECT gpu_id, slot_index, task_id, lease_expires_at FROM slots ORDER BY 1, 2")
        ).all(),
        conn.execute(text("SELECT gpu_id, healthy, agent_seen_until FROM gpus ORDER BY gpu_id")).all(),
    )


def _answers(polls: list[Any]) -> list[tuple[Any, ...]]:
    return [(p.status, [j.task_id for j in p.jobs], p.released, p.back) for p in polls]


def _run(engine: Engine, fn: Any) -> tuple[Any, Any]:
    """``fn(conn)`` in a transaction rolled back afterwards: its answer and what it wrote."""
    with engine.connect() as conn:
        tx = conn.begin()
        try:
            answer = fn(conn)
            return answer, _state(conn)
        finally:
            tx.rollback()


def test_a_batch_answers_as_its_looks_one_after_the_other(engine: Engine) -> None:
    # GIVEN pull GPUs p0 (4 slots) and p1 (2 slots), p1 out of rotation again (its agent fell silent), jobs
    # placed on both, one of p0's cancelled before its agent fetched it
    now = utcnow()
    t0, t1 = _pull(engine, "p0", 4), _pull(engine, "p1", 2)
    assert [
        p.status for p in transaction(engine, poll_many, looks=[_look("p0", t0, now), _look("p1", t1, now)])
    ]
    jobs = [make_job("t", task_id=f"j{i}", data={"n": i}) for i in range(6)]
    assert len(place(engine, jobs, lease_seconds=60).placed) == 6
    assert transaction(engine, cancel_running, task_id="j0", attempt=1, now=utcnow(), error="cancelled")
    with engine.begin() as conn:
        conn.execute(text("UPDATE gpus SET healthy = 0 WHERE gpu_id = 'p1'"))
    later = utcnow()
    looks = [
        _look("p0", t0, later, max_jobs=1),
        _look("p1", "not-a-token", later),  # 401
        _look("p9", t0, later),  # p0's agent naming a GPU that does not exist: 404
        _look("p1", t0, later),  # p0's agent naming p1: 403
        _look("p0", t0, later, max_jobs=4, seen_until=later + timedelta(seconds=5)),
        _look("p1", t1, later, max_jobs=1),
        _look("p1", t1, later, max_jobs=0),
        _look("p1", t1, later, max_jobs=4, seen_until=None),
    ]
    # WHEN they are answered as a batch, and (rolled back) one after the other as before
    one_by_one = _run(engine, lambda conn: [poll(conn, **look) for look in looks])
    batched = _run(engine, lambda conn: poll_many(conn, looks=looks))
    # THEN the answers and what was written are the same
    assert _answers(batched[0]) == _answers(one_by_one[0])
    assert batched[1] == one_by_one[1]
    statuses = [a[0] for a in _answers(batched[0])]
    assert statuses == ["ok", "unauthenticated", "unknown", "forbidden", "ok", "ok", "ok", "ok"]
    assert sum(len(a[1]) for a in _answers(batched[0])) == 5  # every job but the cancelled one
    assert sum(p.released for p in batched[0]) == 1  # the cancelled job's slot
    assert batched[0][5].back  # p1 back in rotation, once


def test_a_batch_takes_a_few_statements_whatever_its_looks(engine: Engine) -> None:
    now = utcnow()
    tokens = {f"p{i}": _pull(engine, f"p{i}", 2) for i in range(4)}
    transaction(engine, poll_many, looks=[_look(g, t, now) for g, t in tokens.items()])
    assert len(place(engine, [make_job("t", task_id=f"j{i}") for i in range(8)]).placed) == 8
    sent: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        looks = [_look(g, t, utcnow()) for g, t in tokens.items()] * 2
        polls = transaction(engine, poll_many, looks=looks)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert sum(len(p.jobs) for p in polls) == 8
    # GPUs, unfetched jobs, fetched, leases (and BEGIN IMMEDIATE on SQLite): not 2 per look and 2 per job
    assert len([s for s in sent if not s.startswith("BEGIN")]) == 4, sent


def test_two_dispatchers_batching_looks_of_one_gpu_never_hand_a_job_to_both(engine: Engine) -> None:
    if engine.dialect.name == "sqlite":
        pytest.skip("one writer at a time on SQLite: the looks cannot overlap")
    now = utcnow()
    token = _pull(engine, "p0", 40)
    transaction(engine, poll_many, looks=[_look("p0", token, now), _look("p0", token, now)])
    for round_ in range(5):
        assert len(place(engine, [make_job("t", task_id=f"r{round_}j{i}") for i in range(40)]).placed) == 40
        got: list[list[str]] = [[], []]
        start = threading.Barrier(2)
        threads = [
            threading.Thread(target=_dispatcher, args=(engine, token, start, got[k])) for k in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        both = got[0] + got[1]
        assert len(both) == len(set(both)) == 40, (len(both), len(set(both)))
        with engine.begin() as conn:  # the next round's jobs get the slots
            conn.execute(text("UPDATE slots SET task_id = NULL, attempt = NULL"))


def _dispatcher(engine: Engine, token: str, start: threading.Barrier, got: list[str]) -> None:
    """One dispatcher's batches of looks of p0 (three polls of its agent waiting there)."""
    start.wait()
    for _ in range(6):
        looks = [_look("p0", token, utcnow(), max_jobs=3) for _ in range(3)]
        for p in transaction(engine, poll_many, looks=looks):
            got.extend(j.task_id for j in p.jobs)
