"""The core end-to-end scenarios again in embedded mode: a real ``python -m dispatcher`` on a SQLite file.

This module overrides ``database_url``, so the ``stack`` fixture (and the test's own engine) use SQLite; the
dispatcher gets ``DATABASE_URL=sqlite:///<tmp>/.gpuq/gpuq.db``, except in the first test, which sets neither
``DATABASE_URL`` nor ``DB_HOST`` and lets the dispatcher find its default file in its working directory.
Embedded mode is one dispatcher process, so the multi-dispatcher scenarios have no SQLite variant.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from dispatcher.tokens import make_token
from tests.dispatcher.harness import (
    SECRET,
    DispatcherProc,
    push_jobs,
    received_per_task,
    reconcile,
    states,
    wait_final,
    wait_swept,
)
from tests.dispatcher.helpers import wait_for


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def database_url(workdir: Path) -> str:
    """The file embedded mode creates when started in ``workdir`` (``sqlite:///.gpuq/gpuq.db``)."""
    return f"sqlite:///{workdir}/.gpuq/gpuq.db"


def test_no_database_configured_means_embedded_sqlite(stack, workdir):
    # GIVEN neither DATABASE_URL nor DB_HOST (empty counts as unset) and 200 jobs
    fleet = stack.fleet(gpus=2, service_time="exp:0.01")
    ids = push_jobs(stack.rds, stack.queues[0], 200)
    env = stack.env(fleet, DATABASE_URL="", DB_HOST="")
    d = DispatcherProc(env, name="embedded", workdir=workdir)
    stack.procs.append(d)
    # WHEN the dispatcher starts in workdir
    d.start()
    # THEN it says so once, keeps its state in ./.gpuq/gpuq.db, and runs every job once
    wait_final(stack.engine, ids, timeout=60)
    assert (workdir / ".gpuq" / "gpuq.db").is_file()
    assert d.log_path.read_text().count("no DATABASE_URL or DB_HOST: embedded mode on SQLite") == 1
    assert max(received_per_task(fleet.stats()).values()) == 1
    assert d.term() == 0
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)


def test_backlog_runs_once_each_without_oversubscription(stack):
    # GIVEN a backlog of 1,000 jobs over two queues and 4 GPUs x 4 slots
    fleet = stack.fleet(gpus=4, service_time="exp:0.01")
    ids = push_jobs(stack.rds, stack.queues[0], 500) + push_jobs(stack.rds, stack.queues[1], 500)
    stack.dispatcher(fleet)
    wait_final(stack.engine, ids, timeout=100)
    # THEN every job ran exactly once, no GPU ever had a fifth job, and the load was spread
    stats = fleet.stats()
    assert stats["totals"]["oversubscriptions"] == 0
    per_task = received_per_task(stats)
    assert set(per_task) == set(ids)
    assert max(per_task.values()) == 1
    per_gpu = {name: g["received"] for name, g in stats["gpus"].items()}
    assert min(per_gpu.values()) > 0.15 * len(ids), per_gpu
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)


def test_kill_9_twice_mid_run_loses_nothing(stack):
    # GIVEN 400 jobs of 50 ms on 4 GPUs x 4 slots, and a dispatcher that will be killed twice mid-run
    fleet = stack.fleet(gpus=4, service_time="fixed:0.05")
    ids = push_jobs(stack.rds, stack.queues[0], 400)
    d = stack.dispatcher(fleet, TASK_TIMEOUT_SECONDS="3")
    for _ in range(2):
        # WHEN it is SIGKILLed while jobs are in flight (no chance to close the SQLite file), then restarted
        wait_for(lambda: states(stack.engine)["processing"] > 0, 20, 0.01, what="jobs in flight")
        d.kill()
        time.sleep(0.3)
        d.start()
    # THEN every job finishes, none ran twice beyond the attempts in flight at the kills, no slot is taken
    wait_final(stack.engine, ids, timeout=100)
    per_task = received_per_task(fleet.stats())
    assert set(per_task) == set(ids)
    assert len([t for t, n in per_task.items() if n > 1]) <= 2 * 16
    assert fleet.stats()["totals"]["oversubscriptions"] == 0
    wait_swept(stack.rds, stack.prefix, stack.queues)
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)


def test_sigterm_hands_jobs_back_and_a_restart_finishes_them(stack):
    fleet = stack.fleet(gpus=1, service_time="fixed:0.2")
    ids = push_jobs(stack.rds, stack.queues[0], 40)
    d = stack.dispatcher(fleet, SHUTDOWN_GRACE_SECONDS="5")
    wait_for(lambda: states(stack.engine)["processing"] > 0, 20, 0.01, what="jobs in flight")
    assert d.term() == 0
    assert stack.rds.llen(stack.queues[0]) > 0
    d.start()
    wait_final(stack.engine, ids, timeout=60)
    assert max(received_per_task(fleet.stats()).values()) == 1
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)


def test_lost_callbacks_are_reclaimed_by_the_lease_and_retried(stack):
    # GIVEN a fleet that loses 30% of its callbacks and a 1 s lease
    fleet = stack.fleet(gpus=2, service_time="fixed:0.02", faults=["lost_callback@0.3"])
    ids = push_jobs(stack.rds, stack.queues[0], 60)
    stack.dispatcher(fleet, TASK_TIMEOUT_SECONDS="1", MAX_ATTEMPTS="10")
    # THEN every job still finishes; the lost attempts show as lease expiries in the history
    wait_final(stack.engine, ids, timeout=90)
    with stack.engine.connect() as conn:
        expired = {
            (t, a)
            for t, a in conn.exec_driver_sql(
                "SELECT task_id, attempt FROM attempts WHERE outcome = 'lease_expired'"
            )
        }
    lost = {(j["task_id"], j["attempt"]) for j in fleet.stats()["jobs"] if j["outcome"] == "lost"}
    assert lost
    # every lost attempt ended by its lease; a loaded machine may also expire an attempt whose callback came
    # later than 1 s (what a lease is for), so the two sets need not be equal
    assert lost <= expired, lost - expired
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)


def test_callbacks_free_slots_and_late_ones_are_stale(stack):
    # GIVEN a GPU that accepts jobs and never calls back (the test plays the GPU service), 5 jobs, 4 slots
    fleet = stack.fleet(gpus=1, service_time="0", faults=["lost_callback"])
    d = stack.dispatcher(fleet, MAX_ATTEMPTS="1", TASK_TIMEOUT_SECONDS="60")
    ids = push_jobs(stack.rds, stack.queues[0], 5)
    wait_for(lambda: states(stack.engine)["processing"] == 4, 20, what="four running")
    with stack.engine.connect() as conn:
        running = [
            r[0] for r in conn.exec_driver_sql("SELECT task_id FROM tasks WHERE state = 'processing'").all()
        ]
    token = make_token(SECRET.encode(), running[0], 1)

    def post(body):
        return httpx.post(
            f"{d.url}/callback", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10
        )

    # WHEN one reports failure, THEN it is final, its slot goes to the waiting job at once
    res = post({"task_id": running[0], "status": "failed", "error": "bad audio"})
    assert res.json() == {"task_id": running[0], "state": "failed", "applied": True}
    wait_for(
        lambda: states(stack.engine)["processing"] == 4 and states(stack.engine)["failed"] == 1,
        10,
        0.01,
        what="fifth job running",
    )
    # the same report again is a repeat, a different one for the ended attempt is stale
    assert post({"task_id": running[0], "status": "failed", "error": "bad audio"}).json()["applied"] is False
    assert post({"task_id": running[0], "status": "finished"}).status_code == 409
    body = httpx.get(f"{d.url}/tasks/{running[0]}").json()
    assert body["history"][0]["outcome"] == "failed"
    assert body["finished_at"] is not None
    assert set(ids) >= set(running)
