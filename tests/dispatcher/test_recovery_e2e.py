"""After a kill -9, the next dispatcher to start on the machine gives back at once the jobs the dead one had
recorded but never sent (``dispatcher/loop/recovery.py``, by the dead one's journal of sent requests).

Before: each standby of the dead dispatcher held its slot for the whole lease once its slot's job ended, and
then used an attempt (an outside trial: 3 of 12 slots idle for 15 minutes after a kill -9). Here the lease is
two minutes and every job must have finished well before it: a test that waited for leases would time out.
"""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import text

from dispatcher import sent_journal
from tests.dispatcher.harness import (
    DispatcherProc,
    push_jobs,
    received_per_task,
    reconcile,
    wait_final,
    wait_swept,
)
from tests.dispatcher.helpers import wait_for

LEASE = "120"


def _standbys_bound(engine, n: int) -> bool:
    with engine.connect() as conn:
        bound = conn.execute(text("SELECT COUNT(*) FROM slots WHERE next_task_id IS NOT NULL")).scalar_one()
        held = conn.execute(text("SELECT COUNT(*) FROM slots WHERE task_id IS NOT NULL")).scalar_one()
    return bound == n and held == n


def _given_back(proc: DispatcherProc) -> list[dict]:
    lines = []
    for line in proc.log_path.read_text(errors="replace").splitlines():
        if '"action": "recovery"' in line or '"action":"recovery"' in line:
            lines.append(json.loads(line))
    return lines


def _run(stack, *, same_id: bool) -> None:
    # GIVEN 2 GPUs x 4 slots running 8 s jobs (long enough that no standby is sent before the kill, on a busy
    # machine too), and a standby bound on every slot
    fleet = stack.fleet(gpus=2, service_time="fixed:8")
    ids = push_jobs(stack.rds, stack.queues[0], 16)
    extra = {"TASK_TIMEOUT_SECONDS": LEASE, "STANDBY_JOBS": "true"}
    if same_id:
        extra["DISPATCHER_ID"] = "worker"
    first = stack.process(fleet, name="first", **extra)
    wait_for(lambda: _standbys_bound(stack.engine, 8), timeout=30, what="8 jobs running and 8 standbys bound")
    # WHEN it is killed while every standby is still unsent, and a dispatcher starts again on this machine
    # (the same working directory, the same port for the callbacks to come): systemd's restart
    first.kill()
    started = time.monotonic()
    if same_id:
        heir = first
        heir.start()
    else:
        env = dict(first.env)
        env.pop("DISPATCHER_ID")
        heir = DispatcherProc(env, name="heir", workdir=first.log_path.parent)
        stack.procs.append(heir)
        heir.start()
    # THEN the 8 standbys were given back at start, every job finishes long before the lease, each sent once
    wait_final(stack.engine, ids, timeout=60)
    assert time.monotonic() - started < float(LEASE) / 2
    said = _given_back(heir)
    assert [s.get("standbys_unbound") for s in said] == [8], said
    per_task = received_per_task(fleet.stats())
    assert set(per_task) == set(ids)
    assert [t for t, n in per_task.items() if n != 1] == []
    assert fleet.stats()["totals"]["oversubscriptions"] == 0
    # the killed life's processing list (the restart's own, under the same id) may still hold copies of
    # finished jobs until the next reconcile of strays (every 5 s) drops them as known: a fresh-clone CI run
    # found 2 there right after the last job ended
    wait_swept(stack.rds, stack.prefix, stack.queues)
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)
    with stack.engine.connect() as conn:  # no attempt was used by the give-back
        attempts = conn.execute(text("SELECT MAX(attempt) FROM tasks")).scalar_one()
    assert attempts == 1


@pytest.mark.slow
def test_a_restart_under_the_same_id_gives_back_the_standbys_it_never_sent(stack):
    _run(stack, same_id=True)


@pytest.mark.slow
def test_a_new_dispatcher_on_the_machine_gives_back_a_dead_ones_unsent_standbys(stack):
    _run(stack, same_id=False)


def test_the_journal_is_rewritten_as_it_grows_and_keeps_what_still_runs(stack, monkeypatch):
    # GIVEN a journal rewritten every 5 requests (20,000 in production), and jobs of two lengths: 30 short
    # ones, and 2 that run on through every rewrite
    monkeypatch.setattr(sent_journal, "ROTATE_ENTRIES", 5)
    fleet = stack.fleet(gpus=1, service_time="fixed:0.02")
    slow = stack.fleet(gpus=1, service_time="fixed:60")
    d = stack.dispatcher(
        fleet,
        STANDBY_JOBS="false",
        GPU_ENDPOINTS=f"{fleet.gpu_endpoints()},slow:s0={slow.url('g0')}",
        TASK_ROUTES="long=slow",
    )
    longs = push_jobs(stack.rds, stack.queues[0], 2, task_type="long")
    wait_for(lambda: len(received_per_task(slow.stats())) == 2, timeout=30, what="2 long jobs running")
    shorts = push_jobs(stack.rds, stack.queues[0], 30)
    # WHEN they run
    wait_final(stack.engine, shorts, timeout=60)
    # THEN the log was rewritten (no half-done rewrite left) and still lists the long jobs, which still run
    journal = d.dispatcher.rt.journal
    assert journal.dir is not None and journal.life is not None
    folder, me = journal.dir, journal.life.instance
    wait_for(lambda: not (folder / f"{me}.next.log").exists(), timeout=10, what="the rewrite done")
    lines = [json.loads(line) for line in (folder / f"{me}.log").read_text().splitlines()]
    assert len(lines) < 32, lines  # rewritten: not every request since the start
    assert {t for t, _ in lines} >= set(longs)
