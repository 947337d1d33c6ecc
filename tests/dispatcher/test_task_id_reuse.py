"""A new job reusing the id of a known task (its idempotency mark expired) is refused, never dropped
silently; the copies the dispatcher legitimately meets (swept back, retried, scheduled and put back,
duplicated) are told apart from it and handled as before. Both dialects."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import text

from dispatcher.db.attempts import cancel_task, finish_attempt
from dispatcher.db.deferred import due_deferred
from dispatcher.db.engine import transaction, utcnow
from dispatcher.states import Outcome
from producer.job import Job
from tests.dispatcher.helpers import end_attempt, fleet_engine, job
from tests.dispatcher.test_store import NO_BACKOFF, _dispatch


def test_a_new_job_with_the_id_of_a_finished_task_is_refused(any_database_url):
    # GIVEN task "reused" ran and finished
    engine = fleet_engine(any_database_url, {"g0": 2})
    first = job(task_id="reused", data={"v": 1})
    assert _dispatch(engine, [first]).placed
    end_attempt(engine, "reused")
    # WHEN a new job (its own enqueue time and data) comes with the same id, once its mark expired
    second = job(task_id="reused", data={"v": 2})
    res = _dispatch(engine, [second], dispatcher_id="d2")
    # THEN it is refused with the reason, not dropped as a copy; the task is untouched
    assert [(j.task_id, why) for j, why in res.refused] == [
        ("reused", "task id already used: task reused exists (finished)")
    ]
    assert not res.dropped and not res.placed
    with engine.connect() as conn:
        assert conn.execute(text("SELECT data FROM tasks WHERE task_id = 'reused'")).scalar_one() == '{"v":1}'


def test_the_same_data_enqueued_again_is_a_new_job_too(any_database_url):
    # A retried delivery after the window is not the job recorded: its enqueue time says so
    engine = fleet_engine(any_database_url, {"g0": 2})
    first = job(task_id="again", data={"v": 1})
    _dispatch(engine, [first])
    later = first.model_copy(update={"enqueued_at": first.enqueued_at + timedelta(days=2)})
    assert [j.task_id for j, _ in _dispatch(engine, [later]).refused] == ["again"]


def test_the_job_recorded_coming_back_is_a_copy_not_a_reuse(any_database_url):
    # GIVEN a running task whose job comes back byte for byte (swept from a dead dispatcher's list)
    engine = fleet_engine(any_database_url, {"g0": 2})
    j = job(task_id="swept", data={"v": 1})
    assert _dispatch(engine, [j]).placed
    copy = Job.model_validate_json(j.to_redis())
    # THEN another dispatcher drops it as a copy, ours treats it as its own attempt; nobody refuses it
    other = _dispatch(engine, [copy], dispatcher_id="d2")
    assert other.dropped and not other.refused
    mine = _dispatch(engine, [copy])
    assert mine.mine and not mine.refused
    # and once finished, the copy is still dropped, not refused
    end_attempt(engine, "swept")
    late = _dispatch(engine, [copy], dispatcher_id="d2")
    assert late.dropped and not late.refused


def test_a_retry_and_a_scheduled_job_put_back_run(any_database_url):
    engine = fleet_engine(any_database_url, {"g0": 4})
    # a retry carries attempt > 0: never taken for a reuse
    retried = job(task_id="retried")
    _dispatch(engine, [retried])
    transaction(
        engine,
        finish_attempt,
        task_id="retried",
        attempt=1,
        outcome=Outcome.FAILED_RETRY,
        now=utcnow(),
        backoff=NO_BACKOFF,
        error="boom",
    )
    # a scheduled job is recorded at attempt 0 and comes back from the database at attempt 0 (a minute
    # ahead, so it is still in the future when a loaded machine gets round to placing it)
    scheduled = job(task_id="later", not_before=utcnow() + timedelta(minutes=1), data={"n": [1, 2.5]})
    assert _dispatch(engine, [scheduled]).deferred
    due = transaction(engine, due_deferred, now=utcnow() + timedelta(minutes=2))
    assert sorted(j.task_id for j in due) == ["later", "retried"]
    # serialised for Redis and read back, as the dispatcher sees them
    back = [Job.model_validate_json(j.to_redis()) for j in due]
    res = _dispatch(engine, back, dispatcher_id="d2")
    assert sorted(p.job.task_id for p in res.placed) == ["later", "retried"]
    assert not res.refused


def test_a_cancelled_tombstone_drops_its_job(any_database_url):
    # cancelled before any dispatcher took it: the job that then arrives is that task's, not a reuse
    engine = fleet_engine(any_database_url, {"g0": 2})
    transaction(engine, cancel_task, task_id="tomb", now=utcnow(), backoff=NO_BACKOFF)
    res = _dispatch(engine, [job(task_id="tomb")])
    assert res.dropped and not res.refused and not res.placed


def test_two_different_new_jobs_with_one_id_in_one_batch(any_database_url):
    engine = fleet_engine(any_database_url, {"g0": 4})
    a, b = job(task_id="twin", data={"v": "a"}), job(task_id="twin", data={"v": "b"})
    res = _dispatch(engine, [a, b, a])
    assert [p.job.data for p in res.placed] == [{"v": "a"}]
    assert [j.data for j, _ in res.refused] == [{"v": "b"}]  # the other job: refused with the reason
    assert len(res.dropped) == 1  # the identical copy of a: dropped
