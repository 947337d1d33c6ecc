"""The scenario both wrong-URL tests start from: a GPU g9 registered where the simulator refuses jobs, beside
two working GPUs (test_misconfigured_gpu: a path answering 404; test_refusing_gpu_probe: a page answering
GET but not POST)."""

from __future__ import annotations

import json
from typing import Any

from tests.dispatcher.conftest import Stack
from tests.dispatcher.harness import InProcess, push_jobs, states, wait_final

# The error of a standby job bound to g9 and promoted after g9 left rotation: given back unsent (outcome
# gpu_refused, no attempt used), and not an answer of g9's (dispatcher/loop/standbys.py, Standbys._refund)
STANDBY_GIVEN_BACK = "GPU g9 left rotation before this standby job was sent to it"


def beside_a_wrong_g9(
    stack: Stack, path: str, jobs: int, service_time: str, timeout: float
) -> tuple[InProcess, list[str]]:
    """g0 and g1 working, g9 at ``path`` of the simulator; ``jobs`` jobs of one attempt each (a job failed by
    g9 could not be saved by a retry), g9 out of rotation after 2 failures and probed every 0.2 s. Returns
    once every job has ended, having asserted that all finished; the dispatcher and the jobs' ids."""
    fleet = stack.fleet(gpus=2, service_time=service_time)
    endpoints = f"{fleet.gpu_endpoints()},g9={fleet.control_url}{path}"
    ids = push_jobs(stack.rds, stack.queues[0], jobs)
    d = stack.dispatcher(
        fleet, GPU_ENDPOINTS=endpoints, MAX_ATTEMPTS="1", GPU_FAILURE_THRESHOLD="2", GPU_PROBE_SECONDS="0.2"
    )
    wait_final(stack.engine, ids, timeout=timeout, final=("finished", "failed"))
    assert states(stack.engine, ids) == {"finished": jobs}
    return d, ids


def log_records(d: InProcess) -> list[dict[str, Any]]:
    """The dispatcher's JSON log lines."""
    return [json.loads(line) for line in d.log_path.read_text().splitlines() if line.startswith("{")]
