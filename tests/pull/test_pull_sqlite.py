"""Pull GPUs in embedded mode (SQLite): a pushed and a pull GPU share the backlog, each job runs once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dispatcher.harness import push_jobs, received_per_task, reconcile, wait_final
from tests.dispatcher.helpers import wait_for
from tests.pull.conftest import add_pull


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    (tmp_path / ".gpuq").mkdir()
    return f"sqlite:///{tmp_path}/.gpuq/gpuq.db"


@pytest.mark.slow  # 4 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_pull_and_pushed_gpus_share_a_backlog_on_sqlite(stack):
    token = add_pull(stack.engine, "p0")
    pushed = stack.fleet(gpus=1, service_time="exp:0.01")
    d = stack.dispatcher(pushed)
    agent = stack.fleet(pull=d.url, agents={"p0": token}, service_time="exp:0.01")
    ids = push_jobs(stack.rds, stack.queues[0], 200)
    wait_final(stack.engine, ids, timeout=120)
    runs = received_per_task(pushed.stats()) + received_per_task(agent.stats())
    assert set(runs) == set(ids) and max(runs.values()) == 1
    wait_for(lambda: agent.stats(jobs=False)["totals"]["received"] > 0, 5, 0.1, what="p0 ran jobs")
    for fleet in (pushed, agent):
        assert fleet.stats(jobs=False)["totals"]["oversubscriptions"] == 0
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)
