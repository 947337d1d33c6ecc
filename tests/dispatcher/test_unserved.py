"""Jobs left in a queue that no running dispatcher serves any more are said in the log and /metrics (an
outside review: a queue taken out of TASK_QUEUES kept its waiting and scheduled jobs without a word)."""

from __future__ import annotations

import time
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import text

from dispatcher.db.engine import utcnow
from dispatcher.queues.unserved import UNSERVED_AFTER_SECONDS
from producer.job import Job
from producer.keys import Keys, Priority
from simgpu.testing import poll_until
from tests.dispatcher.conftest import Stack
from tests.dispatcher.harness import push_jobs


def _scheduled_in(stack: Stack, task_id: str) -> str | None:
    with stack.engine.connect() as conn:
        return conn.execute(text("SELECT state FROM tasks WHERE task_id = :t"), {"t": task_id}).scalar()


@pytest.mark.slow  # two in-process dispatchers, one after the other
def test_a_queue_no_running_dispatcher_serves_is_said_with_what_it_holds(stack: Stack) -> None:
    served, dropped = stack.queues
    fleet = stack.fleet(gpus=1)
    first = stack.dispatcher(fleet, name="both")  # serves both queues
    later = Job(task_id="later-1", type="t", queue=dropped, data={}, not_before=utcnow() + timedelta(hours=1))
    stack.rds.rpush(dropped, later.to_redis())
    poll_until(lambda: _scheduled_in(stack, "later-1") == "scheduled", 20, what="the scheduled task recorded")
    first.stop()
    push_jobs(stack.rds, dropped, 3)
    keys = Keys(stack.prefix)
    # what dispatchers park or set aside counts too (an outside trial found 36 parked jobs unsaid)
    for key, n in ((keys.parked(dropped, "default"), 2), (keys.aside(dropped, Priority.HIGH, "default"), 1)):
        stack.rds.rpush(
            key, *[Job(task_id=f"{key}-{i}", type="t", queue=dropped).to_redis() for i in range(n)]
        )
    # served until two minutes ago (as if the restart below happened then), and one served until now
    stack.rds.hset(keys.queues_seen, dropped, int(time.time() - 2 * UNSERVED_AFTER_SECONDS))
    # values no dispatcher wrote: one stopped every dispatcher of the prefix (an outside trial)
    stack.rds.hset(keys.queues_seen, mapping={"hostile": "not-a-number", "nan-queue": "nan", b"\xff": "1"})

    only = stack.dispatcher(fleet, name="one", TASK_QUEUES=served)
    said = poll_until(lambda: "unserved_queue" in (log := only.logs(60_000)) and log, 20, what="the warning")
    (line,) = [x for x in said.splitlines() if "unserved_queue" in x]  # the served queue is not said
    assert f"queue '{dropped}' holds 6 waiting jobs and 1 scheduled or retrying task" in line, line
    assert "no running dispatcher has served it for 2 min" in line and f"this one serves {served}" in line
    metrics = httpx.get(f"{only.url}/metrics", timeout=10).text
    assert f'gpuq_unserved_jobs{{queue="{dropped}"}} 7.0' in metrics, metrics[-2000:]
    assert stack.rds.llen(dropped) == 3  # said, not moved
    # the values no dispatcher wrote are gone, and the dispatcher lives on
    assert set(stack.rds.hkeys(keys.queues_seen)) == {served.encode(), dropped.encode()}
    assert httpx.get(f"{only.url}/healthz", timeout=10).status_code == 200
    assert "died" not in only.logs(60_000)


@pytest.mark.slow
def test_a_restart_gap_or_an_empty_queue_is_not_said(stack: Stack) -> None:
    """Not served for less than a minute (a dispatcher restarting), or holding nothing: no warning."""
    served, dropped = stack.queues
    keys = Keys(stack.prefix)
    push_jobs(stack.rds, dropped, 2)
    stack.rds.hset(keys.queues_seen, dropped, int(time.time() - 5))  # its dispatcher just stopped
    empty = f"{dropped}-empty"
    stack.rds.hset(keys.queues_seen, empty, int(time.time() - 2 * UNSERVED_AFTER_SECONDS))
    only = stack.dispatcher(stack.fleet(gpus=1), name="one", TASK_QUEUES=served)
    poll_until(lambda: "dispatcher started" in only.logs(60_000), 20, what="the start")
    time.sleep(1.0)  # its first look runs at its first housekeeping tick (0.25 s)
    assert "unserved_queue" not in only.logs(60_000)
    assert "gpuq_unserved_jobs{" not in httpx.get(f"{only.url}/metrics", timeout=10).text
    assert float(stack.rds.hget(keys.queues_seen, served) or 0) >= time.time() - 30  # its own, recorded
