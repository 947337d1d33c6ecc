"""``db/task_writes.py``: the attempt guard every racing writer of a task row relies on, the row lock and the
columns of an end, on both databases."""

from __future__ import annotations

from sqlalchemy import select

from dispatcher.db.engine import transaction, utcnow
from dispatcher.db.schema import tasks
from dispatcher.db.task_writes import ended, locked_task, update_at
from dispatcher.states import RUNNABLE, Outcome, TaskState
from tests.dispatcher.helpers import end_attempt, fleet_engine, job, place


def _row(engine, task_id):
    with engine.connect() as conn:
        return conn.execute(select(tasks).where(tasks.c.task_id == task_id)).one()


def test_the_guard_applies_only_at_the_attempt_and_in_the_states_the_writer_read(any_database_url):
    # GIVEN a task running its attempt 1
    engine = fleet_engine(any_database_url, {"g0": 1})
    (placed,) = place(engine, [job()], max_attempts=3).placed
    task_id = placed.job.task_id

    def write(attempt, states):
        stmt = update_at(task_id, attempt, states).values(error="written")
        return transaction(engine, lambda conn: conn.execute(stmt).rowcount)

    # THEN a writer that read another attempt, or a state the task is not in, changes nothing
    assert write(2, [TaskState.PROCESSING]) == 0
    assert write(1, RUNNABLE) == 0
    assert _row(engine, task_id).error is None
    # AND one that read it right does
    assert write(1, [TaskState.PROCESSING]) == 1
    assert _row(engine, task_id).error == "written"
    engine.dispose()


def test_an_end_without_an_error_keeps_the_one_the_attempts_left(any_database_url):
    # GIVEN a task whose attempt failed with an error, waiting for its retry
    engine = fleet_engine(any_database_url, {"g0": 1})
    (placed,) = place(engine, [job()], max_attempts=3).placed
    task_id = placed.job.task_id

    assert end_attempt(engine, task_id, 1, Outcome.FAILED_RETRY, error="GPU OOM").code == "applied"
    now = utcnow()

    def end(values):
        stmt = update_at(task_id, 1, RUNNABLE).values(**values)
        return transaction(engine, lambda conn: conn.execute(stmt).rowcount)

    # WHEN it is cancelled (no error of its own)
    assert end(ended(TaskState.CANCELLED, now)) == 1
    row = _row(engine, task_id)
    # THEN it is ended for good and still says why its last attempt failed
    assert (row.state, row.error, row.run_after) == ("cancelled", "GPU OOM", None)
    assert row.finished_at is not None
    # AND an end with an error replaces it
    assert ended(TaskState.FAILED, now, "dead-lettered: x")["error"] == "dead-lettered: x"
    engine.dispose()


def test_a_locked_read_of_an_unknown_task_is_none(any_database_url):
    engine = fleet_engine(any_database_url, {})
    got = transaction(engine, lambda conn: locked_task(conn, "nobody", tasks.c.state))
    assert got is None
    engine.dispose()
