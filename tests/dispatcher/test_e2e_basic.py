"""End to end: producer-shaped jobs in Redis -> dispatcher processes -> simulated GPUs -> callbacks.

Scenarios taking ``any_stack`` run on MariaDB and again on SQLite (embedded mode)."""

from __future__ import annotations

import json

import httpx
import pytest

from producer.job import Job
from producer.keys import Keys
from tests.dispatcher.harness import push_jobs, received_per_task, reconcile, states, wait_final
from tests.dispatcher.helpers import wait_for


@pytest.mark.slow  # 2,000 jobs through one dispatcher
def test_backlog_runs_once_each_without_oversubscription(any_stack):
    stack = any_stack
    # GIVEN a backlog of 2,000 jobs over two queues and 4 GPUs x 4 slots
    fleet = stack.fleet(gpus=4, service_time="exp:0.01")
    ids = push_jobs(stack.rds, stack.queues[0], 1000) + push_jobs(stack.rds, stack.queues[1], 1000)
    # WHEN one dispatcher runs them
    stack.dispatcher(fleet)
    wait_final(stack.engine, ids, timeout=120)
    # THEN every job ran exactly once, no GPU ever had a fifth job, and the load was spread
    stats = fleet.stats()
    assert stats["totals"]["oversubscriptions"] == 0
    per_task = received_per_task(stats)
    assert set(per_task) == set(ids)
    assert max(per_task.values()) == 1
    per_gpu = {name: g["received"] for name, g in stats["gpus"].items()}
    assert min(per_gpu.values()) > 0.15 * len(ids), per_gpu
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)


@pytest.mark.slow  # 3 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_seed_style_jobs_and_bad_jobs(stack):
    # GIVEN jobs pushed the way the seed's producer did (id inside data, or none) and two broken ones
    fleet = stack.fleet(gpus=1, service_time="0")
    q = stack.queues[0]
    stack.rds.rpush(
        q, json.dumps({"type": "start_transcribe", "data": {"task_id": "seed-1", "s3_key": "a.wav"}})
    )
    stack.rds.rpush(q, json.dumps({"type": "send_email", "data": {"email": "x@example.com"}}))
    stack.rds.rpush(q, "this is not json")
    stack.rds.rpush(q, json.dumps({"data": {"no": "type"}}))
    stack.dispatcher(fleet)
    # THEN the good ones run (the id-less one gets an id), the bad ones are dead-lettered with the reason
    keys = Keys(stack.prefix)
    wait_for(lambda: stack.rds.llen(keys.dead) == 2, 20, what="two dead letters")
    wait_for(lambda: states(stack.engine)["finished"] == 2, 20, what="two finished")
    dead = [json.loads(x) for x in stack.rds.lrange(keys.dead, 0, -1)]
    assert dead[0]["raw"] == "this is not json"
    assert "not JSON" in dead[0]["reason"]
    assert "type" in dead[1]["reason"]
    assert all(d["queue"] == q for d in dead)
    assert received_per_task(fleet.stats())["seed-1"] == 1
    assert stack.rds.llen(q) == 0


@pytest.mark.slow  # 7 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_task_view_gpus_health_metrics_and_api_token(stack):
    fleet = stack.fleet(gpus=2, service_time="0")
    d = stack.dispatcher(fleet, API_TOKEN="op-token-0123456789")
    [task_id] = push_jobs(stack.rds, stack.queues[0], 1)
    wait_final(stack.engine, [task_id])
    auth = {"Authorization": "Bearer op-token-0123456789"}
    assert httpx.get(f"{d.url}/tasks/{task_id}").status_code == 401
    body = httpx.get(f"{d.url}/tasks/{task_id}", headers=auth).json()
    assert body["state"] == "finished"
    assert body["attempts"] == 1
    assert body["gpu_id"] in ("g0", "g1")
    assert body["history"][0]["outcome"] == "finished"
    assert httpx.get(f"{d.url}/tasks/nope", headers=auth).status_code == 404
    gpus = httpx.get(f"{d.url}/gpus", headers=auth).json()
    assert [g["gpu_id"] for g in gpus] == ["g0", "g1"]
    assert all(g["slots"] == 4 and g["busy"] == 0 and g["healthy"] for g in gpus)
    assert httpx.get(f"{d.url}/healthz").json()["status"] == "ok"
    metrics = httpx.get(f"{d.url}/metrics").text
    assert 'gpuq_jobs_dispatched_total{pool="default"} 1.0' in metrics
    assert 'gpuq_slots_total{gpu="g0",pool="default"} 4.0' in metrics
    assert "/callback" in httpx.get(f"{d.url}/openapi.json").json()["paths"]


@pytest.mark.slow  # 7 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_jobs_left_in_its_own_processing_list_are_finished_not_stranded(stack):
    # GIVEN a running dispatcher, and a job left in its own processing list the way a take whose answer was
    # lost (and silently retried by the client) leaves it
    fleet = stack.fleet(gpus=1, service_time="0")
    d = stack.dispatcher(fleet)
    q = stack.queues[0]
    keys = Keys(stack.prefix)
    stranded = Job(task_id="stranded-1", type="start_transcribe", queue=q)
    proc = keys.proc(q, d.env["DISPATCHER_ID"])
    stack.rds.rpush(proc, f"{q}\n{stranded.to_redis()}")
    stack.rds.publish(keys.wake, "job")
    # THEN its next pass runs it (the dispatcher is alive, so no other would ever sweep that list)
    wait_final(stack.engine, ["stranded-1"], timeout=20)
    assert stack.rds.llen(proc) == 0
    assert received_per_task(fleet.stats())["stranded-1"] == 1
