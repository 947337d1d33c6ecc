"""Jobs waiting for a full pool keep their place (issue 14, blocker 1; SPEC §4 "Order").

Before: with an idle ``embed`` pool the free-slot count was global, so the dispatcher took the full default
pool's jobs anyway and parked them: a high-priority job sat behind every low one, waiting jobs answered
"unknown task" to GET /tasks/{id} and ``gpuq task priority``, and the queue-age metric stayed 0.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid

import httpx
import pytest
from sqlalchemy import text

from producer.job import Job
from producer.keys import Keys, Priority, queue_key
from tests.dispatcher.harness import states, wait_final
from tests.dispatcher.helpers import wait_for
from tests.operators.test_metrics import scrape, value


def _push(stack, queue: str, n: int, priority: Priority, task_type: str = "transcribe") -> list[str]:
    jobs = [
        Job(task_id=str(uuid.uuid4()), type=task_type, queue=queue, priority=priority, data={"i": i})
        for i in range(n)
    ]
    stack.rds.rpush(queue_key(queue, priority), *[j.to_redis() for j in jobs])
    return [j.task_id for j in jobs]


def _returned(url: str, to: str = "queue") -> float:
    """Jobs of the default pool the dispatcher took and returned unstarted (``gpuq_jobs_returned``)."""
    return scrape(url).get(
        ("gpuq_jobs_returned_total", frozenset({"pool": "default", "to": to}.items())), 0.0
    )


def _started(stack, ids: list[str]) -> dict[str, dt.datetime]:
    with stack.engine.connect() as conn:
        rows = conn.execute(text("SELECT task_id, started_at FROM tasks WHERE started_at IS NOT NULL")).all()
    return {r[0]: r[1] for r in rows if r[0] in set(ids)}


@pytest.mark.slow  # 8 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_a_full_pools_jobs_wait_in_order_visible_and_changeable(stack, gpuq):
    # GIVEN a default pool of one 1-slot GPU busy with a job that would run an hour, and an idle 4-slot embed
    # pool. (The pass after the one that fills the pool takes jobs for its ready buffer, test_first_wave.py;
    # with no slot freed within DEMAND_SECONDS they go back to their queue. A pool whose slots turn over
    # keeps its buffer: a later high-priority job then starts behind at most HANDOFF_BUFFER jobs, README
    # "Slot hand-off". The first job ends when the test cancels it: with 3 s jobs, a loaded CI machine spent
    # more than the second between the lapse and the end on the checks below, and the buffer took the jobs
    # again.)
    default = stack.fleet(gpus=1, slots=1, service_time="fixed:3600")
    embed = stack.fleet(gpus=1, slots=4, service_time="fixed:0.01")
    q = stack.queues[0]
    d = stack.dispatcher(
        GPU_ENDPOINTS=f"g0={default.url('g0')},embed:e0={embed.url('g0')}",
        TASK_ROUTES="embed=embed",
        SLOTS_PER_GPU="1",
    )
    low = _push(stack, q, 8, Priority.LOW)
    wait_for(lambda: states(stack.engine, low)["processing"] == 1, 20, what="the first low job running")
    # WHEN a high-priority job comes for the same full pool
    (high,) = _push(stack, q, 1, Priority.HIGH)
    # THEN every waiting job stays in its queue (nothing taken and parked while the embed pool idles) ...
    # (Once the buffer gave its jobs back: the pass after the one that filled the pool takes them, so the
    # 7 low jobs are also all in Redis for a moment before it, which a test on a loaded machine could
    # take for the end, and then find the list emptied by the time it scrapes.)
    wait_for(
        lambda: _returned(d.url) > 0 and stack.rds.llen(queue_key(q, Priority.LOW)) == 7,
        15,
        what="the buffer's jobs given back: 7 low jobs waiting in Redis",
    )
    assert [json.loads(raw)["task_id"] for raw in stack.rds.lrange(queue_key(q, Priority.LOW), 0, -1)] == low[
        1:
    ]
    assert _returned(d.url, "parked") == 0 and stack.rds.llen(Keys(stack.prefix).parked(q, "default")) == 0
    # ... visible: GET /tasks/{id} answers queued with its place; `gpuq task show` too
    res = httpx.get(f"{d.url}/tasks/{low[-1]}", timeout=5)
    assert res.status_code == 200, res.text
    assert res.json()["state"] == "queued" and res.json()["list"] == queue_key(q, Priority.LOW)
    shown = gpuq("task", "show", low[-1], TASK_QUEUES=",".join(stack.queues), REDIS_KEY_PREFIX=stack.prefix)
    assert shown.exit_code == 0 and '"state": "queued"' in shown.stdout, shown
    # ... counted in the queue-age metric
    samples = scrape(d.url)
    assert value(samples, "gpuq_queue_oldest_age_seconds", queue=q, priority="low") > 0
    # ... and changeable: `gpuq task priority` moves the last low job up to normal
    moved = gpuq(
        "task",
        "priority",
        low[-1],
        "normal",
        TASK_QUEUES=",".join(stack.queues),
        REDIS_KEY_PREFIX=stack.prefix,
    )
    assert moved.exit_code == 0, moved
    # AND once the running job ends (cancelled; the next ones are short), the high job runs next, then the
    # promoted one, before the other low jobs waiting since earlier
    default.configure(service_time="fixed:0.2")
    assert gpuq("task", "cancel", low[0], TASK_QUEUES=",".join(stack.queues)).exit_code == 0
    wait_final(stack.engine, [high, low[-1]], timeout=30)
    started = _started(stack, [*low, high])
    running_first = min(started, key=started.__getitem__)
    after = sorted((t for t in started if t != running_first), key=started.__getitem__)
    assert after[:2] == [high, low[-1]], after
