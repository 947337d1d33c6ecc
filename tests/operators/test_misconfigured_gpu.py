"""A GPU registered with a wrong URL (it answers 404) fails itself, not the backlog (issue 14, blocker 2).

Before: every job placed on it ended ``failed`` at once ("GPU answered 404: 404: Not Found"), the GPU stayed
in rotation and took the next ones, nothing was logged, and recovery was one ``gpuq task retry`` per task.
SPEC §4: 401/403/404/405/501 count against the GPU and the job waits again without using an attempt.
"""

from __future__ import annotations

import json

from sqlalchemy import text

from tests.dispatcher.harness import push_jobs, reconcile, states, wait_final


def test_gpu_answering_404_goes_out_of_rotation_and_no_job_fails(stack):
    # GIVEN two working GPUs and g9, whose URL is a path the service does not have (404), every job with
    # a single attempt allowed, so a job failed by g9 could not be saved by a retry
    fleet = stack.fleet(gpus=2, service_time="fixed:0.05")
    endpoints = f"{fleet.gpu_endpoints()},g9={fleet.control_url}/no-such-gpu"
    ids = push_jobs(stack.rds, stack.queues[0], 40)
    d = stack.dispatcher(
        fleet, GPU_ENDPOINTS=endpoints, MAX_ATTEMPTS="1", GPU_FAILURE_THRESHOLD="2", GPU_PROBE_SECONDS="30"
    )
    # THEN every job finishes on g0/g1: none failed
    wait_final(stack.engine, ids, timeout=60, final=("finished", "failed"))
    assert states(stack.engine, ids) == {"finished": 40}
    with stack.engine.connect() as conn:
        g9 = conn.execute(text("SELECT healthy, last_error FROM gpus WHERE gpu_id = 'g9'")).one()
        refused = conn.execute(
            text("SELECT COUNT(*) FROM attempts WHERE outcome = 'gpu_refused' AND gpu_id = 'g9'")
        ).scalar_one()
    # g9 is out of rotation with an error that says the status once; the jobs it refused used no attempt
    assert not g9.healthy
    assert g9.last_error == "GPU answered 404: Not Found"
    assert refused >= 2
    lines = [json.loads(line) for line in d.log_path.read_text().splitlines() if line.startswith("{")]
    assert any(r.get("action") == "gpu_refused" and r.get("gpu_id") == "g9" for r in lines)
    assert any(r.get("action") == "gpu_down" and r.get("gpu_id") == "g9" for r in lines)
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)
