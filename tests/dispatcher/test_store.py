"""The store functions on both dialects (MariaDB, and SQLite for embedded mode): claims, completion, leases,
cancel, drift."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Connection, select, text
from sqlalchemy.exc import IntegrityError

from dispatcher.db.attempts import (
    Backoff,
    cancel_task,
    expired_leases,
    extend_lease,
    finish_attempt,
    finish_many,
    slot_drift,
)
from dispatcher.db.cancels import release_cancelled
from dispatcher.db.deferred import due_deferred, mark_queued
from dispatcher.db.dispatch import _defer, dispatch
from dispatcher.db.engine import transaction, utcnow
from dispatcher.db.schema import slots, tasks
from dispatcher.db.snapshot import free_slot, snapshot
from dispatcher.loop.placement import capacity
from dispatcher.states import Outcome
from tests.dispatcher.helpers import NO_BACKOFF, end_attempt, fleet_engine, job, kill_connection, place


def _dispatch(engine, jobs, pool="default", lease=60.0, dispatcher_id="d1"):
    """As the dispatcher does: optimistic first, and on a known task again with a look at what is known."""
    kw = {
        "items": [(j, pool) for j in jobs],
        "dispatcher_id": dispatcher_id,
        "lease_seconds": lease,
        "max_attempts": 3,
    }
    try:
        return transaction(engine, dispatch, now=utcnow(), **kw)
    except IntegrityError:
        return transaction(engine, dispatch, now=utcnow(), check_existing=True, **kw)


def test_least_loaded_placement_and_full(any_database_url):
    # GIVEN two GPUs with two slots each
    engine = fleet_engine(any_database_url, {"g0": 2, "g1": 2})
    # WHEN five jobs arrive
    res = _dispatch(engine, [job() for _ in range(5)])
    # THEN four are placed two per GPU, the fifth waits, and the seed's load query agrees
    assert len(res.placed) == 4
    assert len(res.unplaced) == 1
    assert sorted(p.gpu_id for p in res.placed) == ["g0", "g0", "g1", "g1"]
    with engine.connect() as conn:
        load = dict(
            conn.execute(
                text(
                    "SELECT gpu_id, COUNT(*) AS active_tasks FROM tasks WHERE state = 'processing' GROUP BY gpu_id"
                )
            ).all()
        )
        assert load == {"g0": 2, "g1": 2}
        assert capacity(snapshot(conn)) == {}


def test_first_jobs_spread_over_gpus(any_database_url):
    engine = fleet_engine(any_database_url, {"g0": 4, "g1": 4, "g2": 4})
    res = _dispatch(engine, [job() for _ in range(3)])
    assert sorted(p.gpu_id for p in res.placed) == ["g0", "g1", "g2"]


def test_finish_frees_slot_and_repeat_is_not_applied(any_database_url):
    engine = fleet_engine(any_database_url, {"g0": 1})
    j = job()
    placed = _dispatch(engine, [j]).placed[0]
    kw = {"task_id": j.task_id, "attempt": placed.attempt, "now": utcnow(), "backoff": NO_BACKOFF}
    first = transaction(
        engine, finish_attempt, outcome=Outcome.FINISHED, result={"x": 1}, reported="finished", **kw
    )
    assert (first.code, first.state, first.freed) == ("applied", "finished", True)
    again = transaction(
        engine, finish_attempt, outcome=Outcome.FINISHED, result={"x": 2}, reported="finished", **kw
    )
    assert (again.code, again.freed) == ("repeat", False)
    other = transaction(engine, finish_attempt, outcome=Outcome.FAILED, reported="failed", **kw)
    assert other.code == "stale"
    with engine.connect() as conn:
        assert conn.execute(select(tasks.c.result)).scalar_one() == '{"x":1}'
        assert capacity(snapshot(conn)) == {"default": 1}


def test_failed_attempt_retries_then_fails(any_database_url):
    engine = fleet_engine(any_database_url, {"g0": 1})
    j = job()
    for attempt in (1, 2, 3):
        res = _dispatch(engine, [j])
        assert res.placed and res.placed[0].attempt == attempt
        fin = end_attempt(engine, j.task_id, attempt=attempt, outcome=Outcome.FAILED_RETRY, error="boom")
        if attempt < 3:
            assert fin.state == "retrying"
            due = transaction(engine, due_deferred, now=utcnow() + timedelta(seconds=1))
            assert [d.task_id for d in due] == [j.task_id]
            assert due[0].attempt == attempt
            transaction(engine, mark_queued, jobs=due, now=utcnow())
            j = due[0]
        else:
            assert fin.state == "failed"
    # a stale copy of the job (old attempt count) is dropped, not run again
    stale = _dispatch(engine, [job(task_id=j.task_id, attempt=1)])
    assert not stale.placed and stale.dropped


def test_a_repeated_retry_report_is_a_repeat_until_the_next_attempt_starts_then_stale(any_database_url):
    """SPEC §4: a repeated callback is 200 ``applied: false``, but a callback for an attempt no longer current
    is 409, and an attempt that ended with ``retry: true`` is superseded once the next one starts. So the
    second copy of a retry report is a repeat or stale depending on when it comes; the GPU's two copies in
    one group-commit batch (finish_many) are always a repeat, whatever else the batch ends."""
    engine = fleet_engine(any_database_url, {"g0": 2})
    j, other = job(), job()
    _dispatch(engine, [j, other])
    report = {"attempt": 1, "outcome": Outcome.FAILED_RETRY, "error": "boom", "reported": "failed_retry"}
    items = [
        {"task_id": j.task_id, **report},
        {"task_id": j.task_id, **report},
        {"task_id": other.task_id, "attempt": 1, "outcome": Outcome.FINISHED, "reported": "finished"},
    ]
    fins = transaction(engine, finish_many, items=items, now=utcnow(), backoff=NO_BACKOFF)
    assert [(f.code, f.state) for f in fins] == [
        ("applied", "retrying"),
        ("repeat", "retrying"),
        ("applied", "finished"),
    ]
    # a third copy in a later batch, the next attempt not started yet: still a repeat
    assert end_attempt(engine, j.task_id, **report).code == "repeat"
    # once attempt 2 runs, attempt 1 is no longer current: its copy is stale (409) and ends nothing
    due = transaction(engine, due_deferred, now=utcnow() + timedelta(seconds=1))
    transaction(engine, mark_queued, jobs=due, now=utcnow())
    assert [p.attempt for p in _dispatch(engine, due).placed] == [2]
    late = end_attempt(engine, j.task_id, **report)
    assert (late.code, late.state) == ("stale", "processing")
    with engine.connect() as conn:
        assert conn.execute(select(tasks.c.attempt).where(tasks.c.task_id == j.task_id)).scalar_one() == 2
        assert capacity(snapshot(conn)) == {"default": 1}


def test_duplicate_copy_is_dropped(any_database_url):
    engine = fleet_engine(any_database_url, {"g0": 4})
    j = job()
    assert _dispatch(engine, [j]).placed
    again = _dispatch(engine, [j, j], dispatcher_id="d2")
    assert not again.placed and len(again.dropped) == 2


def test_a_stale_copy_in_the_same_batch_does_not_shadow_the_live_one(any_database_url):
    # GIVEN a task whose first attempt failed and whose retry is back in Redis (queued, attempt 1), and a
    # copy of its first attempt that was left behind (a standby's, after a lost transaction)
    engine = fleet_engine(any_database_url, {"g0": 2})
    first = job()
    assert _dispatch(engine, [first]).placed
    end_attempt(engine, first.task_id, attempt=1, outcome=Outcome.FAILED_RETRY, error="boom")
    (retry,) = transaction(engine, due_deferred, now=utcnow() + timedelta(seconds=1))
    transaction(engine, mark_queued, jobs=[retry], now=utcnow())
    # WHEN one pass takes both, the stale copy first
    res = _dispatch(engine, [first, retry])
    # THEN the retry runs (it was dropped as a repeat of the stale copy, the task left queued for good)
    assert [(p.job.task_id, p.attempt) for p in res.placed] == [(first.task_id, 2)]
    assert [j.attempt for j, _ in res.dropped] == [0]


def test_a_job_claiming_attempts_of_a_task_never_recorded_starts_at_attempt_1(any_database_url):
    # GIVEN jobs pushed straight into Redis saying "attempt": 999 (an outside trial: it ran as attempt 1000
    # of MAX_ATTEMPTS=3, with no retry, and `gpuq task retry` offered "up to 1001 attempts"); one is scheduled
    engine = fleet_engine(any_database_url, {"g0": 1})
    raw, later = job(attempt=999), job(attempt=7, not_before=utcnow() + timedelta(hours=1))
    # WHEN a dispatcher takes them
    res = _dispatch(engine, [raw, later])
    # THEN each is a new task: the first runs as attempt 1, the scheduled one waits with none made
    assert [(p.job.task_id, p.attempt) for p in res.placed] == [(raw.task_id, 1)]
    assert res.deferred == [later]
    with engine.connect() as conn:
        rows = {r.task_id: (r.attempt, r.max_attempts) for r in conn.execute(select(tasks))}
    assert rows == {raw.task_id: (1, 3), later.task_id: (0, 3)}
    # AND its failures are retried as any task's, up to MAX_ATTEMPTS
    fin = end_attempt(engine, raw.task_id, attempt=1, outcome=Outcome.FAILED_RETRY, error="boom")
    assert fin.state == "retrying"
    (retry,) = transaction(engine, due_deferred, now=utcnow() + timedelta(seconds=1))
    assert retry.attempt == 1
    transaction(engine, mark_queued, jobs=[retry], now=utcnow())
    assert [p.attempt for p in _dispatch(engine, [retry]).placed] == [2]
    # AND a copy of the raw job still saying 999 (swept back after a crash) is not run again
    stale = _dispatch(engine, [job(task_id=raw.task_id, attempt=999)])
    assert not stale.placed and stale.dropped


def test_lease_expiry_and_heartbeat(any_database_url):
    engine = fleet_engine(any_database_url, {"g0": 1})
    j = job()
    placed = _dispatch(engine, [j], lease=0.5).placed[0]
    later = utcnow() + timedelta(seconds=1)
    assert transaction(engine, expired_leases, now=later) == [(j.task_id, 1)]
    beat = transaction(
        engine, extend_lease, task_id=j.task_id, attempt=placed.attempt, lease_seconds=60, now=utcnow()
    )
    assert beat.code == "applied"
    assert transaction(engine, expired_leases, now=later) == []
    bad = transaction(engine, extend_lease, task_id=j.task_id, attempt=7, lease_seconds=60, now=utcnow())
    assert bad.code == "stale"
    assert (
        transaction(engine, extend_lease, task_id="nope", attempt=1, lease_seconds=60, now=utcnow()).code
        == "unknown"
    )


def test_cancel_running_and_waiting(any_database_url):
    engine = fleet_engine(any_database_url, {"g0": 1})
    running = job()
    _dispatch(engine, [running])
    res = transaction(engine, cancel_task, task_id=running.task_id, now=utcnow(), backoff=NO_BACKOFF)
    # ended for the user, but the slot waits for the GPU to confirm the stop: no heartbeat renews it
    assert (res.state, res.freed, res.held) == ("cancelled", False, True)
    beat = transaction(
        engine, extend_lease, task_id=running.task_id, attempt=1, lease_seconds=60, now=utcnow()
    )
    assert (beat.code, beat.state) == ("stale", "cancelled")
    with engine.connect() as conn:
        assert capacity(snapshot(conn)) == {}
        assert slot_drift(conn) == []  # a pending cancel is not drift
    assert transaction(engine, release_cancelled, task_id=running.task_id, attempt=1) is True
    assert transaction(engine, release_cancelled, task_id=running.task_id, attempt=1) is False
    with engine.connect() as conn:
        assert capacity(snapshot(conn)) == {"default": 1}
    # a job still in Redis: the tombstone keeps it from ever running
    waiting = job()
    transaction(engine, cancel_task, task_id=waiting.task_id, now=utcnow(), backoff=NO_BACKOFF)
    res2 = _dispatch(engine, [waiting])
    assert not res2.placed and res2.dropped
    late = end_attempt(engine, running.task_id, reported="finished")
    assert late.code == "stale"
    with engine.connect() as conn:
        assert slot_drift(conn) == []


def test_not_before_defers(any_database_url):
    engine = fleet_engine(any_database_url, {"g0": 1})
    j = job(not_before=utcnow() + timedelta(hours=1))
    res = _dispatch(engine, [j])
    assert res.deferred and not res.placed
    assert transaction(engine, due_deferred, now=utcnow()) == []
    assert len(transaction(engine, due_deferred, now=utcnow() + timedelta(hours=2))) == 1


def test_own_unacknowledged_commit_is_recognised(any_database_url):
    # GIVEN a job this dispatcher recorded, whose commit it never heard back about
    engine = fleet_engine(any_database_url, {"g0": 2})
    j = job()
    first = _dispatch(engine, [j]).placed[0]
    # WHEN the same copy comes back to the same dispatcher, it is its own attempt (to send, if not sent)
    again = _dispatch(engine, [j])
    assert [(p.gpu_id, p.slot_index, p.attempt) for p in again.mine] == [(first.gpu_id, first.slot_index, 1)]
    assert not again.placed
    # but to any other dispatcher it is a duplicate
    other = _dispatch(engine, [j], dispatcher_id="d2")
    assert not other.mine
    assert other.dropped


def test_own_unacknowledged_commit_restarts_its_lease(any_database_url):
    # GIVEN a job this dispatcher recorded with a 3 s lease, whose commit answer was lost
    engine = fleet_engine(any_database_url, {"g0": 1})
    j = job()
    kw = {"dispatcher_id": "d1", "lease_seconds": 3.0, "max_attempts": 3}
    recorded = utcnow()
    first = transaction(engine, dispatch, items=[(j, "default")], now=recorded, **kw).placed[0]
    # WHEN it comes back 2.5 s later (its request not sent yet): it is ours to send now
    later = recorded + timedelta(seconds=2.5)
    again = transaction(engine, dispatch, items=[(j, "default")], now=later, check_existing=True, **kw)
    assert [p.attempt for p in again.mine] == [first.attempt]
    # THEN its lease runs from now, not from the lost commit: it must not end 0.5 s into the job's run
    # (the slot would go to another job while the GPU still works on this one)
    assert transaction(engine, expired_leases, now=recorded + timedelta(seconds=4)) == []
    assert transaction(engine, expired_leases, now=later + timedelta(seconds=3.5)) == [(j.task_id, 1)]


def test_own_unacknowledged_commit_is_not_sent_once_its_slot_is_gone(any_database_url):
    # GIVEN a job this dispatcher recorded, whose commit answer was lost
    engine = fleet_engine(any_database_url, {"g0": 1})
    j = job()
    kw = {"dispatcher_id": "d1", "lease_seconds": 3.0, "max_attempts": 3}
    first = transaction(engine, dispatch, items=[(j, "default")], now=utcnow(), **kw).placed[0]
    # WHEN its slot was given back between the pass's read of the task and its renewal (a sweep committing
    # in between: here the slot alone is freed, the state the pass's earlier read can no longer see)
    assert transaction(engine, free_slot, task_id=j.task_id, attempt=first.attempt, now=utcnow())
    again = transaction(engine, dispatch, items=[(j, "default")], now=utcnow(), check_existing=True, **kw)
    # THEN the copy is not ours to send: the slot may be another job's already
    assert again.mine == [] and again.placed == []
    assert [reason for _, reason in again.dropped] == ["the attempt ended meanwhile (task processing)"]


def test_own_commit_rerun_after_a_lost_answer_restarts_the_lease_when_it_runs(database_url):
    # GIVEN a retry (attempt 1) whose placement commits, but whose COMMIT answer is lost with its connection,
    # and the database takes 2 s to answer again: ``transaction`` reruns it with the ``now`` of its first try
    engine = fleet_engine(database_url, {"g0": 1})
    first = job()
    p = place(engine, [first], dispatcher_id="d1", max_attempts=5).placed[0]
    end_attempt(engine, first.task_id, p.attempt, Outcome.FAILED_RETRY)
    retry = first.model_copy(update={"attempt": 1})
    runs: list[int] = []

    def committed_then_lost(conn: Connection, **kwargs: Any) -> Any:
        runs.append(1)
        if len(runs) > 1:
            return dispatch(conn, **kwargs)
        conn_id = int(conn.execute(text("SELECT CONNECTION_ID()")).scalar_one())
        out = dispatch(conn, **kwargs)
        conn.connection.dbapi_connection.commit()  # type: ignore[union-attr]
        kill_connection(conn_id)
        time.sleep(2.0)
        return out

    kw = {"dispatcher_id": "d1", "lease_seconds": 3.0, "max_attempts": 5}
    out = transaction(engine, committed_then_lost, items=[(retry, "default")], now=utcnow(), **kw)
    sent_at = utcnow()
    # WHEN the rerun finds the attempt recorded as its own (its request not sent yet)
    assert len(runs) == 2 and [m.attempt for m in out.mine] == [2]
    # THEN the lease counts from the rerun, not from the first try: the GPU gets (nearly) all 3 s of it
    with engine.connect() as conn:
        lease = conn.execute(
            select(slots.c.lease_expires_at).where(slots.c.task_id == first.task_id)
        ).scalar_one()
    assert lease >= sent_at + timedelta(seconds=2.5), lease - sent_at


def test_task_ids_differing_in_case_or_accents_are_different_tasks(any_database_url):
    # GIVEN ids that Redis (and the producer's idempotency keys) treat as different tasks
    engine = fleet_engine(any_database_url, {"g0": 4})
    jobs = [job(task_id=t) for t in ("Job-1", "job-1", "café")]
    assert len(_dispatch(engine, jobs[:2]).placed) == 2
    # WHEN one arrives whose id only differs from a known one by an accent
    res = _dispatch(engine, [jobs[2], job(task_id="cafe")])
    # THEN it is a task of its own, not a duplicate to drop: the database compares ids byte for byte
    assert len(res.placed) == 2, res.dropped
    with engine.connect() as conn:
        assert conn.execute(select(tasks.c.task_id).where(tasks.c.task_id == "job-1")).scalars().all() == [
            "job-1"
        ]


def test_not_before_with_an_offset_is_converted_to_utc(any_database_url):
    # GIVEN a job not before 12:00+02:00, i.e. 10:00 UTC
    engine = fleet_engine(any_database_url, {"g0": 1})
    plus_two = timezone(timedelta(hours=2))
    noon = datetime(2030, 1, 1, 12, 0, tzinfo=plus_two)
    res = _dispatch(engine, [job(not_before=noon)])
    assert res.deferred
    # THEN it is due at 10:00 UTC, not at 12:00 UTC
    assert transaction(engine, due_deferred, now=datetime(2030, 1, 1, 9, 59)) == []
    assert len(transaction(engine, due_deferred, now=datetime(2030, 1, 1, 10, 0, 1))) == 1


def test_lease_expiry_does_not_apply_after_a_heartbeat_renewed_it(any_database_url):
    # GIVEN two running attempts whose leases looked expired to the housekeeper
    engine = fleet_engine(any_database_url, {"g0": 2})
    a, b = job(), job()
    _dispatch(engine, [a, b], lease=0.5)
    later = utcnow() + timedelta(seconds=1)
    assert len(transaction(engine, expired_leases, now=later)) == 2
    # WHEN a "running" heartbeat renews both before the expiry is applied
    for j in (a, b):
        transaction(engine, extend_lease, task_id=j.task_id, attempt=1, lease_seconds=60, now=utcnow())
    expire = {"attempt": 1, "outcome": Outcome.EXPIRED, "result": None, "error": "late", "reported": None}
    single = end_attempt(engine, a.task_id, outcome=Outcome.EXPIRED, now=later)
    batch = transaction(
        engine,
        finish_many,
        items=[{"task_id": a.task_id, **expire}, {"task_id": b.task_id, **expire}],
        now=later,
        backoff=NO_BACKOFF,
    )
    # THEN neither path ends the attempts: the GPU is still working on them
    assert single.code == "stale"
    assert [f.code for f in batch] == ["stale", "stale"]
    with engine.connect() as conn:
        assert capacity(snapshot(conn)) == {}
        assert slot_drift(conn) == []


def test_rescheduling_never_revives_a_task_that_changed(any_database_url):
    # GIVEN a task cancelled after a copy of it was read as runnable
    engine = fleet_engine(any_database_url, {"g0": 1})
    j = job(not_before=utcnow() + timedelta(hours=1))
    transaction(engine, cancel_task, task_id=j.task_id, now=utcnow(), backoff=NO_BACKOFF)
    # WHEN the copy is rescheduled
    ok = transaction(engine, _defer, job=j, pool="default", is_new=False, max_attempts=3, now=utcnow())
    # THEN nothing changes: the task stays cancelled
    assert ok is False
    with engine.connect() as conn:
        assert conn.execute(select(tasks.c.state)).scalar_one() == "cancelled"


def test_a_retry_for_an_attempt_that_never_ran_is_stale_and_changes_nothing(any_database_url):
    # GIVEN three running tasks
    engine = fleet_engine(any_database_url, {"g0": 3})
    a, b, c = job(), job(), job()
    _dispatch(engine, [a, b, c])
    with engine.connect() as conn:
        b_before = conn.execute(select(tasks).where(tasks.c.task_id == b.task_id)).one()
    # WHEN one group commit ends a (finished) and c (retryable failure), and carries a validly signed
    # retryable failure for attempt 5000 of b, an attempt that never ran (2.0 ** 4999 overflows a float)
    now = utcnow()
    failed = {"outcome": Outcome.FAILED_RETRY, "result": None, "error": "CUDA OOM", "reported": "failed"}
    batch = transaction(
        engine,
        finish_many,
        items=[
            {
                "task_id": a.task_id,
                "attempt": 1,
                **failed,
                "outcome": Outcome.FINISHED,
                "reported": "finished",
            },
            {"task_id": b.task_id, "attempt": 5000, **failed},
            {"task_id": c.task_id, "attempt": 1, **failed},
        ],
        now=now,
        backoff=Backoff(base=2.0, cap=300.0),
    )
    single = transaction(
        engine,
        finish_attempt,
        task_id=b.task_id,
        attempt=999_999_999,
        now=now,
        backoff=Backoff(base=2.0, cap=300.0),
        **failed,
    )
    # THEN b's report is stale (409) and b is untouched; the others in the batch apply as usual
    assert [(f.code, f.state) for f in batch] == [
        ("applied", "finished"),
        ("stale", "processing"),
        ("applied", "retrying"),
    ]
    assert (single.code, single.state) == ("stale", "processing")
    with engine.connect() as conn:
        assert conn.execute(select(tasks).where(tasks.c.task_id == b.task_id)).one() == b_before
        run_after = conn.execute(select(tasks.c.run_after).where(tasks.c.task_id == c.task_id)).scalar_one()
        assert slot_drift(conn) == []
    # c retries after its backoff: 2 s for a first attempt, jittered by at most 10 %
    assert timedelta(seconds=1.8) <= run_after - now <= timedelta(seconds=2.2)


def test_backoff_delay_is_capped_for_any_attempt_number():
    backoff = Backoff(base=2.0, cap=300.0)
    assert 1.8 <= backoff.delay(1) <= 2.2
    assert 270.0 <= backoff.delay(5000) <= 330.0
    assert 270.0 <= backoff.delay(10**9) <= 330.0
    assert 1.8 <= backoff.delay(0) <= 2.2
