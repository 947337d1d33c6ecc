"""The agents' looks batched (``db/agents.py poll_many``): several waiting polls answered in one transaction
in a few statements, each as it would have been answered alone and in turn. Real MariaDB and SQLite.

What must hold: the same jobs to the same polls as the one-look-at-a-time model below (what ``poll`` did
before batching: a GPU polled twice in a batch splits its jobs in order), the same statuses for wrong
tokens and unknown GPUs, cancelled jobs released, the agent's "seen" mark and return to rotation written
once; two dispatchers looking at one GPU at once never hand one job to both; and a look neither deadlocks
with a callback ending a job of its GPU nor holds up placement on its GPU's free slots (from an outside
review: the first version locked the GPU's slot rows)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.exc import OperationalError

from dispatcher.db.agents import SEEN_SLACK, Poll, _authenticate, poll, poll_many, register_pull
from dispatcher.db.attempts import Backoff, finish_attempt
from dispatcher.db.cancels import cancel_running, release_cancelled
from dispatcher.db.dispatch import dispatch
from dispatcher.db.engine import transaction, utcnow
from dispatcher.gpus.pull import hash_agent_token
from dispatcher.states import Outcome
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
        "seen_slack": SEEN_SLACK,
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


def _alone(conn: Any, look: dict[str, Any]) -> Poll:
    """The model: one look at a time, a statement per step and two per job, as ``poll`` did before it was
    batched (its token checked, cancelled jobs released, up to ``max_jobs`` taken, the seen mark written)."""
    status, row = _authenticate(conn, gpu_id=look["gpu_id"], token_hash=look["token_hash"])
    out = Poll(status)
    if status != "ok":
        return out
    lease = look["now"] + timedelta(seconds=look["lease_seconds"])
    unfetched = text(
        "SELECT t.task_id, t.type, t.data, t.attempt, t.state FROM slots s JOIN tasks t ON t.task_id = s.task_id"
        " WHERE s.gpu_id = :gpu_id AND t.attempt = s.attempt"
        " AND (t.fetched_attempt IS NULL OR t.fetched_attempt <> t.attempt) ORDER BY s.claimed_at, s.slot_index"
    )
    for r in conn.execute(unfetched, {"gpu_id": look["gpu_id"]}).all():
        if r.state != "processing":
            out.released += release_cancelled(conn, task_id=r.task_id, attempt=r.attempt)
            continue
        if len(out.jobs) >= look["max_jobs"]:
            continue
        params = {"task_id": r.task_id, "attempt": r.attempt}
        take = "UPDATE tasks SET fetched_attempt = attempt WHERE task_id = :task_id AND attempt = :attempt"
        if conn.execute(text(take + " AND state = 'processing'"), params).rowcount != 1:
            continue
        renew = "UPDATE slots SET lease_expires_at = :lease WHERE task_id = :task_id AND attempt = :attempt"
        conn.execute(text(renew), params | {"lease": lease})
        out.jobs.append(r)
    seen_until = look.get("seen_until")
    if seen_until is None:
        return out
    values: dict[str, object] = {}
    stored = row.agent_seen_until
    if not row.healthy or stored is None or stored < seen_until - min(SEEN_SLACK, look["seen_slack"]):
        values["agent_seen_until"] = seen_until
    if not row.healthy:
        values |= {"healthy": True, "consecutive_failures": 0, "down_until": None, "last_error": None}
        out.back = True
    if values:
        sets = ", ".join(f"{k} = :{k}" for k in values)
        conn.execute(text(f"UPDATE gpus SET {sets} WHERE gpu_id = :gpu_id"), values | {"gpu_id": row.gpu_id})
    return out


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
    one_by_one = _run(engine, lambda conn: [_alone(conn, look) for look in looks])
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
    # GPUs, unfetched jobs, their tasks locked, fetched, leases (and BEGIN IMMEDIATE on SQLite): not 2 per
    # look and 2 per job
    assert len([s for s in sent if not s.startswith("BEGIN")]) == 5, sent


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


def test_a_gpu_named_in_another_case_is_answered_as_alone_not_failing_the_batch(engine: Engine) -> None:
    # GIVEN p0 and p1 with jobs; p0's agent configured as "P0" (MariaDB compares GPU ids without case, so it
    # is p0's agent all the same)
    now = utcnow()
    t0, t1 = _pull(engine, "p0", 2), _pull(engine, "p1", 2)
    transaction(engine, poll_many, looks=[_look("p0", t0, now), _look("p1", t1, now)])
    assert len(place(engine, [make_job("t", task_id=f"j{i}") for i in range(4)]).placed) == 4
    later = utcnow()
    looks = [_look("P0", t0, later), _look("p1", t1, later)]
    # WHEN both look in one batch THEN each gets what it gets alone (p1's poll does not fail with P0's)
    one_by_one = _run(engine, lambda conn: [_alone(conn, look) for look in looks])
    batched = _run(engine, lambda conn: poll_many(conn, looks=looks))
    assert _answers(batched[0]) == _answers(one_by_one[0])
    assert batched[1] == one_by_one[1]
    assert [a[0] for a in _answers(batched[0])] == (
        ["ok", "ok"] if engine.dialect.name != "sqlite" else ["unknown", "ok"]
    )


def test_lone_looks_and_batches_of_one_gpu_at_two_dispatchers_neither_share_a_job_nor_deadlock(
    engine: Engine,
) -> None:
    if engine.dialect.name == "sqlite":
        pytest.skip("one writer at a time on SQLite: the looks cannot overlap")
    token = _pull(engine, "p0", 40)
    transaction(engine, poll_many, looks=[_look("p0", token, utcnow()), _look("p0", token, utcnow())])
    deadlocks: list[str] = []

    def seen(ctx: Any) -> None:
        if "1213" in str(ctx.original_exception):
            deadlocks.append(str(ctx.original_exception))

    event.listen(engine, "handle_error", seen)
    for round_ in range(4):
        assert len(place(engine, [make_job("t", task_id=f"r{round_}j{i}") for i in range(40)]).placed) == 40
        got: list[list[str]] = [[], []]
        start = threading.Barrier(2)
        batches = threading.Thread(target=_looking, args=(engine, token, start, got[0], 3, 8))
        lone = threading.Thread(target=_looking, args=(engine, token, start, got[1], 1, 25))
        for t in (batches, lone):
            t.start()
        for t in (batches, lone):
            t.join(60)
        both = got[0] + got[1]
        assert len(both) == len(set(both)) == 40
        with engine.begin() as conn:
            conn.execute(text("UPDATE slots SET task_id = NULL, attempt = NULL"))
    assert not deadlocks, deadlocks[0]


def _looking(
    engine: Engine, token: str, start: threading.Barrier, got: list[str], looks: int, n: int
) -> None:
    start.wait()
    for _ in range(n):
        batch = [_look("p0", token, utcnow(), max_jobs=2) for _ in range(looks)]
        for p in transaction(engine, poll_many, looks=batch):
            got.extend(j.task_id for j in p.jobs)


def test_a_callback_ending_a_fetched_job_and_a_look_of_its_gpu_do_not_deadlock(engine: Engine) -> None:
    if engine.dialect.name == "sqlite":
        pytest.skip("one writer at a time on SQLite")
    # GIVEN p0 (2 slots): j0 fetched and running, j1 placed and not fetched yet
    token = _pull(engine, "p0", 2)
    transaction(engine, poll_many, looks=[_look("p0", token, utcnow()), _look("p0", token, utcnow())])
    assert len(place(engine, [make_job("t", task_id="j0")]).placed) == 1
    assert [j.task_id for j in transaction(engine, poll, **_look("p0", token, utcnow())).jobs] == ["j0"]
    assert len(place(engine, [make_job("t", task_id="j1")]).placed) == 1
    errors: list[BaseException] = []
    answers: list[list[Poll]] = []

    def look() -> None:  # the agent's next polls, no retry: a deadlock would show
        try:
            with engine.begin() as conn:
                answers.append(poll_many(conn, looks=[_look("p0", token, utcnow(), max_jobs=1)] * 2))
        except OperationalError as exc:
            errors.append(exc)

    # WHEN j0's callback ends it (its task row, then its slot) while the look runs in between
    looker: list[threading.Thread] = []

    def after(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().startswith("UPDATE tasks SET") and not looker:
            looker.append(threading.Thread(target=look))
            looker[0].start()
            looker[0].join(0.5)

    with engine.connect() as conn:
        event.listen(conn, "after_cursor_execute", after)
        try:
            with conn.begin():
                finish_attempt(
                    conn, task_id="j0", attempt=1, outcome=Outcome.FINISHED, now=utcnow(), backoff=Backoff()
                )
        except OperationalError as exc:
            errors.append(exc)
    looker[0].join(30)
    # THEN both go through, and the look took j1
    assert not errors, errors
    assert [j.task_id for p in answers[0] for j in p.jobs] == ["j1"]


def test_a_look_in_progress_does_not_hold_up_placement_on_its_gpus_free_slots(engine: Engine) -> None:
    if engine.dialect.name == "sqlite":
        pytest.skip("one writer at a time on SQLite")
    token = _pull(engine, "p0", 4)
    transaction(engine, poll_many, looks=[_look("p0", token, utcnow()), _look("p0", token, utcnow())])
    assert len(place(engine, [make_job("t", task_id="j0")]).placed) == 1
    with engine.connect() as looking, looking.begin():
        poll_many(looking, looks=[_look("p0", token, utcnow(), max_jobs=0)] * 2)
        # WHEN another dispatcher places a job meanwhile (lock waits cut to 1 s)
        with engine.connect() as conn, conn.begin():
            conn.execute(text("SET SESSION innodb_lock_wait_timeout = 1"))
            res = dispatch(
                conn, items=[(make_job("t", task_id="j1"), "default")], dispatcher_id="d2", lease_seconds=60,
                max_attempts=1, now=utcnow(),
            )  # fmt: skip
        # THEN it lands on a free slot without waiting for the look
        assert len(res.placed) == 1
