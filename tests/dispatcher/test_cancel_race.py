"""A cancel of a task the database does not know yet writes a tombstone row; a dispatcher recording that job,
or a second cancel, may write its row between the cancel's look and its insert. An outside trial (cancels
sent as dispatchers took the jobs, and twice at once): 38 of ~3,800 cancels answered 500 "internal error"
(MySQL 1062 on the insert, not retried), and some of those tasks then ran to the end."""

from __future__ import annotations

from typing import Any

import pytest

from dispatcher.db import attempts
from dispatcher.db.attempts import Backoff, cancel_task
from dispatcher.db.engine import transaction, utcnow
from tests.dispatcher.helpers import fleet_engine, job, place


@pytest.mark.parametrize("who", ["a dispatcher records the job", "another cancel"])
def test_a_cancel_racing_the_rows_first_insert_applies_to_that_row(
    database_url: str, monkeypatch: pytest.MonkeyPatch, who: str
) -> None:
    engine = fleet_engine(database_url, {"g0": 2})
    j = job()
    real = attempts.locked_task
    looks = 0

    def locked_task(conn: Any, task_id: str, *columns: Any) -> Any:
        nonlocal looks
        looks += 1
        row = real(conn, task_id, *columns)
        if looks == 1:  # between the cancel's look (nothing yet) and its insert, the other writes the row
            if who == "another cancel":
                monkeypatch.setattr(attempts, "locked_task", real)
                assert transaction(
                    engine, cancel_task, task_id=j.task_id, now=utcnow(), backoff=Backoff()
                ).code
                monkeypatch.setattr(attempts, "locked_task", locked_task)
            else:
                assert len(place(engine, [j]).placed) == 1
        return row

    monkeypatch.setattr(attempts, "locked_task", locked_task)
    try:
        done = transaction(engine, cancel_task, task_id=j.task_id, now=utcnow(), backoff=Backoff())
        with engine.connect() as conn:
            state = conn.exec_driver_sql("SELECT state FROM tasks WHERE task_id = %s", (j.task_id,)).scalar()
    finally:
        engine.dispose()
    assert state == "cancelled"
    if who == "another cancel":
        assert done.code == "repeat"
    else:  # it was placed: cancelled as a running task, its slot held until the GPU confirms the stop
        assert (done.code, done.held) == ("applied", True)
