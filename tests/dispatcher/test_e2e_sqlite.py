"""Embedded mode's own behaviour: with no database configured, a real ``python -m dispatcher`` keeps its state
in ``./.gpuq/gpuq.db`` of its working directory.

This module overrides ``database_url``, so the ``stack`` fixture (and the test's own engine) read that file.
The core scenarios (backlog, kill -9, SIGTERM, lost callbacks, callbacks freeing slots) run on SQLite too,
where they are written: they take ``any_stack`` (tests/dispatcher/conftest.py), MariaDB and SQLite in turn.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dispatcher.harness import (
    DispatcherProc,
    push_jobs,
    received_per_task,
    reconcile,
    wait_final,
)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def database_url(workdir: Path) -> str:
    """The file embedded mode creates when started in ``workdir`` (``sqlite:///.gpuq/gpuq.db``)."""
    return f"sqlite:///{workdir}/.gpuq/gpuq.db"


@pytest.mark.slow
def test_no_database_configured_means_embedded_sqlite(stack, workdir):
    # GIVEN neither DATABASE_URL nor DB_HOST (empty counts as unset) and 200 jobs
    fleet = stack.fleet(gpus=2, service_time="exp:0.01")
    ids = push_jobs(stack.rds, stack.queues[0], 200)
    env = stack.env(fleet, DATABASE_URL="", DB_HOST="")
    d = DispatcherProc(env, name="embedded", workdir=workdir)
    stack.procs.append(d)
    # WHEN the dispatcher starts in workdir
    d.start()
    # THEN it says so once, keeps its state in ./.gpuq/gpuq.db, and runs every job once
    wait_final(stack.engine, ids, timeout=60)
    assert (workdir / ".gpuq" / "gpuq.db").is_file()
    assert d.log_path.read_text().count("no DATABASE_URL or DB_HOST: embedded mode on SQLite") == 1
    assert max(received_per_task(fleet.stats()).values()) == 1
    assert d.term() == 0
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)
