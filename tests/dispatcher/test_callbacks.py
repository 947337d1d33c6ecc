"""The callback contract (SPEC §4) against a running dispatcher: tokens, answers, repeats, staleness."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import text

from dispatcher.gpus.tokens import make_token
from tests.dispatcher.harness import SECRET, push_jobs, states
from tests.dispatcher.helpers import wait_for


def _task(engine, task_id):
    with engine.connect() as conn:
        query = text("SELECT state, attempt, gpu_id, slot_index FROM tasks WHERE task_id = :t")
        return conn.execute(query, {"t": task_id}).one()


def _silent(stack):
    """A dispatcher whose GPU accepts jobs and never calls back: the test plays the GPU service."""
    fleet = stack.fleet(gpus=1, service_time="0", faults=["lost_callback"])
    return stack.dispatcher(fleet, MAX_ATTEMPTS="2", TASK_TIMEOUT_SECONDS="60")


@pytest.fixture
def silent(stack):
    return _silent(stack)


@pytest.mark.slow  # 3 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_tokens_bodies_and_answers(stack, silent):
    d = silent
    a, b = push_jobs(stack.rds, stack.queues[0], 2)
    wait_for(lambda: states(stack.engine)["processing"] == 2, 20, what="two running")
    ok = make_token(SECRET.encode(), a, 1)
    # no token, a wrong one, another task's, a tampered one: 401, and nothing changes
    assert d.post_callback({"task_id": a, "status": "finished"}).status_code == 401
    assert d.post_callback({"task_id": a, "status": "finished"}, "1.bogus").status_code == 401
    assert (
        d.post_callback({"task_id": a, "status": "finished"}, make_token(SECRET.encode(), b, 1)).status_code
        == 401
    )
    assert (
        d.post_callback(
            {"task_id": a, "status": "finished"}, make_token(b"another-secret-xxxxxxxx", a, 1)
        ).status_code
        == 401
    )
    # malformed bodies: 422 naming the field, in the one error body
    bad = d.post_callback({"task_id": a, "status": "done"}, ok)
    assert bad.status_code == 422
    assert bad.json()["code"] == "invalid_input" and bad.json()["detail"].startswith("status: ")
    assert [e["loc"] for e in bad.json()["errors"]] == [["status"]]
    assert d.post_callback({"task_id": a, "status": "finished"}).json() == {
        "detail": "missing or wrong callback token",
        "code": "unauthorized",
    }
    assert d.post_callback({"status": "finished"}, ok).status_code == 422
    assert (
        httpx.post(
            f"{d.url}/callback",
            content=b"{not json",
            headers={"Authorization": f"Bearer {ok}", "Content-Type": "application/json"},
        ).status_code
        == 422
    )
    # a valid token for a task the database does not know: 404
    assert (
        d.post_callback(
            {"task_id": "ghost", "status": "finished"}, make_token(SECRET.encode(), "ghost", 1)
        ).status_code
        == 404
    )
    # oversized body: 413 without reading it
    big = httpx.post(
        f"{d.url}/callback",
        content=b"x" * (9 * 1024 * 1024),
        headers={"Authorization": f"Bearer {ok}", "Content-Type": "application/json"},
    )
    assert big.status_code == 413
    assert _task(stack.engine, a).state == "processing"
    # a heartbeat keeps the slot and says so
    beat = d.post_callback({"task_id": a, "status": "running", "progress": 0.5}, ok)
    assert beat.json() == {"task_id": a, "state": "processing", "applied": True}
    # finished: applied once; the same callback again: 200, applied false; a different status now: 409
    first = d.post_callback({"task_id": a, "status": "finished", "result": {"text": "hi"}}, ok)
    assert first.json() == {"task_id": a, "state": "finished", "applied": True}
    again = d.post_callback({"task_id": a, "status": "finished", "result": {"text": "hi"}}, ok)
    assert again.json() == {"task_id": a, "state": "finished", "applied": False}
    assert d.post_callback({"task_id": a, "status": "failed"}, ok).status_code == 409
    assert d.post_callback({"task_id": a, "status": "running"}, ok).status_code == 409
    assert _task(stack.engine, a).state == "finished"


def test_retry_true_makes_a_new_attempt_and_the_old_one_stale(stack, silent):
    d = silent
    [a] = push_jobs(stack.rds, stack.queues[0], 1)
    wait_for(lambda: states(stack.engine)["processing"] == 1, 20, what="running")
    t1 = make_token(SECRET.encode(), a, 1)
    res = d.post_callback({"task_id": a, "status": "failed", "error": "CUDA OOM", "retry": True}, t1)
    assert res.json()["state"] == "retrying"
    # the task comes back as attempt 2 (backoff 50 ms); the first attempt's token is now stale
    wait_for(lambda: tuple(_task(stack.engine, a)[:2]) == ("processing", 2), 20, what="attempt 2 running")
    assert d.post_callback({"task_id": a, "status": "finished"}, t1).status_code == 409
    t2 = make_token(SECRET.encode(), a, 2)
    # MAX_ATTEMPTS=2: another retryable failure ends the task failed, with the GPU's error
    res2 = d.post_callback({"task_id": a, "status": "failed", "error": "CUDA OOM again", "retry": True}, t2)
    assert res2.json()["state"] == "failed"
    body = httpx.get(f"{d.url}/tasks/{a}").json()
    assert body["error"] == "CUDA OOM again"
    assert [h["outcome"] for h in body["history"]] == ["failed_retry", "failed_retry"]


def test_signed_retry_for_an_attempt_that_never_ran_is_409(stack, silent):
    # GIVEN a task running its first attempt
    d = silent
    [a] = push_jobs(stack.rds, stack.queues[0], 1)
    wait_for(lambda: states(stack.engine)["processing"] == 1, 20, what="running")
    # WHEN a validly signed callback reports a retryable failure for attempt 5000 (backoff 2 ** 4999)
    body = {"task_id": a, "status": "failed", "error": "x", "retry": True}
    res = d.post_callback(body, make_token(SECRET.encode(), a, 5000))
    # THEN it is stale, not a 500, and attempt 1 runs on, untouched
    assert res.status_code == 409, res.text
    assert tuple(_task(stack.engine, a)[:2]) == ("processing", 1)
    ok = d.post_callback({"task_id": a, "status": "finished"}, make_token(SECRET.encode(), a, 1))
    assert ok.json() == {"task_id": a, "state": "finished", "applied": True}


def test_failed_is_final_and_frees_the_slot(any_stack):
    # on MariaDB and on SQLite
    stack = any_stack
    d = _silent(stack)
    ids = push_jobs(stack.rds, stack.queues[0], 5)  # 4 slots: one waits
    wait_for(lambda: states(stack.engine)["processing"] == 4, 20, what="four running")
    running = [t for t in ids if _task_state(stack.engine, t) == "processing"]
    token = make_token(SECRET.encode(), running[0], 1)
    res = d.post_callback({"task_id": running[0], "status": "failed", "error": "bad audio"}, token)
    assert res.json() == {"task_id": running[0], "state": "failed", "applied": True}
    # the freed slot goes to the waiting job at once
    wait_for(
        lambda: states(stack.engine)["processing"] == 4 and states(stack.engine)["failed"] == 1,
        10,
        0.01,
        what="fifth job running",
    )
    # the same report again is a repeat, a different one for the ended attempt is stale
    again = d.post_callback({"task_id": running[0], "status": "failed", "error": "bad audio"}, token)
    assert again.json()["applied"] is False
    stale = d.post_callback({"task_id": running[0], "status": "finished"}, token)
    assert stale.status_code == 409 and stale.json()["code"] == "conflict"
    body = httpx.get(f"{d.url}/tasks/{running[0]}").json()
    assert body["history"][0]["outcome"] == "failed"
    assert body["finished_at"] is not None


def _task_state(engine, task_id):
    with engine.connect() as conn:
        row = conn.execute(text("SELECT state FROM tasks WHERE task_id = :t"), {"t": task_id}).first()
    return row[0] if row else None


@pytest.mark.slow  # 3 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_late_callback_after_lease_expiry_is_409_and_frees_nothing(stack):
    fleet = stack.fleet(gpus=1, service_time="0", faults=["lost_callback"])
    d = stack.dispatcher(fleet, MAX_ATTEMPTS="1", TASK_TIMEOUT_SECONDS="0.5")
    [a] = push_jobs(stack.rds, stack.queues[0], 1)
    wait_for(lambda: _task_state(stack.engine, a) == "failed", 20, what="lease expiry")
    res = d.post_callback({"task_id": a, "status": "finished"}, make_token(SECRET.encode(), a, 1))
    assert res.status_code == 409
    assert _task_state(stack.engine, a) == "failed"
    body = httpx.get(f"{d.url}/tasks/{a}").json()
    assert body["history"][0]["outcome"] == "lease_expired"
