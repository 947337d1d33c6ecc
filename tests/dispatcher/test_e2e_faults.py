"""Failure paths, each ending with the reconcile audit: kill -9, SIGTERM, lost callbacks, failing GPUs,
several dispatchers sharing one fleet with callbacks reaching another process than the one that sent.

Scenarios taking ``any_stack`` run on MariaDB and again on SQLite (embedded mode: one dispatcher process at a
time, so a kill -9 there also leaves the SQLite file unclosed)."""

from __future__ import annotations

import time

import pytest

from dispatcher.testing import ProcessFailed
from producer.keys import Keys
from tests.dispatcher.harness import (
    DispatcherProc,
    free_port,
    push_jobs,
    received_per_task,
    reconcile,
    wait_final,
    wait_in_flight,
    wait_swept,
)
from tests.dispatcher.helpers import wait_for


@pytest.mark.slow
def test_kill_9_twice_mid_run_loses_nothing(any_stack):
    stack = any_stack
    # GIVEN 600 jobs of 50 ms on 4 GPUs x 4 slots, and a dispatcher that will be killed twice mid-run
    fleet = stack.fleet(gpus=4, service_time="fixed:0.05")
    ids = push_jobs(stack.rds, stack.queues[0], 600)
    d = stack.process(fleet, TASK_TIMEOUT_SECONDS="3")
    for _ in range(2):
        # WHEN it is SIGKILLed while jobs are in flight, then restarted
        wait_in_flight(stack.engine)
        d.kill()
        time.sleep(0.3)
        d.start()
    # THEN every job finishes, none ran twice beyond the attempts in flight at the kills, no slot is left taken
    wait_final(stack.engine, ids, timeout=120)
    per_task = received_per_task(fleet.stats())
    assert set(per_task) == set(ids)
    twice = [t for t, n in per_task.items() if n > 1]
    assert len(twice) <= 2 * 16, f"{len(twice)} jobs ran more than once"
    assert fleet.stats()["totals"]["oversubscriptions"] == 0
    # the killed processes' lists may still hold copies of finished tasks until their heartbeat expires
    wait_swept(stack.rds, stack.prefix, stack.queues)
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)


@pytest.mark.slow
def test_sigterm_hands_jobs_back_and_exits_0(any_stack):
    stack = any_stack
    fleet = stack.fleet(gpus=1, service_time="fixed:0.2")
    ids = push_jobs(stack.rds, stack.queues[0], 40)
    d = stack.process(fleet, SHUTDOWN_GRACE_SECONDS="5")
    wait_in_flight(stack.engine)
    assert d.term() == 0
    assert "dispatcher stopped" in d.logs()
    # its startup objects were frozen out of the collector once it had started (no 70 ms full collections)
    assert '"action": "gc_freeze"' in d.log_path.read_text()
    # the rest is still waiting in Redis (its queue, and the parked list the buffered jobs went back to: with
    # HANDOFF_BUFFER=32, 4 running + 32 buffered leave none of the 40 in the queue itself), held by no
    # process, and a new dispatcher finishes everything
    keys = Keys(stack.prefix)
    waiting = stack.rds.llen(stack.queues[0]) + stack.rds.llen(keys.parked(stack.queues[0], "default"))
    assert waiting > 0
    assert not [k for k in stack.rds.scan_iter(f"{stack.prefix}*:proc:*") if stack.rds.llen(k)]
    stack.process(fleet, name="d2")
    wait_final(stack.engine, ids, timeout=60)
    assert max(received_per_task(fleet.stats()).values()) == 1
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)


@pytest.mark.slow  # 10 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_lost_callbacks_are_reclaimed_by_the_lease_and_retried(any_stack):
    stack = any_stack
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


@pytest.mark.slow  # 4 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_failing_gpus_are_avoided_and_jobs_retried_elsewhere(stack):
    # GIVEN g0 answers 500, g1 hangs, g2 refuses connections (an unused port), g3 works
    fleet = stack.fleet(gpus=4, service_time="fixed:0.01", gpu_faults={"g0": ["http_500"], "g1": ["hang"]})
    urls = fleet.urls
    urls["g2"] = f"http://127.0.0.1:{free_port()}/g2"
    endpoints = ",".join(f"{k}={v}" for k, v in urls.items())
    ids = push_jobs(stack.rds, stack.queues[0], 80)
    stack.dispatcher(
        None,
        GPU_ENDPOINTS=endpoints,
        GPU_REQUEST_TIMEOUT_SECONDS="0.5",
        TASK_TIMEOUT_SECONDS="1",
        MAX_ATTEMPTS="20",
        GPU_FAILURE_THRESHOLD="2",
        GPU_PROBE_SECONDS="30",
    )
    # THEN everything finishes on g3, and the three bad GPUs are out of rotation
    wait_final(stack.engine, ids, timeout=90)
    with stack.engine.connect() as conn:
        where = dict(conn.exec_driver_sql("SELECT gpu_id, COUNT(*) FROM tasks GROUP BY gpu_id").all())
        health = dict(conn.exec_driver_sql("SELECT gpu_id, healthy FROM gpus").all())
    assert where == {"g3": 80}
    assert health == {"g0": 0, "g1": 0, "g2": 0, "g3": 1}
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)


def test_a_gpu_endpoint_that_does_not_answer_is_named_at_start(stack):
    # GIVEN GPU_ENDPOINTS with a working GPU, one on a port nothing listens on, and one whose path is wrong
    fleet = stack.fleet(gpus=1, service_time="0")
    urls = fleet.urls
    endpoints = ",".join(
        [f"g0={urls['g0']}", f"gdown=http://127.0.0.1:{free_port()}/g", f"gpath={urls['g0']}/no/such/path"]
    )
    # WHEN a dispatcher starts
    d = stack.dispatcher(None, GPU_ENDPOINTS=endpoints)
    # THEN its log names the two that do not answer like a GPU service, and only those
    logs = wait_for(
        lambda: (text := d.logs(60_000)).count("does not answer like a GPU service") >= 2 and text,
        timeout=20,
        what=lambda: f"two endpoint warnings in {d.logs()}",
    )
    assert "GPU gdown of GPU_ENDPOINTS" in logs and "GPU gpath of GPU_ENDPOINTS" in logs
    assert "GPU g0 of GPU_ENDPOINTS" not in logs


def test_gpu_back_after_probe(stack):
    # GIVEN one GPU that is down, then comes back
    fleet = stack.fleet(gpus=1, service_time="0", faults=["http_500"])
    ids = push_jobs(stack.rds, stack.queues[0], 5)
    stack.dispatcher(fleet, GPU_FAILURE_THRESHOLD="1", GPU_PROBE_SECONDS="0.3", MAX_ATTEMPTS="50")
    wait_for(lambda: _healthy(stack.engine) == 0, 20, what="GPU out of rotation")
    fleet.configure(faults=[])
    # THEN the probe brings it back and the jobs finish
    wait_final(stack.engine, ids, timeout=30)
    assert _healthy(stack.engine) == 1


def _healthy(engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT healthy FROM gpus").scalar_one())


@pytest.mark.slow  # three dispatchers, a long backlog
def test_three_dispatchers_share_a_fleet_and_take_each_others_callbacks(stack):
    # GIVEN three dispatchers; each tells the GPUs to call back to the *next* one
    fleet = stack.fleet(gpus=3, service_time="exp:0.02")
    ports = [free_port() for _ in range(3)]
    procs = []
    for i in range(3):
        target = ports[(i + 1) % 3]
        procs.append(
            stack.dispatcher(
                fleet,
                name=f"d{i}",
                CALLBACK_PORT=str(ports[i]),
                CALLBACK_URL=f"http://127.0.0.1:{target}/callback",
            )
        )
    ids = push_jobs(stack.rds, stack.queues[0], 400) + push_jobs(stack.rds, stack.queues[1], 400)
    # THEN all jobs finish once, no GPU is oversubscribed, and all three dispatchers did work
    wait_final(stack.engine, ids, timeout=120)
    stats = fleet.stats()
    assert stats["totals"]["oversubscriptions"] == 0
    assert max(received_per_task(stats).values()) == 1
    with stack.engine.connect() as conn:
        by = conn.exec_driver_sql("SELECT COUNT(DISTINCT dispatcher_id) FROM tasks").scalar_one()
    assert by == 3
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)


@pytest.mark.slow
def test_a_second_process_with_the_same_dispatcher_id_refuses_to_start_and_a_restart_after_kill_9_does_not(
    stack,
):
    # An outside attack: two replicas started from one .env (DISPATCHER_ID=worker) both ran, took each other's
    # jobs for their own, and the GPUs got fifth jobs and jobs twice. The second must refuse, with a message
    # naming the setting; a restart after a kill -9 of the first (systemd) must not wait for anything.
    fleet = stack.fleet(gpus=2, service_time="fixed:0.05")
    env = {"DISPATCHER_ID": "worker", "TASK_TIMEOUT_SECONDS": "3"}
    first = stack.process(fleet, name="w0", **env)
    twin = DispatcherProc(stack.env(fleet, **env), name="w1")
    stack.procs.append(twin)
    with pytest.raises(ProcessFailed, match="DISPATCHER_ID=worker belongs to a running dispatcher"):
        twin.start(timeout=60)
    # in one line and exit 2, before its server starts (it was a 21-frame traceback and exit 3)
    assert twin.proc is not None and twin.proc.returncode == 2, twin.logs()
    assert "Traceback" not in twin.logs() and "Started server process" not in twin.logs(), twin.logs()
    ids = push_jobs(stack.rds, stack.queues[0], 40)
    wait_in_flight(stack.engine)
    first.kill()
    # The dead process's heartbeat key is made to outlive any start: on a loaded machine the heir's start
    # (imports) took over its 10 s TTL, the key expired by itself and nothing was taken over (a flaky assert
    # in a suite run at load 9). Now only a take-over lets the heir start before the key is gone.
    assert stack.rds.pexpire(Keys(stack.prefix).alive("worker"), 600_000)
    heir = DispatcherProc(stack.env(fleet, **env), name="w2")
    stack.procs.append(heir)
    heir.start()
    assert "took over this DISPATCHER_ID" in heir.logs()
    wait_final(stack.engine, ids, timeout=90)
    assert fleet.stats()["totals"]["oversubscriptions"] == 0
