"""Pools: placement only within a job's pool, and no head-of-line blocking across pools."""

from __future__ import annotations

import json

import httpx
import pytest

from dispatcher.db.engine import make_engine
from producer.keys import Keys
from tests.dispatcher.conftest import Stack
from tests.dispatcher.harness import push_jobs, states, wait_final
from tests.dispatcher.helpers import wait_for

A_JOBS = 40


@pytest.mark.slow  # 3 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_a_full_pool_never_holds_up_another_pools_jobs(stack: Stack) -> None:
    """Pool ``slow`` (2 slots, jobs that outlast the test) is saturated and 40 of its jobs wait at the head of
    the queue; the 20 ``fast`` jobs queued behind them in the same list all run and finish while the slow
    backlog has not moved: a take skips jobs whose pool is full, which stay in their queue, in order. (With
    20 s slow jobs, a loaded machine slower than that at the fast ones would have seen slow ones finish.)"""
    slow = stack.fleet(gpus=1, slots=2, service_time="fixed:3600")
    fast = stack.fleet(gpus=2, slots=4, service_time="fixed:0.05")
    endpoints = f"slow:s0={slow.url('g0')},fast:f0={fast.url('g0')},fast:f1={fast.url('g1')}"
    d = stack.dispatcher(GPU_ENDPOINTS=endpoints, TASK_ROUTES="transcribe=slow,embed=fast", SLOTS_PER_GPU="2")
    queue = stack.queues[0]
    slow_ids = push_jobs(stack.rds, queue, A_JOBS, task_type="transcribe")
    fast_ids = push_jobs(stack.rds, queue, 20, task_type="embed")

    wait_final(stack.engine, fast_ids, timeout=60)
    # The pass that filled the slow pool took jobs for its ready buffer (and bound standbys to its busy
    # slots; test_first_wave.py): with no slot freed within DEMAND_SECONDS they all go back to the queue, in
    # order, not to the parked list.
    wait_for(
        lambda: stack.rds.llen(queue) == A_JOBS - 2,
        15,
        what=lambda: f"the slow backlog back in its queue (it holds {stack.rds.llen(queue)})",
    )
    slow_states = states(stack.engine, slow_ids)
    assert slow_states["finished"] == 0, slow_states
    assert slow_states["processing"] == 2, slow_states  # the pool is full, never over
    assert (
        stack.rds.llen(Keys(stack.prefix).parked(queue, "slow")) == 0
    )  # nothing parked: they wait in the queue
    waiting = [json.loads(raw)["task_id"] for raw in stack.rds.lrange(queue, 0, -1)]
    running = [t for t in slow_ids if t not in waiting]
    assert len(running) == 2 and waiting == [t for t in slow_ids if t not in running]

    # placement stayed in each job's pool
    assert {j["task_id"] for j in slow.stats()["jobs"]} <= set(slow_ids)
    assert {j["task_id"] for j in fast.stats()["jobs"]} == set(fast_ids)

    gpus = {g["gpu_id"]: g for g in httpx.get(f"{d.url}/gpus", timeout=5).json()}
    assert {g: (v["pool"], v["busy"]) for g, v in gpus.items()} == {
        "s0": ("slow", 2),
        "f0": ("fast", 0),
        "f1": ("fast", 0),
    }


@pytest.mark.slow  # 5 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_jobs_waiting_for_a_full_pool_keep_their_place(stack: Stack) -> None:
    """Jobs waiting for a full pool (behind which other pools' jobs ran) are served before newer jobs of the
    same pool, and every job of both pools ends."""
    slow = stack.fleet(gpus=1, slots=1, service_time="fixed:0.3")
    fast = stack.fleet(gpus=1, slots=2, service_time="fixed:0.02")
    endpoints = f"slow:s0={slow.url('g0')},fast:f0={fast.url('g0')}"
    stack.dispatcher(GPU_ENDPOINTS=endpoints, TASK_ROUTES="transcribe=slow,other=fast", SLOTS_PER_GPU="1")
    queue = stack.queues[0]
    first = push_jobs(stack.rds, queue, 4, task_type="transcribe")
    rest = push_jobs(stack.rds, queue, 6, task_type="other")
    wait_final(stack.engine, rest, timeout=30)  # the fast pool's jobs ran past the waiting slow ones
    later = push_jobs(stack.rds, queue, 2, task_type="transcribe")
    wait_final(stack.engine, first + rest + later, timeout=60)
    engine = make_engine(stack.database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT task_id, started_at FROM tasks WHERE pool = 'slow' ORDER BY started_at"
            ).all()
    finally:
        engine.dispose()
    order = [r[0] for r in rows]
    assert order[:4] == first, "waiting jobs ran, in order, before the slow jobs queued after them"
