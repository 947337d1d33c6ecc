"""Redis and MariaDB restarted under a running dispatcher (private servers on spare ports)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import text

from dispatcher.db.engine import make_engine
from tests.dispatcher.harness import push_jobs, received_per_task, reconcile, states, wait_final
from tests.dispatcher.helpers import wait_for
from tests.dispatcher.private_servers import PrivateMariaDB, PrivateRedis


@pytest.mark.slow
def test_redis_restart_mid_run_loses_nothing(stack):
    # GIVEN a dispatcher on a private Redis (AOF, fsync always) with 300 jobs running on 2 GPUs
    private = PrivateRedis()
    private.start()
    try:
        rds = redis.Redis.from_url(private.url)
        fleet = stack.fleet(gpus=2, service_time="fixed:0.03")
        ids = push_jobs(rds, stack.queues[0], 300)
        stack.process(fleet, REDIS_URL=private.url)
        wait_for(lambda: states(stack.engine, ids)["finished"] > 30, 30, 0.02, what="some finished")
        # WHEN Redis stops for a second and comes back
        private.stop()
        time.sleep(1.0)
        private.start()
        # THEN the dispatcher reconnects and every job finishes exactly once
        wait_final(stack.engine, ids, timeout=120)
        assert max(received_per_task(fleet.stats()).values()) == 1
        reconcile(stack.engine, rds, stack.prefix, stack.queues, ids)
        rds.close()
    finally:
        private.close()


@pytest.mark.slow
def test_mariadb_restart_mid_run_loses_nothing(stack):
    # GIVEN a dispatcher on a private MariaDB with 300 jobs running on 2 GPUs, and a temporary table file of
    # the machine's shared server in /tmp (where a server's start deletes every #sql* file of its tmpdir)
    canary = Path(tempfile.gettempdir()) / f"#sql-temptable-gpuq-canary-{os.getpid()}.MAI"
    canary.touch()
    private = PrivateMariaDB()
    private.start()
    engine = make_engine(private.url, pool_size=2)
    try:
        fleet = stack.fleet(gpus=2, service_time="fixed:0.03")
        ids = push_jobs(stack.rds, stack.queues[0], 300)
        d = stack.process(fleet, DATABASE_URL=private.url, TASK_TIMEOUT_SECONDS="5")
        wait_for(lambda: states(engine, ids)["finished"] > 30, 30, 0.02, what="some finished")
        # WHEN the database goes away for a second and comes back
        private.stop()
        time.sleep(1.0)
        private.start()
        # THEN the dispatcher reconnects, callbacks that got 503 are retried by the GPUs, all jobs finish
        wait_final(engine, ids, timeout=120)
        per_task = received_per_task(fleet.stats())
        assert set(per_task) == set(ids)
        reconcile(engine, stack.rds, stack.prefix, stack.queues, ids)
        assert d.proc is not None
        assert d.proc.poll() is None
        with engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM tasks")).scalar_one() == 300
        # AND the private server's two starts left the shared server's temporary tables alone (they did not:
        # another test's query failed with "Error on delete of '/tmp/#sql-temptable-…' (Errcode: 2)")
        assert canary.exists(), f"a private MariaDB's start deleted {canary}"
    finally:
        canary.unlink(missing_ok=True)
        engine.dispose()
        private.close()
