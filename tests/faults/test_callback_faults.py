"""Callbacks duplicated, reordered, or for cancelled tasks (SPEC §4). Late callbacks (after the lease) and
callbacks reaching another dispatcher process are in tests/dispatcher/; a heartbeat after ``finished`` for
the same attempt is in tests/dispatcher/test_callbacks.py."""

from __future__ import annotations

import pytest

from dispatcher.db.attempts import Backoff, cancel_task
from dispatcher.db.engine import transaction, utcnow
from dispatcher.gpus.tokens import make_token
from tests.dispatcher.harness import SECRET, push_jobs, received_per_task, reconcile, states, wait_final
from tests.dispatcher.helpers import wait_for
from tests.faults.support import ran_beyond_attempts


def _row(engine, task_id):
    with engine.connect() as conn:
        return conn.exec_driver_sql(
            "SELECT t.state, t.attempt, s.lease_expires_at FROM tasks t"
            " LEFT JOIN slots s ON s.task_id = t.task_id WHERE t.task_id = %s",
            (task_id,),
        ).one()


@pytest.mark.slow  # 8 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_every_callback_sent_twice_is_applied_once(stack):
    # GIVEN GPUs that send every final callback twice (finished, failed, or failed with retry)
    fleet = stack.fleet(
        gpus=2, service_time="exp:0.01", faults=["duplicate_callback", "fail@0.1", "fail_retry@0.1"]
    )
    ids = push_jobs(stack.rds, stack.queues[0], 200)
    stack.dispatcher(fleet, MAX_ATTEMPTS="5")
    wait_final(stack.engine, ids, timeout=60, final=("finished", "failed"))
    wait_for(
        lambda: fleet.stats(jobs=False)["totals"]["callbacks_pending"] == 0, 20, what="callbacks answered"
    )
    stats = fleet.stats()
    totals = stats["totals"]
    # THEN the second copy of a final report is answered 200 "applied": false. A copy of a retry report is
    # 200 too while the task waits, but 409 once the task's next attempt has started (SPEC §4: an attempt
    # stops being current when it ends; test_callbacks_of_an_earlier_attempt_arriving_late_are_409): a copy
    # slowed past the retry backoff (a loaded machine, a callback client retry) is 409 by the contract. So a
    # 409 is allowed only there, and nothing else but 200 anywhere.
    assert _not_as_specified(stats["jobs"]) == [], totals["callbacks_answered"]
    sent = sum(totals["callbacks_sent"].values())
    assert totals["callbacks_answered"].get("200", 0) + totals["callbacks_answered"].get("409", 0) == sent
    # one ended attempt per GPU run, never two (the duplicate ended nothing), and no job ran twice
    with stack.engine.connect() as conn:
        ended = conn.exec_driver_sql("SELECT COUNT(*) FROM attempts").scalar_one()
    assert ended == len(stats["jobs"]) == sent // 2
    assert ran_beyond_attempts(stack.engine, stats) == {}
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)


def _not_as_specified(jobs: list[dict]) -> list[dict]:
    """The GPU runs whose callback or its copy got an answer SPEC §4 does not give it: anything but 200, except
    409 for a retry report whose task went on to a later attempt. Each with its answers and timings and the
    later runs of its task, so a failure says which attempt was no longer current and when the next began."""
    later = {
        id(j): [o for o in jobs if o["task_id"] == j["task_id"] and o["attempt"] > j["attempt"]] for j in jobs
    }
    bad = []
    for j in jobs:
        allowed = {200, 409} if j["outcome"] == "retry" and later[id(j)] else {200}
        if {j["callback_status"], j["duplicate_status"]} <= allowed:
            continue
        keys = ("task_id", "attempt", "outcome", "callback_status", "duplicate_status")
        bad.append(
            {
                **{k: j[k] for k in keys},
                "answered_mono": j["callback_answered_mono"],
                "duplicate_sent_mono": j["duplicate_sent_mono"],
                "later": [
                    {"attempt": o["attempt"], "received_mono": o["received_mono"]} for o in later[id(j)]
                ],
            }
        )
    return bad


@pytest.mark.slow  # 9 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_heartbeats_racing_the_final_callback_change_nothing(stack):
    # GIVEN GPUs that send a heartbeat every 10 ms while a job runs (unretried, so some arrive after the end)
    fleet = stack.fleet(gpus=2, service_time="exp:0.05", faults=["heartbeat:0.01"])
    ids = push_jobs(stack.rds, stack.queues[0], 200)
    stack.dispatcher(fleet)
    wait_final(stack.engine, ids, timeout=60)
    # THEN each job ran once, and every heartbeat got 200 (attempt current) or 409 (it ended) and freed nothing
    wait_for(
        lambda: fleet.stats(jobs=False)["totals"]["callbacks_pending"] == 0, 20, what="callbacks answered"
    )
    totals = fleet.stats(jobs=False)["totals"]
    assert totals["callbacks_sent"]["running"] > 0
    assert set(totals["callbacks_answered"]) <= {"200", "409"}, totals["callbacks_answered"]
    assert max(received_per_task(fleet.stats()).values()) == 1
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)


@pytest.mark.slow  # 4 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_callbacks_of_an_earlier_attempt_arriving_late_are_409(stack):
    # GIVEN a task whose first attempt failed (retry) and whose second attempt is running; the test is the GPU
    fleet = stack.fleet(gpus=1, service_time="0", faults=["lost_callback"])
    d = stack.dispatcher(fleet, MAX_ATTEMPTS="3", TASK_TIMEOUT_SECONDS="60")
    [a] = push_jobs(stack.rds, stack.queues[0], 1)
    wait_for(lambda: states(stack.engine)["processing"] == 1, 20, what="attempt 1 running")
    t1, t2 = (make_token(SECRET.encode(), a, n) for n in (1, 2))
    assert (
        d.post_callback({"task_id": a, "status": "failed", "retry": True}, t1).json()["state"] == "retrying"
    )
    wait_for(lambda: tuple(_row(stack.engine, a)[:2]) == ("processing", 2), 20, what="attempt 2 running")
    lease = _row(stack.engine, a).lease_expires_at
    # WHEN attempt 1's heartbeat, its repeated failure and a "finished" for it arrive now, out of order
    for body in ({"status": "running"}, {"status": "failed", "retry": True}, {"status": "finished"}):
        # THEN each is 409: attempt 2 keeps running, its lease is not extended by attempt 1's heartbeat
        assert d.post_callback({"task_id": a, **body}, t1).status_code == 409, body
        assert tuple(_row(stack.engine, a)) == ("processing", 2, lease)
    # and attempt 2's own callbacks still work
    assert d.post_callback({"task_id": a, "status": "running"}, t2).json()["applied"] is True
    assert d.post_callback({"task_id": a, "status": "finished"}, t2).json() == {
        "task_id": a,
        "state": "finished",
        "applied": True,
    }
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, [a])


@pytest.mark.slow  # 4 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_callback_for_a_cancelled_task_is_409_and_its_slot_is_refilled(stack):
    # GIVEN one GPU (4 slots) running four jobs that never call back by themselves, and two more waiting
    fleet = stack.fleet(gpus=1, service_time="0", faults=["lost_callback"])
    d = stack.dispatcher(fleet, TASK_TIMEOUT_SECONDS="60")
    ids = push_jobs(stack.rds, stack.queues[0], 6)
    wait_for(lambda: states(stack.engine, ids)["processing"] == 4, 20, what="four running")
    running = _running(stack.engine)
    # WHEN an operator cancels one running task (the store function `gpuq task cancel` calls)
    victim = running[0]
    fin = transaction(stack.engine, cancel_task, task_id=victim, now=utcnow(), backoff=Backoff())
    assert (fin.code, fin.state, fin.freed, fin.held) == ("applied", "cancelled", False, True)
    # THEN the slot stays held until the GPU confirms: a heartbeat for the attempt is 409 and confirms nothing
    token = make_token(SECRET.encode(), victim, 1)
    res = d.post_callback({"task_id": victim, "status": "running"}, token)
    assert res.status_code == 409 and "cancelled" in res.json()["detail"], res.text
    assert victim in _running(stack.engine)
    # and a final callback for the attempt, whatever it says, is 409, confirms the stop and frees the slot,
    # which a waiting job takes without any other event
    for body in ({"status": "finished", "result": 1}, {"status": "failed"}):
        res = d.post_callback({"task_id": victim, **body}, token)
        assert res.status_code == 409, res.text
        assert "cancelled" in res.json()["detail"]
    wait_for(lambda: len(_running(stack.engine)) == 4 and victim not in _running(stack.engine), 10, 0.02)
    assert _row(stack.engine, victim)[:2] == ("cancelled", 1)
    # finish the rest as their GPU would, and audit
    for task_id in _running(stack.engine):
        d.post_callback({"task_id": task_id, "status": "finished"}, make_token(SECRET.encode(), task_id, 1))
    wait_for(lambda: states(stack.engine, ids)["processing"] == 1, 10, 0.02, what="the last job running")
    for task_id in _running(stack.engine):
        d.post_callback({"task_id": task_id, "status": "finished"}, make_token(SECRET.encode(), task_id, 1))
    wait_final(stack.engine, ids, final=("finished", "cancelled"))
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)


def _running(engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.exec_driver_sql("SELECT task_id FROM slots WHERE task_id IS NOT NULL").scalars())
