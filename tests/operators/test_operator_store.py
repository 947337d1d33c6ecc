"""Store functions behind the operator commands (retry, GPU removal), on MariaDB and on SQLite."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text

from dispatcher.db.attempts import Backoff
from dispatcher.db.deferred import due_deferred
from dispatcher.db.engine import transaction, utcnow
from dispatcher.db.gpus import remove_gpu
from dispatcher.db.operator import retry_task
from dispatcher.states import Outcome
from producer.job import Job
from tests.dispatcher.helpers import end_attempt, fleet_engine, place


@pytest.fixture(params=["mariadb", "sqlite"])
def engine(request, tmp_path):
    url = (
        request.getfixturevalue("database_url")
        if request.param == "mariadb"
        else f"sqlite:///{tmp_path}/t.db"
    )
    engine = fleet_engine(url, {"g0": 2})
    yield engine
    engine.dispose()


def start(engine, max_attempts: int = 1) -> str:
    job = Job(task_id=str(uuid.uuid4()), type="t", queue="q", data={"n": 1})
    res = place(engine, [job], max_attempts=max_attempts)
    assert len(res.placed) == 1
    return job.task_id


def end(engine, task_id: str, outcome: Outcome, attempt: int = 1) -> None:
    fin = end_attempt(engine, task_id, attempt=attempt, outcome=outcome, backoff=Backoff(0, 0), error="boom")
    assert fin.code == "applied"


def test_retry_gives_a_failed_task_more_attempts_and_makes_it_due(engine):
    task_id = start(engine)
    end(engine, task_id, Outcome.FAILED_RETRY)  # its only attempt: failed for good
    res = transaction(engine, retry_task, task_id=task_id, now=utcnow(), extra_attempts=2)
    assert (res.code, res.state, res.max_attempts) == ("applied", "retrying", 3)
    (job,) = transaction(engine, due_deferred, now=utcnow())
    assert (job.task_id, job.attempt, job.data) == (task_id, 1, {"n": 1})
    # the next dispatch is attempt 2; a late callback of attempt 1 stays stale
    res2 = place(engine, [job])
    assert [p.attempt for p in res2.placed] == [2]
    late = end_attempt(engine, task_id)
    assert late.code == "stale"
    end(engine, task_id, Outcome.FINISHED, attempt=2)


def test_retry_refuses_what_is_not_over_and_what_it_cannot_rebuild(engine):
    running = start(engine)
    res = transaction(engine, retry_task, task_id=running, now=utcnow())
    assert (res.code, res.state) == ("refused", "processing")
    end(engine, running, Outcome.FINISHED)
    assert transaction(engine, retry_task, task_id=running, now=utcnow()).code == "refused"
    assert transaction(engine, retry_task, task_id="nope", now=utcnow()).code == "unknown"


def test_remove_refuses_a_busy_gpu_and_keeps_its_free_slots(engine):
    task_id = start(engine)
    assert transaction(engine, remove_gpu, gpu_id="g0") == (False, 1)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM slots WHERE gpu_id = 'g0'")).scalar_one() == 2
    end(engine, task_id, Outcome.FINISHED)
    assert transaction(engine, remove_gpu, gpu_id="g0") == (True, 0)
    assert transaction(engine, remove_gpu, gpu_id="g0") == (False, 0)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM slots")).scalar_one() == 0
        assert conn.execute(text("SELECT COUNT(*) FROM gpus")).scalar_one() == 0


def test_overview_counts_throughput_by_bucket_and_lists_failures(engine):
    from datetime import timedelta

    from dispatcher.db.overview import overview

    now = utcnow()
    for ago, outcome in (
        (25, Outcome.FINISHED),
        (15, Outcome.FINISHED),
        (5, Outcome.FAILED),
        (90, Outcome.FINISHED),
    ):
        task_id = start(engine)
        fin = end_attempt(
            engine,
            task_id,
            outcome=outcome,
            now=now - timedelta(seconds=ago),
            backoff=Backoff(),
            error="boom" if outcome is Outcome.FAILED else None,
        )
        assert fin.code == "applied"
    running = start(engine)
    view = transaction(engine, overview, now=now, minutes=1, bucket_seconds=10)
    series = view["throughput"]["series"]
    assert series["finished"] == [0, 0, 0, 1, 1, 0]
    assert series["failed"] == [0, 0, 0, 0, 0, 1]
    assert view["tasks"]["processing"] == 1
    (g0,) = view["gpus"]
    assert (g0["busy"], g0["slots"], g0["finished_recent"]) == (1, 2, 2)
    assert [s["task_id"] for s in g0["slot_list"] if s["task_id"]] == [running]
    (failure,) = view["failures"]
    assert (failure["outcome"], failure["error"], failure["gpu_id"]) == ("failed", "boom", "g0")
