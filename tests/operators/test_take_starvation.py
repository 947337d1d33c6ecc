"""A queue that mixes pools (a seed-style producer pushes every type into one list) must not stop a pool
with idle GPUs because more than SCAN_DEPTH jobs for a pool without GPUs sit at its head (review of
issue 14: the take script looks only SCAN_DEPTH deep past jobs whose pool cannot start them)."""

from __future__ import annotations

from tests.dispatcher.harness import push_jobs, states, wait_final


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
