"""Scheduling: delayed jobs run no earlier, survive restarts and show as waiting; priority changes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import redis
from sqlalchemy import insert, select

from dispatcher.db.engine import init_schema, make_engine, utcnow
from dispatcher.db.schema import tasks
from producer.job import Job
from tests.dispatcher.conftest import Stack
from tests.dispatcher.harness import push_jobs, wait_final
from tests.dispatcher.helpers import wait_for
from tests.operators.conftest import Gpuq

DELAY = 4.0


@pytest.mark.slow
def test_a_delayed_job_waits_survives_a_restart_and_takes_its_new_priority(stack: Stack, gpuq: Gpuq) -> None:
    fleet = stack.fleet(gpus=1, slots=2, service_time="fixed:0.01")
    d = stack.process(fleet, TASK_TIMEOUT_SECONDS="5")  # a job whose callback found it killed runs again
    queue = stack.queues[0]
    not_before = datetime.now(UTC) + timedelta(seconds=DELAY)
    delayed = Job(task_id="later-1", type="start_transcribe", queue=queue, data={}, not_before=not_before)
    stack.rds.rpush(queue, delayed.to_redis())
    now_ids = push_jobs(stack.rds, queue, 2)

    def shown() -> dict[str, object] | None:
        # GET /tasks/{id} also answers for a job still waiting in Redis ("queued"): wait for the record
        res = httpx.get(f"{d.url}/tasks/later-1", timeout=5)
        return res.json() if res.status_code == 200 and res.json()["state"] != "queued" else None

    # The dispatcher is killed as soon as it has recorded the delayed task: all that must fit in DELAY (a
    # loaded machine once ran the task before a priority change by the CLI, a subprocess, and the kill).
    task = wait_for(shown, 10, 0.02, what="the delayed task recorded")
    d.kill()  # the schedule lives in the database, not in a process
    assert task["state"] == "scheduled"
    assert task["run_after"] == not_before.replace(tzinfo=None).isoformat() + "Z"
    assert "later-1" not in {j["task_id"] for j in fleet.stats()["jobs"]}

    env = {"TASK_QUEUES": ",".join(stack.queues)}
    res = gpuq("task", "priority", "later-1", "high", **env)
    assert res.exit_code == 0 and "scheduled" in res.stdout and "high" in res.stdout, res
    d.start()
    wait_final(stack.engine, [*now_ids, "later-1"], timeout=30)
    with stack.engine.connect() as conn:
        row = conn.execute(select(tasks).where(tasks.c.task_id == "later-1")).one()
    assert row.started_at >= not_before.replace(tzinfo=None)
    assert row.priority == "high"
    assert [j["task_id"] for j in fleet.stats()["jobs"]].count("later-1") == 1
    refused = gpuq("task", "priority", "later-1", "low", **env)
    assert refused.exit_code == 1 and "finished" in refused.stderr


def _row(task_id: str, state: str, queue: str) -> dict[str, object]:
    now = utcnow()
    return {
        "task_id": task_id,
        "queue": queue,
        "state": state,
        "type": "embed",
        "data": "{}",
        "max_attempts": 3,
        "created_at": now,
        "updated_at": now,
    }


@pytest.mark.slow  # 3 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_priority_moves_a_waiting_job_between_its_queues_lists(
    gpuq: Gpuq, gpuq_env: dict[str, str], rds: redis.Redis
) -> None:
    qa, qb = gpuq_env["TASK_QUEUES"].split(",")
    engine = make_engine(gpuq_env["DATABASE_URL"], pool_size=1)
    init_schema(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(tasks),
            [
                _row("queued-1", "queued", qa),
                _row("busy-1", "processing", qa),
                _row("done-1", "finished", qa),
            ],
        )
    big = 2**63 - 1  # past 2**53, so Redis' cjson would round it: the body is rewritten in Python, exactly
    jobs = [
        Job(task_id=t, type="embed", queue=qa, data={"n": big}).to_redis() for t in ("a", "queued-1", "b")
    ]
    rds.rpush(qa, *jobs)
    rds.rpush(f"{{{qa}}}:high", Job(task_id="h", type="embed", queue=qa).to_redis())
    # a seed-style job without a row, its id only in data, in the other queue
    rds.rpush(qb, json.dumps({"type": "embed", "data": {"task_id": "seed-1", "x": 1}}))
    try:
        res = gpuq("task", "priority", "queued-1", "high")
        assert res.exit_code == 0 and f"{{{qa}}}:high" in res.stdout, res
        assert [json.loads(j)["task_id"] for j in rds.lrange(qa, 0, -1)] == ["a", "b"]
        high = [json.loads(j) for j in rds.lrange(f"{{{qa}}}:high", 0, -1)]
        assert [(j["task_id"], j["priority"]) for j in high] == [("h", "normal"), ("queued-1", "high")]
        assert high[1]["data"] == {"n": big}
        with engine.connect() as conn:
            got = conn.execute(select(tasks.c.priority).where(tasks.c.task_id == "queued-1")).scalar_one()
        assert got == "high"

        res = gpuq("task", "priority", "seed-1", "low")
        assert res.exit_code == 0, res
        assert rds.llen(qb) == 0
        assert json.loads(rds.lindex(f"{{{qb}}}:low", 0) or b"{}")["data"]["task_id"] == "seed-1"

        for task_id, state in (("busy-1", "processing"), ("done-1", "finished")):
            res = gpuq("task", "priority", task_id, "high")
            assert res.exit_code == 1 and state in res.stderr, res
        res = gpuq("task", "priority", "nobody", "high")
        assert res.exit_code == 1 and "unknown task" in res.stderr
        assert gpuq("task", "priority", "queued-1", "urgent").exit_code == 2
    finally:
        rds.delete(qa, f"{{{qa}}}:high", qb, f"{{{qb}}}:low")
        engine.dispose()
