"""A GPU changing kind with jobs in flight (``gpuq gpu add NAME --pull`` on a pushed GPU): the jobs its
service already got by POST are not handed to the new agent nor sent back to wait, which would run them
twice (the service's own callback then answered 409, its work thrown away)."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text

from dispatcher.db.agents import Poll, poll, register_pull
from dispatcher.db.agents_gone import take_back_unfetched
from dispatcher.db.dispatch import dispatch
from dispatcher.db.engine import transaction, utcnow
from dispatcher.db.gpus import update_gpu
from dispatcher.db.snapshot import snapshot
from dispatcher.gpus.pull import hash_agent_token
from tests.dispatcher.helpers import fleet_engine, place
from tests.dispatcher.helpers import job as make_job


def _poll(engine: Engine, gpu_id: str, token: str, *, max_jobs: int, seen_until: datetime) -> Poll:
    """The agent of ``gpu_id`` polls once, as ``POST /agents/poll`` would, with a 60 s lease."""
    return transaction(
        engine,
        poll,
        gpu_id=gpu_id,
        token_hash=hash_agent_token(token),
        max_jobs=max_jobs,
        now=utcnow(),
        lease_seconds=60,
        seen_until=seen_until,
    )


def test_a_pushed_gpu_made_pull_keeps_its_running_jobs_to_itself(any_database_url):
    # GIVEN a pushed GPU g0 running a job (POSTed to its service at placement)
    engine = fleet_engine(any_database_url, {"g0": 2})
    job = make_job("t", data={"n": 1})
    res = place(engine, [job], max_attempts=3)
    assert len(res.placed) == 1
    # WHEN the operator makes it a pull GPU while the job runs
    token = transaction(engine, register_pull, gpu_id="g0", pool="default", slot_count=2, now=utcnow())
    assert token is not None
    # THEN the silent-agent sweep does not send the running job back to wait
    assert transaction(engine, take_back_unfetched) == []
    # AND the new agent's poll is not handed it (its service has it already)
    look = _poll(engine, "g0", token, max_jobs=4, seen_until=utcnow())
    assert look.status == "ok"
    assert look.jobs == []
    engine.dispose()


def test_a_pull_gpu_given_a_url_sends_its_unfetched_jobs_back_to_wait(any_database_url):
    # GIVEN a pull GPU p0, its agent polling, and a job placed on it that the agent has not fetched yet
    engine = fleet_engine(any_database_url, {})
    token = transaction(engine, register_pull, gpu_id="p0", pool="default", slot_count=2, now=utcnow())
    assert token is not None
    seen = _poll(engine, "p0", token, max_jobs=0, seen_until=utcnow() + timedelta(seconds=30))
    assert seen.back
    job = make_job("t", data={"n": 1})
    res = place(engine, [job], lease_seconds=600)
    assert len(res.placed) == 1
    # WHEN the operator gives it a URL (it is pushed to from now on)
    assert transaction(engine, update_gpu, gpu_id="p0", url="http://127.0.0.1:1/p0", now=utcnow())
    # THEN the job, which nothing will ever send or fetch now, waits again at once without using its
    # only attempt (it held the slot for the whole lease, then failed for good)
    with engine.connect() as conn:
        state, max_attempts = conn.execute(
            text("SELECT state, max_attempts FROM tasks WHERE task_id = :t"), {"t": job.task_id}
        ).one()
        held = conn.execute(text("SELECT COUNT(*) FROM slots WHERE task_id IS NOT NULL")).scalar()
    assert (state, max_attempts, held) == ("retrying", 2, 0)
    engine.dispose()


def _placing_held_open(engine: Engine, job) -> tuple[Any, Any]:
    """A placement of ``job`` that has claimed its slot and not committed yet (a dispatcher between its claim
    and its COMMIT): its connection and transaction."""
    conn = engine.connect()
    tx = conn.begin()
    res = dispatch(
        conn, items=[(job, "default")], dispatcher_id="d", lease_seconds=600, max_attempts=3, now=utcnow()
    )
    assert len(res.placed) == 1
    return conn, tx


def _in_thread(fn) -> tuple[threading.Thread, threading.Event]:
    done = threading.Event()

    def run() -> None:
        fn()
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done


def _task(engine: Engine, task_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            text("SELECT state, attempt, fetched_attempt FROM tasks WHERE task_id = :t"), {"t": task_id}
        ).one()


def test_a_gpu_made_pull_while_a_placement_commits_leaves_that_job_to_its_service(database_url):
    # GIVEN a placement on pushed GPU g0 that claimed its slot (its POST goes out once it commits)
    engine = fleet_engine(database_url, {"g0": 1})
    job = make_job("t", data={"n": 1})
    conn, tx = _placing_held_open(engine, job)
    # WHEN the operator makes g0 a pull GPU meanwhile
    out: dict[str, Any] = {}
    convert = lambda: out.update(  # noqa: E731
        token=transaction(engine, register_pull, gpu_id="g0", pool="default", slot_count=1, now=utcnow())
    )
    thread, done = _in_thread(convert)
    # THEN the change waits for the placement to commit, and counts its job as the service's
    assert not done.wait(1.0), "the change of kind did not wait for the placement's commit"
    tx.commit()
    conn.close()
    thread.join(20)
    row = _task(engine, job.task_id)
    assert (row.state, row.fetched_attempt) == ("processing", row.attempt)
    # AND the new agent is not handed it (it would run twice)
    look = _poll(engine, "g0", out["token"], max_jobs=4, seen_until=utcnow() + timedelta(seconds=30))
    assert look.jobs == []
    engine.dispose()


@pytest.mark.parametrize("change", ["pull", "case", "trailing space"])
def test_a_placement_whose_snapshot_predates_a_change_of_url_claims_nothing(
    any_database_url: str, change: str
) -> None:
    # GIVEN a dispatcher's snapshot of pushed GPU g0 with a free slot
    engine = fleet_engine(any_database_url, {"g0": 1})
    seen = transaction(engine, snapshot)
    assert [g.gpu_id for g in seen] == ["g0"]
    # WHEN g0 becomes a pull GPU, or gets a URL that differs only in case or a trailing space (MariaDB's
    # collation would call those equal), before the placement's claim
    if change == "pull":
        assert transaction(engine, register_pull, gpu_id="g0", pool="default", slot_count=1, now=utcnow())
    else:
        url = seen[0].url.replace("/g0", "/G0") if change == "case" else seen[0].url + " "
        assert transaction(engine, update_gpu, gpu_id="g0", url=url, now=utcnow())
        seen = [g for g in seen if g.gpu_id == "g0"]  # the stale view, with the old URL
    job = make_job("t", data={"n": 1})
    res = place(engine, [job], view=seen)
    # THEN the claim made for the old URL takes nothing: a job placed at all is placed from a fresh look, to
    # the URL the GPU has now (a pull GPU has no agent yet: none), never POSTed to the old one
    with engine.connect() as conn:
        now_url = conn.execute(text("SELECT url FROM gpus WHERE gpu_id = 'g0'")).scalar_one()
    assert [p.url for p in res.placed] == ([] if change == "pull" else [now_url])
    assert change != "pull" or [j.task_id for j, _ in res.unplaced] == [job.task_id]
    engine.dispose()


def test_a_pull_gpu_given_a_url_while_a_placement_commits_sends_that_job_back_to_wait(database_url):
    # GIVEN pull GPU p0 with its agent, and a placement on it that claimed its slot, not committed yet
    engine = fleet_engine(database_url, {})
    token = transaction(engine, register_pull, gpu_id="p0", pool="default", slot_count=1, now=utcnow())
    assert _poll(engine, "p0", token, max_jobs=0, seen_until=utcnow() + timedelta(seconds=30)).back
    job = make_job("t", data={"n": 1})
    conn, tx = _placing_held_open(engine, job)
    # WHEN the operator gives p0 a URL meanwhile
    change = lambda: transaction(engine, update_gpu, gpu_id="p0", url="http://127.0.0.1:1/p0", now=utcnow())  # noqa: E731
    thread, done = _in_thread(change)
    # THEN the change waits for the placement, and its job (never to be sent nor fetched) waits again
    assert not done.wait(1.0), "the change of kind did not wait for the placement's commit"
    tx.commit()
    conn.close()
    thread.join(20)
    assert _task(engine, job.task_id).state == "retrying"
    engine.dispose()
