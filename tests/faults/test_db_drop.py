"""The dispatcher's MariaDB connections killed under it (``KILL <id>``), many times, mid-transaction.

The shared server is fine: the test's database is its own, and only connections using it are killed. The
test's own engine is disposed of while the killer runs, so every connection on that database is the
dispatcher's. tests/dispatcher/test_e2e_restarts.py restarts the whole server; this is the finer fault: one
connection gone between two statements of a claim, a group commit or a lease expiry, or during COMMIT.
"""

from __future__ import annotations

import threading
import time

import pymysql
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import MYSQL_HOST, MYSQL_PASSWORD, MYSQL_PORT, MYSQL_USER
from tests.dispatcher.harness import push_jobs, received_per_task, reconcile, states, wait_final, wait_swept
from tests.faults.support import ran_beyond_attempts

pytestmark = pytest.mark.slow  # database connections killed mid-transaction, for a whole run

KILL_SECONDS = 6.0


def _killer(db: str, stop: threading.Event, tally: dict[str, int]) -> None:
    admin = pymysql.connect(
        host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, password=MYSQL_PASSWORD, autocommit=True
    )
    try:
        with admin.cursor() as cur:
            while not stop.is_set():
                cur.execute(
                    "SELECT p.ID, p.COMMAND, t.trx_id IS NOT NULL FROM information_schema.PROCESSLIST p"
                    " LEFT JOIN information_schema.INNODB_TRX t ON t.trx_mysql_thread_id = p.ID"
                    " WHERE p.DB = %s AND p.ID <> CONNECTION_ID()",
                    (db,),
                )
                for conn_id, command, in_trx in cur.fetchall():
                    try:
                        cur.execute(f"KILL CONNECTION {int(conn_id)}")
                    except pymysql.err.OperationalError:  # it ended by itself meanwhile
                        continue
                    tally["killed"] += 1
                    tally["in_query"] += command == "Query"
                    tally["in_transaction"] += bool(in_trx)
                time.sleep(0.03)
    finally:
        admin.close()


def test_connections_killed_mid_transaction_lose_nothing(stack):
    # GIVEN 600 short jobs running on 4 GPUs x 4 slots
    fleet = stack.fleet(gpus=4, service_time="exp:0.15")
    ids = push_jobs(stack.rds, stack.queues[0], 300) + push_jobs(stack.rds, stack.queues[1], 300)
    d = stack.process(fleet, TASK_TIMEOUT_SECONDS="3", MAX_ATTEMPTS="20")
    fleet.wait_until(lambda s: s["totals"]["received"] > 20, 20)
    # WHEN for six seconds every connection the dispatcher has open on its database is killed, ~30 times a s
    finished_before = states(stack.engine, ids)["finished"]
    stack.engine.dispose()
    db = make_url(stack.database_url).database
    stop, tally = threading.Event(), {"killed": 0, "in_query": 0, "in_transaction": 0}
    killer = threading.Thread(target=_killer, args=(db, stop, tally), daemon=True)
    killer.start()
    time.sleep(KILL_SECONDS)
    stop.set()
    killer.join(10)
    assert tally["killed"] > 10, tally
    # THEN the process is still up, and every job finishes exactly once in the database
    assert d.proc is not None and d.proc.poll() is None, d.logs()
    wait_final(stack.engine, ids, timeout=120)
    wait_swept(stack.rds, stack.prefix, stack.queues)
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)
    stats = fleet.stats()
    assert set(received_per_task(stats)) == set(ids)
    assert ran_beyond_attempts(stack.engine, stats) == {}
    assert stats["totals"]["oversubscriptions"] == 0
    print(tally, finished_before)
