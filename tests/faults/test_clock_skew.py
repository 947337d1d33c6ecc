"""Two dispatcher processes whose clocks disagree by 30 s (one runs under libfaketime), sharing one database.

Leases are written by the process that claims a slot and expired by whichever process looks first, so a
clock 30 s ahead expires the other's leases 30 s early, and a clock 30 s behind writes leases that end 30 s
early for everyone else. Jobs here take 4 s against a 20 s lease: a lease judged on two clocks 30 s apart
has ended before the job starts, while on one clock the job has 16 s of slack (a loaded machine's delays
in sending, calling back and committing must not pass for an expiry: 1.5 s of slack once did). Leases must
hold: no attempt expires, no job runs twice. (Found: both failed before dispatchers took their ``now`` from
the database's clock, dispatcher/db/clock.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dispatcher.harness import push_jobs, received_per_task, reconcile, wait_final

LIBFAKETIME = next(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"), None)

pytestmark = [
    pytest.mark.skipif(
        LIBFAKETIME is None,
        reason="libfaketime is not installed (Debian package faketime; infra/ensure-services.sh installs it)",
    ),
    pytest.mark.slow,
]


def _faketime(skew: str | None) -> dict[str, str]:
    if skew is None:
        return {}
    return {"FAKETIME": skew, "FAKETIME_DONT_FAKE_MONOTONIC": "1", "LD_PRELOAD": str(LIBFAKETIME)}


@pytest.mark.parametrize(
    ("claimer_skew", "judge_skew"),
    [(None, "+30s"), ("-30s", None)],
    ids=["judge-30s-ahead", "claimer-30s-behind"],
)
def test_leases_hold_across_dispatchers_with_skewed_clocks(stack, claimer_skew, judge_skew):
    # GIVEN a "judge" dispatcher that takes no jobs (its queue stays empty) but expires leases like any other,
    # 30 s ahead of the "claimer" that places every job; 8 jobs of 4 s on 2 GPUs x 4 slots, a 20 s lease
    fleet = stack.fleet(gpus=2, service_time="fixed:4")
    common = {"TASK_TIMEOUT_SECONDS": "20", "MAX_ATTEMPTS": "3"}
    stack.process(fleet, name="judge", TASK_QUEUES=f"idle-{stack.prefix}", **common, **_faketime(judge_skew))
    claimer = stack.process(fleet, name="claimer", **common, **_faketime(claimer_skew))
    ids = push_jobs(stack.rds, stack.queues[0], 8)
    # THEN no lease expires: every job finished on its first attempt, placed by the claimer, and ran once
    wait_final(stack.engine, ids, timeout=60, final=("finished", "failed"))
    with stack.engine.connect() as conn:
        outcomes = dict(conn.exec_driver_sql("SELECT outcome, COUNT(*) FROM attempts GROUP BY outcome").all())
        by = {r[0] for r in conn.exec_driver_sql("SELECT DISTINCT dispatcher_id FROM tasks")}
    assert outcomes == {"finished": 8}, outcomes
    assert by == {claimer.env["DISPATCHER_ID"]}
    assert max(received_per_task(fleet.stats()).values()) == 1
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)
    # and the skewed process said how far off its clock is
    skewed = stack.procs[0] if judge_skew else claimer
    assert '"action": "clock"' in skewed.log_path.read_text()
