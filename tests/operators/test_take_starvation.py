"""A queue that mixes pools (a seed-style producer pushes every type into one list) must not stop a pool
with idle GPUs because more than SCAN_DEPTH jobs for a pool without GPUs sit at its head (review of
issue 14: the take script looked only SCAN_DEPTH deep past jobs whose pool cannot start them; now it sets
such a head aside, per priority and pool, and looks again)."""

from __future__ import annotations

import json

import pytest

from dispatcher.queues.intake_lua import SCAN_DEPTH
from producer.keys import Keys, Priority, queue_key
from tests.dispatcher.harness import push_jobs, states, wait_final
from tests.operators.test_metrics import scrape, value


@pytest.mark.slow  # hundreds of jobs behind a full pool
def test_jobs_for_a_pool_without_gpus_do_not_block_a_mixed_queue(stack):
    # GIVEN a default pool of one idle GPU, TASK_ROUTES sending "embed" to a pool that has no GPU (yet),
    # and a mixed queue with 300 embed jobs in front of 5 default-pool jobs
    fleet = stack.fleet(gpus=1, service_time="fixed:0.01")
    q = stack.queues[0]
    waiting = push_jobs(stack.rds, q, 300, task_type="embed")
    ids = push_jobs(stack.rds, q, 5, task_type="transcribe")
    stack.dispatcher(fleet, TASK_ROUTES="embed=embed")
    # THEN the default pool's jobs run on its idle GPU
    wait_final(stack.engine, ids, timeout=15)
    assert states(stack.engine, ids) == {"finished": 5}
    assert not states(stack.engine, waiting)["finished"]


def test_jobs_set_aside_run_in_order_and_once_when_their_pool_gets_a_gpu(stack, gpuq):
    # GIVEN 300 embed jobs set aside or waiting behind the default pool's jobs, the embed pool without GPUs
    fleet = stack.fleet(gpus=1, service_time="fixed:0.01")
    embed = stack.fleet(gpus=1, slots=1, service_time="fixed:0.01")
    q = stack.queues[0]
    waiting = push_jobs(stack.rds, q, 300, task_type="embed")
    ids = push_jobs(stack.rds, q, 5, task_type="transcribe")
    d = stack.dispatcher(fleet, TASK_ROUTES="embed=embed")
    wait_final(stack.engine, ids, timeout=15)
    aside = Keys(stack.prefix).aside(q, Priority.NORMAL, "embed")
    assert (stack.rds.llen(aside), stack.rds.llen(q)) == (SCAN_DEPTH, 300 - SCAN_DEPTH)
    # ... still counted in their queue (the depth gauge, `gpuq queue list`), and shown as set aside
    assert value(scrape(d.url), "gpuq_queue_depth", queue=q, priority="normal") == 300
    env = {
        "TASK_QUEUES": ",".join(stack.queues),
        "REDIS_KEY_PREFIX": stack.prefix,
        "TASK_ROUTES": "embed=embed",
    }
    listed = gpuq("queue", "list", **env)
    assert listed.exit_code == 0 and f"normal ({SCAN_DEPTH} set aside)" in listed.stdout, listed
    assert " 300 " in next(line for line in listed.stdout.splitlines() if "set aside" in line)
    # ... found where they wait (`gpuq task show`), cancelled and reprioritized like any waiting job
    shown = gpuq("task", "show", waiting[3], **env)
    assert shown.exit_code == 0 and json.loads(shown.stdout)["list"] == aside, shown
    assert json.loads(shown.stdout)["state"] == "queued"
    cancelled = [waiting[3], waiting[-1]]  # one set aside, one still in the queue's list
    for task_id in cancelled:
        assert gpuq("task", "cancel", task_id, **env).exit_code == 0
    urgent = waiting[10]
    moved = gpuq("task", "priority", urgent, "high", **env)
    assert moved.exit_code == 0 and queue_key(q, Priority.HIGH) in moved.stdout, moved
    # WHEN an operator adds a one-slot GPU to the embed pool
    assert gpuq("gpu", "add", "e0", embed.url("g0"), "--pool", "embed", "--slots", "1", **env).exit_code == 0
    # THEN every embed job runs once, the high-priority one first, the others in the order they were pushed;
    # the cancelled ones never
    rest = [t for t in waiting if t not in cancelled and t != urgent]
    wait_final(stack.engine, waiting, timeout=90, final=("finished", "cancelled"))
    received = [job["task_id"] for job in embed.stats()["jobs"]]
    assert received == [urgent, *rest]
    assert states(stack.engine, cancelled) == {"cancelled": 2}
    assert not stack.rds.exists(aside, q, queue_key(q, Priority.HIGH))


def test_a_backlog_of_several_scan_depths_is_set_aside_without_waiting_for_idle_polls(stack):
    # GIVEN 1,000 embed jobs (four takes' worth of setting aside) in front of 5 default-pool jobs, and
    # dispatchers that look on their own only every 60 s
    fleet = stack.fleet(gpus=1, service_time="fixed:0.01")
    q = stack.queues[0]
    waiting = push_jobs(stack.rds, q, 1000, task_type="embed")
    ids = push_jobs(stack.rds, q, 5, task_type="transcribe")
    stack.dispatcher(fleet, TASK_ROUTES="embed=embed", IDLE_POLL_SECONDS="60")
    # THEN each take that set jobs aside is followed at once by another look: the default jobs run
    wait_final(stack.engine, ids, timeout=30)
    assert states(stack.engine, ids) == {"finished": 5}
    aside = Keys(stack.prefix).aside(q, Priority.NORMAL, "embed")
    assert stack.rds.llen(aside) + stack.rds.llen(q) == len(waiting)
