"""``gpuq task retry --state failed [--since …] [--gpu …] [--dry-run]``: bulk recovery after an incident
(issue 14: recovering from a misconfigured GPU meant one ``gpuq task retry`` per task)."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from dispatcher.states import Outcome
from tests.dispatcher.helpers import end_attempt
from tests.operators.test_cli import run_one, stores  # noqa: F401 - the fixture, shared


def _fail(engine, queue: str, pool: str = "default") -> str:
    job = run_one(engine, queue, pool)
    fin = end_attempt(engine, job.task_id, outcome=Outcome.FAILED, error="GPU answered 400: bad input")
    assert fin.state == "failed"
    return job.task_id


def _states(engine, ids) -> list[str]:
    with engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT task_id, state FROM tasks")).all())
    return [rows[i] for i in ids]


@pytest.mark.slow  # 6 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_retry_by_filters_with_a_dry_run(stores, gpuq, gpuq_env):  # noqa: F811
    engine, _ = stores
    queue = gpuq_env["TASK_QUEUES"].split(",")[0]
    on_g0 = [_fail(engine, queue) for _ in range(3)]  # the default pool is g0 alone
    on_g1 = [_fail(engine, queue, "embed") for _ in range(2)]
    # a dry run lists exactly the matching tasks and changes nothing
    dry = gpuq("task", "retry", "--state", "failed", "--gpu", "g0", "--since", "1h", "--dry-run")
    assert dry.exit_code == 0, dry
    assert sorted(dry.stdout.split()) == sorted(on_g0)
    assert "3 task(s) would be retried" in dry.stderr
    assert _states(engine, on_g0 + on_g1) == ["failed"] * 5
    # the real run retries them, and only them
    res = gpuq("task", "retry", "--state", "failed", "--gpu", "g0")
    assert res.exit_code == 0 and "3 task(s) retrying" in res.stdout, res
    assert _states(engine, on_g0) == ["retrying"] * 3 and _states(engine, on_g1) == ["failed"] * 2
    # --since in the future selects nothing; bad filters exit 2
    assert (
        "0 task(s)" in gpuq("task", "retry", "--state", "failed", "--since", "2999-01-01", "--dry-run").stderr
    )
    for args in (
        ("task", "retry"),
        ("task", "retry", "--state", "processing"),
        ("task", "retry", "--state", "failed", "--since", "yesterday"),
        ("task", "retry", on_g1[0], "--state", "failed"),
    ):
        assert gpuq(*args).exit_code == 2, args
