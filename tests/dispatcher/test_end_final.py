"""The cheaper end statement for a burst of final callbacks (``end_final_attempts``, the common case at
saturation) writes exactly what the general one (``end_attempts``, a join against a derived table) writes,
row for row, and changes exactly the same rows: a stale attempt and a task no longer processing are left
alone, a callback without a result keeps the stored one. Two identical fleets of tasks, one ended by each
statement, then compared column by column. Real MariaDB and SQLite.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select

from dispatcher.db.attempts import _params, finish_many
from dispatcher.db.batch import end_attempts, end_final_attempts
from dispatcher.db.engine import transaction, utcnow
from dispatcher.db.schema import tasks
from dispatcher.states import Outcome
from producer.job import Job
from tests.dispatcher.helpers import NO_BACKOFF, end_attempt, fleet_engine, place

_COLUMNS = ("state", "attempt", "run_after", "finished_at", "result", "error", "last_callback", "updated_at")


def _fleet(engine: Engine, prefix: str, at: datetime) -> None:
    """Five running tasks; ``{prefix}4`` already ended (its later callbacks are stale). All at ``at``, so
    two fleets differ in their task ids alone."""
    jobs = [Job(task_id=f"{prefix}{i}", type="t", queue="q", enqueued_at=at) for i in range(5)]
    assert len(place(engine, jobs, now=at).placed) == 5
    end_attempt(engine, f"{prefix}4", result={"kept": True}, reported="finished", now=at)


def _items(prefix: str) -> list[dict[str, Any]]:
    now = utcnow()
    ends = [
        (f"{prefix}0", 1, Outcome.FINISHED, {"n": 0}, None, "finished"),
        (f"{prefix}1", 1, Outcome.FINISHED, None, None, "finished"),  # no result: the stored one stays
        (f"{prefix}2", 1, Outcome.FAILED, None, "out of memory", "failed"),  # final failure, no retry
        (f"{prefix}3", 7, Outcome.FINISHED, {"n": 3}, None, "finished"),  # an attempt that never ran
        (f"{prefix}4", 1, Outcome.FINISHED, {"n": 4}, None, "finished"),  # over already
    ]
    return [
        _params(task_id=t, attempt=a, outcome=o, now=now, backoff=NO_BACKOFF, result=r, error=e, reported=rep)
        for t, a, o, r, e, rep in ends
    ]


def _rows(engine: Engine, prefix: str) -> dict[str, tuple[Any, ...]]:
    with engine.connect() as conn:
        rows = conn.execute(select(tasks).where(tasks.c.task_id.like(f"{prefix}%"))).all()
    return {r.task_id.removeprefix(prefix): tuple(getattr(r, c) for c in _COLUMNS) for r in rows}


def test_the_final_end_statement_writes_what_the_general_one_writes(any_database_url: str) -> None:
    engine = fleet_engine(any_database_url, {"g0": 10})
    at = utcnow()
    _fleet(engine, "a", at)
    _fleet(engine, "b", at)
    general, final = _items("a"), _items("b")
    for a, b in zip(general, final, strict=True):  # one clock reading for both: rows compare exactly
        b["now"] = a["now"]
    now = general[0]["now"]
    with engine.begin() as conn:  # the stored result the no-result callback must keep
        conn.execute(tasks.update().where(tasks.c.task_id.in_(["a1", "b1"])).values(result='{"old":1}'))

    assert transaction(engine, end_attempts, items=general, now=now) == 3
    assert transaction(engine, end_final_attempts, items=final, now=now) == 3

    a, b = _rows(engine, "a"), _rows(engine, "b")
    assert a == b
    assert a["1"][_COLUMNS.index("result")] == '{"old":1}'
    assert a["2"][:2] == ("failed", 1)
    assert a["3"][0] == "processing"  # stale: untouched
    engine.dispose()


def test_finish_many_of_final_callbacks_applies_and_classifies_as_before(any_database_url: str) -> None:
    """Through ``finish_many`` (the group commit's store call): applied, stale and repeat as for the
    general statement, slots freed, history written."""
    engine = fleet_engine(any_database_url, {"g0": 4})
    jobs = [Job(task_id=f"t{i}", type="t", queue="q") for i in range(3)]
    assert len(place(engine, jobs).placed) == 3
    end_attempt(engine, "t2", reported="finished")
    base = {"outcome": Outcome.FINISHED, "error": None}
    items = [
        base | {"task_id": "t0", "attempt": 1, "result": '{"a":1}', "reported": "finished"},
        base | {"task_id": "t1", "attempt": 2, "result": None, "reported": "finished"},  # never ran: stale
        base | {"task_id": "t2", "attempt": 1, "result": None, "reported": "finished"},  # a repeat
    ]
    fins = transaction(engine, finish_many, items=items, now=utcnow(), backoff=NO_BACKOFF)
    assert [(f.code, f.state, f.freed) for f in fins] == [
        ("applied", "finished", True),
        ("stale", "processing", False),
        ("repeat", "finished", False),
    ]
    with engine.connect() as conn:
        held = conn.execute(select(tasks.c.task_id).where(tasks.c.state == "processing")).scalars().all()
    assert held == ["t1"]
    engine.dispose()
