"""``GET /metrics`` of a running dispatcher: every series the operators' issue lists, with the values the
stores hold."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.db.engine import transaction
from dispatcher.db.gpus import remove_gpu
from producer.job import Job
from producer.keys import PRIORITY_ORDER, Keys, Priority, queue_key
from tests.dispatcher.harness import push_jobs, states
from tests.dispatcher.helpers import add_gpu, wait_for


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    res = httpx.get(f"{url}/metrics", timeout=10)
    assert res.status_code == 200
    assert res.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(res.text)
        for s in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def test_metrics_names_labels_and_values(stack):
    # GIVEN a backlog at three priorities, one GPU whose 4 slots stay busy, a dead letter and a forged callback
    q0, q1 = stack.queues
    stack.rds.rpush(
        queue_key(q0, Priority.HIGH),
        *[Job(task_id=f"h{i}-{q0}", type="t", queue=q0, priority=Priority.HIGH).to_redis() for i in range(3)],
    )
    push_jobs(stack.rds, q0, 10)
    stack.rds.rpush(
        queue_key(q1, Priority.LOW),
        *[Job(task_id=f"l{i}-{q1}", type="t", queue=q1, priority=Priority.LOW).to_redis() for i in range(2)],
    )
    stack.rds.rpush(q1, b"not a job")
    fleet = stack.fleet(gpus=1, service_time="0", faults=["lost_callback"])
    d = stack.dispatcher(fleet, TASK_TIMEOUT_SECONDS="60")
    wait_for(lambda: states(stack.engine)["processing"] == 4, 20, what="4 running")
    # Recorded is not yet sent: the placement's commit is visible here before the dispatcher's loop has the
    # transaction's answer and fires the requests (and counts them). Received by the GPU, they were counted.
    wait_for(lambda: len(fleet.stats()["jobs"]) == 4, 20, what="4 requests at the GPU")
    wait_for(lambda: stack.rds.llen(Keys(stack.prefix).dead) == 1, 10, what="the dead letter")
    forged = httpx.post(
        f"{d.url}/callback",
        json={"task_id": "x", "status": "finished"},
        headers={"Authorization": "Bearer 1.no"},
    )
    assert forged.status_code == 401

    # The pass that filled the GPU took jobs for its ready buffer (test_first_wave.py); no slot freeing within
    # DEMAND_SECONDS, they go back to their queues.
    queues = [queue_key(q, p) for q in (q0, q1) for p in PRIORITY_ORDER]
    wait_for(lambda: sum(stack.rds.llen(k) for k in queues) == 11, 15, what="11 jobs back in their queues")

    # WHEN Prometheus scrapes
    samples = scrape(d.url)

    # THEN queue depth per queue and priority is what Redis holds, 11 of the 15 jobs still waiting
    depths = {(q, p.value): stack.rds.llen(queue_key(q, p)) for q in (q0, q1) for p in PRIORITY_ORDER}
    assert sum(depths.values()) == 11
    for (q, p), n in depths.items():
        assert value(samples, "gpuq_queue_depth", queue=q, priority=p) == n
        age = value(samples, "gpuq_queue_oldest_age_seconds", queue=q, priority=p)
        assert (age > 0) == (n > 0)
    assert value(samples, "gpuq_dead_letter_jobs") == 1
    assert value(samples, "gpuq_dead_letters_total") == 1
    assert value(samples, "gpuq_parked_jobs", pool="default") == 0
    # slots and GPU health
    assert value(samples, "gpuq_slots_busy", gpu="g0", pool="default") == 4
    assert value(samples, "gpuq_slots_total", gpu="g0", pool="default") == 4
    assert value(samples, "gpuq_gpu_healthy", gpu="g0", pool="default") == 1
    assert value(samples, "gpuq_tasks", state="processing") == 4
    assert value(samples, "gpuq_tasks", state="retrying") == 0
    # counters and histograms
    assert value(samples, "gpuq_jobs_dispatched_total", pool="default") == 4
    assert value(samples, "gpuq_callbacks_total", code="401") == 1
    assert value(samples, "gpuq_lease_expiries_total") == 0
    assert value(samples, "gpuq_dispatch_latency_seconds_count") == 4
    assert value(samples, "gpuq_job_seconds_count") == 0
    assert any(name == "gpuq_dispatch_latency_seconds_bucket" for name, _ in samples)
    assert any(name == "gpuq_job_seconds_bucket" for name, _ in samples)


@pytest.mark.slow  # 4 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_attempts_by_outcome_and_lease_expiries(stack):
    fleet = stack.fleet(gpus=1, service_time="0", faults=["lost_callback"])
    d = stack.dispatcher(fleet, TASK_TIMEOUT_SECONDS="0.3", MAX_ATTEMPTS="1")
    push_jobs(stack.rds, stack.queues[0], 2)
    wait_for(lambda: states(stack.engine)["failed"] == 2, 20, what="both leases expired")
    samples = scrape(d.url)
    assert value(samples, "gpuq_lease_expiries_total") == 2
    assert value(samples, "gpuq_attempts_total", outcome="lease_expired") == 2
    assert value(samples, "gpuq_tasks", state="processing") == 0


def test_a_removed_gpu_loses_its_series(stack):
    # GIVEN a dispatcher and a GPU added at run time (as a KEDA-scaled pod's `gpuq gpu add` does), scraped once
    fleet = stack.fleet(gpus=1, service_time="0")
    d = stack.dispatcher(fleet)
    add_gpu(stack.engine, "pod-a", 4, url=fleet.url("g0") + "-pod-a")  # one URL per GPU
    assert value(scrape(d.url), "gpuq_slots_total", gpu="pod-a", pool="default") == 4

    # WHEN the GPU is removed (the pod drained and left) and Prometheus scrapes again
    assert transaction(stack.engine, remove_gpu, gpu_id="pod-a") == (True, 0)
    samples = scrape(d.url)

    # THEN its series are gone (a stale gpuq_slots_busy would keep KEDA's demand up for ever); g0's remain
    assert not any(dict(labels).get("gpu") == "pod-a" for _, labels in samples)
    assert value(samples, "gpuq_slots_total", gpu="g0", pool="default") == 4
