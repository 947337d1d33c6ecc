"""GPUs that close the connection without answering, or answer only after GPU_REQUEST_TIMEOUT_SECONDS.

Both are "sent, no answer" (SPEC §4): the request may have reached the GPU, so the slot stays held until a
callback or the lease decides. A closed connection means the job never ran: the lease expires and the task
runs again. A slow answer means the job did run: its callback finishes it, once, with no second run.
(Hanging GPUs, 500s and refused connections are in tests/dispatcher/test_e2e_faults.py.)
"""

from __future__ import annotations

import pytest

from tests.dispatcher.harness import push_jobs, received_per_task, reconcile, wait_final
from tests.faults.support import ran_beyond_attempts


def _outcomes(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.exec_driver_sql("SELECT outcome, COUNT(*) FROM attempts GROUP BY outcome").all())


@pytest.mark.slow  # 4 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_gpu_closing_the_connection_costs_a_lease_then_a_retry(stack):
    # GIVEN g0 closes a third of its connections without answering, g1 works; a 1 s lease
    fleet = stack.fleet(gpus=2, service_time="fixed:0.02", gpu_faults={"g0": ["close@0.34"]})
    ids = push_jobs(stack.rds, stack.queues[0], 60)
    stack.dispatcher(
        fleet,
        TASK_TIMEOUT_SECONDS="1",
        MAX_ATTEMPTS="20",
        GPU_FAILURE_THRESHOLD="50",
        GPU_PROBE_SECONDS="0.3",
    )
    # THEN every job finishes; each closed connection shows as an expired lease, and no job ran beyond its
    # attempts (a loaded machine may also expire an attempt whose callback came later than 1 s: what a lease
    # is for, so closed and expired attempts need not be the same set)
    wait_final(stack.engine, ids, timeout=90)
    stats = fleet.stats()
    closed = stats["gpus"]["g0"]["answers"].get("close", 0)
    assert closed > 0
    with stack.engine.connect() as conn:
        expired = conn.exec_driver_sql(
            "SELECT COUNT(*) FROM attempts WHERE outcome = 'lease_expired'"
        ).scalar()
    assert expired >= closed
    assert {j["task_id"] for j in stats["jobs"] if j["outcome"] == "finished"} == set(ids)
    assert ran_beyond_attempts(stack.engine, stats) == {}
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)


@pytest.mark.slow  # 5 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_gpu_answering_after_the_request_timeout_keeps_the_slot_and_runs_once(stack):
    # GIVEN GPUs that answer 202 after 1 s to 40% of the jobs, a 0.3 s request timeout and a 20 s lease
    fleet = stack.fleet(gpus=2, service_time="fixed:0.05", faults=["slow_answer:1@0.4"])
    ids = push_jobs(stack.rds, stack.queues[0], 40)
    d = stack.dispatcher(
        fleet,
        GPU_REQUEST_TIMEOUT_SECONDS="0.3",
        TASK_TIMEOUT_SECONDS="20",
        GPU_FAILURE_THRESHOLD="1000",
    )
    # THEN the timed-out requests are left to the callback, which finishes each job: one run per job,
    # never a fifth job on a GPU (the slot stayed held while the GPU was still answering)
    wait_final(stack.engine, ids, timeout=60)
    stats = fleet.stats()
    assert max(received_per_task(stats).values()) == 1
    assert stats["totals"]["oversubscriptions"] == 0
    assert _outcomes(stack.engine) == {"finished": 40}
    assert _no_answers(d) > 0
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)


def _no_answers(d) -> int:
    return d.log_path.read_text().count('"action": "gpu_no_answer"')
