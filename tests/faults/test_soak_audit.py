"""A test of the soak's test: its audit fails a run whose GPU got more jobs than slots, naming the GPU and the
tasks, and tells a placement error from a GPU that outlived a lease.

A real simulated GPU (4 slots, long jobs so all are still at work) and a real database hold the state a
broken dispatcher would leave; the audit is the one ``make soak`` and tests/faults/test_soak.py run.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, insert

from bench.soak_audit import overlap_report, problems
from dispatcher.db.engine import utcnow
from dispatcher.db.schema import tasks
from dispatcher.states import Outcome, TaskState
from producer.job import Job
from simgpu.fleet import SimFleet
from tests.dispatcher.helpers import end_attempt, fleet_engine, job, place

CLEAN = {
    "lost": 0,
    "duplicates_beyond_attempts": 0,
    "same_attempt_delivered_twice": 0,
    "slot_drift_end": 0,
    "slot_drift_samples": 0,
    "dead_letters": 0,
}


@pytest.fixture
def gpu() -> Iterator[SimFleet]:
    fleet = SimFleet(gpus=1, slots=4, service_time="fixed:30", seed=1).start()
    yield fleet
    fleet.stop()


def _place(engine: Engine, jobs: list[Job], lease: float = 60.0) -> list[Any]:
    now = utcnow() - timedelta(seconds=lease + 1) if lease == 0 else utcnow()
    return list(place(engine, jobs, dispatcher_id="d1", max_attempts=3, now=now, lease_seconds=lease).placed)


def _send(fleet: SimFleet, j: Job, attempt: int = 1) -> None:
    body = {
        "task_id": j.task_id,
        "type": j.type,
        "data": {},
        "attempt": attempt,
        "callback_url": "http://127.0.0.1:9/callback",
        "callback_token": "t",
    }
    assert httpx.post(fleet.url("g0"), json=body, timeout=5).status_code == 202


def _audit(engine: Engine, fleet: SimFleet) -> dict[str, Any]:
    with engine.connect() as conn:
        return CLEAN | overlap_report(conn, fleet.stats())


def test_a_placement_without_a_slot_claim_fails_the_soak(database_url, gpu):
    # GIVEN four jobs holding g0's four slots, on the GPU
    engine = fleet_engine(database_url, {"g0": 4})
    holders = [job() for _ in range(4)]
    assert len(_place(engine, holders)) == 4
    for j in holders:
        _send(gpu, j)
    # WHEN a broken dispatcher records a fifth as running on g0/0 without claiming the slot, and sends it
    fifth = job()
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            insert(tasks).values(
                task_id=fifth.task_id,
                queue="q",
                type=fifth.type,
                state=TaskState.PROCESSING.value,
                gpu_id="g0",
                slot_index=0,
                attempt=1,
                data="{}",
                max_attempts=3,
                dispatcher_id="broken",
                created_at=now,
                started_at=now,
                updated_at=now,
            )
        )
    _send(gpu, fifth)
    # THEN the audit counts a placement error and the run fails with a line naming the GPU and all five tasks
    report = _audit(engine, gpu)
    assert (report["oversubscriptions"], report["oversubscribed_after_lease_expiry"]) == (1, 0)
    [line] = problems(report)
    assert line.startswith("oversubscriptions: g0 ")
    assert all(j.task_id in line for j in [fifth, *holders])
    assert problems(CLEAN | {**report, "overlaps": []})  # simgpu's count alone still fails the run


def test_a_gpu_still_working_after_its_lease_ran_out_is_counted_apart(database_url, gpu):
    # GIVEN four jobs on g0, one of whose leases has run out while the GPU still works on it
    engine = fleet_engine(database_url, {"g0": 4})
    stale = job()
    [expired] = _place(engine, [stale], lease=0)
    others = [job() for _ in range(3)]
    assert len(_place(engine, others)) == 3
    for j in [stale, *others]:
        _send(gpu, j)
    fin = end_attempt(engine, stale.task_id, expired.attempt, Outcome.EXPIRED)
    assert fin.code == "applied"
    # WHEN the freed slot goes to the next job, which reaches the GPU
    nxt = job()
    assert len(_place(engine, [nxt])) == 1
    _send(gpu, nxt)
    # THEN it is counted as the lease's doing, not as a placement error, and still named
    report = _audit(engine, gpu)
    assert (report["oversubscriptions"], report["oversubscribed_after_lease_expiry"]) == (0, 1)
    [line] = problems(report)
    assert line.startswith("oversubscribed_after_lease_expiry: g0 ")
    assert stale.task_id in line and "lease_expired" in line and nxt.task_id in line
