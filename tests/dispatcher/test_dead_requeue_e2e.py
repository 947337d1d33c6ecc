"""A dead letter put back with ``gpuq queue requeue`` once its cause is fixed runs, once, on a real
dispatcher (in this process) and simulated GPU: the operator's whole path, not only the Redis move."""

from __future__ import annotations

import json

from producer.job import Job
from producer.keys import Keys
from tests.dispatcher.harness import received_per_task, redis_leftovers, wait_final
from tests.dispatcher.helpers import wait_for
from tests.operators.conftest import gpuq, gpuq_env  # noqa: F401 - the fixtures, shared


def test_a_job_refused_under_a_limit_since_raised_runs_once_requeued(stack, gpuq):  # noqa: F811
    q = stack.queues[0]
    keys = Keys(stack.prefix)
    fleet = stack.fleet(gpus=1, service_time="0")
    # GIVEN a dispatcher whose MAX_JOB_BYTES is too low for a job pushed straight into Redis
    old = stack.dispatcher(fleet, name="old", MAX_JOB_BYTES="1024")
    big = Job(task_id="big-1", type="start_transcribe", queue=q, data={"blob": "x" * 3000})
    stack.rds.rpush(q, big.to_redis())
    wait_for(lambda: stack.rds.llen(keys.dead) == 1, 20, what="the big job dead-lettered")
    cli = {"TASK_QUEUES": ",".join(stack.queues)}
    # WHEN the operator requeues it while the limit still stands: it stays, and the reason is said
    res = gpuq("queue", "requeue", "big-1", MAX_JOB_BYTES="1024", **cli)
    assert res.exit_code == 1, res
    assert "kept #0 (task big-1): its job still cannot run: the job is" in res.stdout
    assert stack.rds.llen(keys.dead) == 1 and stack.rds.llen(q) == 0
    # AND once the dispatchers run with a higher limit, the requeue puts it back
    old.stop()
    stack.dispatcher(fleet, name="new")
    res = gpuq("queue", "requeue", "big-1", **cli)
    assert res.exit_code == 0, res
    assert f"requeued #0 (task big-1) onto {q} (normal priority)" in res.stdout
    # THEN it runs, once, and nothing is left behind in Redis
    wait_final(stack.engine, ["big-1"], timeout=30)
    assert received_per_task(fleet.stats())["big-1"] == 1
    assert stack.rds.llen(keys.dead) == 0
    wait_for(lambda: not redis_leftovers(stack.rds, stack.prefix, stack.queues), 10, what="Redis empty")
    # AND a copy of the finished task (dead-lettered again by some mishap) is not requeued to be dropped
    stack.rds.rpush(keys.dead, json.dumps({"raw": big.to_redis(), "reason": "x", "queue": q}))
    res = gpuq("queue", "requeue", "--all", **cli)
    assert res.exit_code == 1 and "task is already finished at attempt 1" in res.stdout, res
