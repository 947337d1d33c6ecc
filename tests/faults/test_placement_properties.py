"""Placement as a state machine against the real MariaDB: hypothesis interleaves claims by several simulated
dispatchers, callbacks, lease expiries, retries coming back, drains and re-activations, and after every step
checks the database against a model.

Properties: a GPU never holds more tasks than slots, the slot table agrees with the tasks (no drift), a claim
that left a job unplaced left no free eligible slot in its pool (no false "full"), each job went to a least
loaded GPU of its pool, and a draining GPU gets no new claim. Concurrency proper (several processes racing
for one slot) is tests/dispatcher/test_claims_concurrent.py; this explores the orders of operations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import Engine, text

from dispatcher.db.attempts import Backoff, expired_leases, extend_lease, finish_attempt, slot_drift
from dispatcher.db.deferred import due_deferred, mark_queued
from dispatcher.db.dispatch import dispatch
from dispatcher.db.engine import init_schema, make_engine, transaction, utcnow
from dispatcher.db.gpus import register_gpu, set_gpu_state
from dispatcher.states import GpuState, Outcome
from producer.job import Job
from tests.conftest import scaled

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]  # slow: a Hypothesis state machine against MariaDB: minutes

GPUS = {"g0": ("default", 2), "g1": ("default", 3), "g2": ("default", 1), "g3": ("other", 2)}
POOLS = ("default", "other")
DISPATCHERS = ("d1", "d2", "d3")
LEASE = 10.0
MAX_ATTEMPTS = 3
NO_BACKOFF = Backoff(base=0.0, cap=0.0)


@dataclass
class Running:
    gpu_id: str
    slot_index: int
    attempt: int
    lease_until: object


class Placement(RuleBasedStateMachine):
    engine: Engine  # set by the test, one database for all examples (emptied at each start)

    def __init__(self) -> None:
        super().__init__()
        with self.engine.begin() as conn:
            for table in ("attempts", "slots", "tasks", "gpus"):
                conn.execute(text(f"DELETE FROM {table}"))
        self.now = utcnow()
        for gpu_id, (pool, n) in GPUS.items():
            self._tx(
                register_gpu, gpu_id=gpu_id, url=f"http://x/{gpu_id}", pool=pool, slot_count=n, now=self.now
            )
        self.active = dict.fromkeys(GPUS, True)
        self.waiting: list[tuple[Job, str]] = []
        self.running: dict[str, Running] = {}
        self.ended: list[tuple[str, int]] = []  # (task, attempt) no longer current
        self.rng = random.Random(0)
        # Ids from a counter, not uuid4: rules draw from sorted(self.running), and an example must make the
        # same choices each time hypothesis replays it (random ids made it FlakyStrategyDefinition).
        self.arrived = 0

    def _tx(self, fn, **kw):
        return transaction(self.engine, fn, **kw)

    def _busy(self, gpu_id: str) -> int:
        return sum(1 for r in self.running.values() if r.gpu_id == gpu_id)

    def _free(self, pool: str) -> dict[str, int]:
        """Free slots of each eligible GPU of ``pool``, as the model has them."""
        return {
            g: n - self._busy(g)
            for g, (p, n) in GPUS.items()
            if p == pool and self.active[g] and n - self._busy(g) > 0
        }

    # -- rules -------------------------------------------------------------------------------------------

    @rule(n=st.integers(1, 4), pool=st.sampled_from(POOLS))
    def arrive(self, n: int, pool: str) -> None:
        for _ in range(n):
            self.arrived += 1
            self.waiting.append((Job(task_id=f"t{self.arrived:04d}", type="t", queue="q"), pool))

    @precondition(lambda self: self.waiting)
    @rule(dispatcher=st.sampled_from(DISPATCHERS), k=st.integers(1, 6))
    def claim(self, dispatcher: str, k: int) -> None:
        batch, self.waiting = self.waiting[:k], self.waiting[k:]
        res = self._tx(
            dispatch,
            items=batch,
            dispatcher_id=dispatcher,
            lease_seconds=LEASE,
            max_attempts=MAX_ATTEMPTS,
            now=self.now,
            check_existing=True,
            rng=self.rng,
        )
        assert not res.dropped and not res.mine and not res.deferred
        for p in res.placed:
            free = self._free(p.pool)
            # only an active GPU of the job's pool, one of the least loaded among those with room
            assert p.gpu_id in free, (p.gpu_id, p.pool, free, self.active)
            least = min(self._busy(g) for g in free)
            assert self._busy(p.gpu_id) == least, (p.gpu_id, {g: self._busy(g) for g in free})
            assert p.attempt == p.job.attempt + 1
            self.running[p.job.task_id] = Running(
                p.gpu_id, p.slot_index, p.attempt, self.now + timedelta(seconds=LEASE)
            )
        for job, pool in res.unplaced:
            assert self._free(pool) == {}, f"false full: {job.task_id} unplaced, free {self._free(pool)}"
        self.waiting = list(res.unplaced) + self.waiting

    @precondition(lambda self: self.running)
    @rule(data=st.data(), outcome=st.sampled_from([Outcome.FINISHED, Outcome.FAILED, Outcome.FAILED_RETRY]))
    def callback(self, data: st.DataObject, outcome: Outcome) -> None:
        task_id = data.draw(st.sampled_from(sorted(self.running)))
        r = self.running.pop(task_id)
        fin = self._tx(
            finish_attempt,
            task_id=task_id,
            attempt=r.attempt,
            outcome=outcome,
            now=self.now,
            backoff=NO_BACKOFF,
            reported=outcome.value,
        )
        assert (fin.code, fin.freed) == ("applied", True)
        self.ended.append((task_id, r.attempt))

    @precondition(lambda self: self.ended)
    @rule(data=st.data(), outcome=st.sampled_from([Outcome.FINISHED, Outcome.FAILED, Outcome.EXPIRED]))
    def late_callback(self, data: st.DataObject, outcome: Outcome) -> None:
        task_id, attempt = data.draw(st.sampled_from(self.ended))
        fin = self._tx(
            finish_attempt,
            task_id=task_id,
            attempt=attempt,
            outcome=outcome,
            now=self.now,
            backoff=NO_BACKOFF,
        )
        assert fin.code == "stale" and not fin.freed

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(sorted(self.running)))
        r = self.running[task_id]
        fin = self._tx(extend_lease, task_id=task_id, attempt=r.attempt, lease_seconds=LEASE, now=self.now)
        assert fin.code == "applied"
        r.lease_until = self.now + timedelta(seconds=LEASE)

    @rule(seconds=st.sampled_from([0.5, 4.0, 11.0]))
    def time_passes_and_leases_expire(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        expired = self._tx(expired_leases, now=self.now)
        want = {t for t, r in self.running.items() if r.lease_until < self.now}
        assert {t for t, _ in expired} == want
        for task_id, attempt in sorted(expired):  # the database's row order is not part of the example
            fin = self._tx(
                finish_attempt,
                task_id=task_id,
                attempt=attempt,
                outcome=Outcome.EXPIRED,
                now=self.now,
                backoff=NO_BACKOFF,
            )
            assert (fin.code, fin.freed) == ("applied", True)
            del self.running[task_id]
            self.ended.append((task_id, attempt))

    @rule()
    def retries_come_back(self) -> None:
        due = sorted(self._tx(due_deferred, now=self.now), key=lambda job: job.task_id)
        self._tx(mark_queued, jobs=due, now=self.now)
        with self.engine.connect() as conn:
            pool_of = dict(conn.execute(text("SELECT task_id, pool FROM tasks")).all())
        self.waiting += [(job, pool_of[job.task_id]) for job in due]

    @rule(gpu_id=st.sampled_from(sorted(GPUS)), active=st.booleans())
    def drain_or_activate(self, gpu_id: str, active: bool) -> None:
        state = GpuState.ACTIVE if active else GpuState.DRAINING
        assert self._tx(set_gpu_state, gpu_id=gpu_id, state=state, now=self.now)
        self.active[gpu_id] = active

    # -- invariants --------------------------------------------------------------------------------------

    @invariant()
    def database_agrees_with_the_model(self) -> None:
        with self.engine.connect() as conn:
            assert slot_drift(conn) == []
            busy = dict(conn.execute(text("SELECT gpu_id, COUNT(task_id) FROM slots GROUP BY gpu_id")).all())
            for gpu_id, (_, n) in GPUS.items():
                assert 0 <= busy.get(gpu_id, 0) <= n
                assert busy.get(gpu_id, 0) == self._busy(gpu_id)
            held = {
                r[0]: (r[1], r[2], r[3])
                for r in conn.execute(
                    text("SELECT task_id, gpu_id, slot_index, attempt FROM slots WHERE task_id IS NOT NULL")
                )
            }
            processing = set(
                conn.execute(text("SELECT task_id FROM tasks WHERE state = 'processing'")).scalars()
            )
        assert held == {t: (r.gpu_id, r.slot_index, r.attempt) for t, r in self.running.items()}
        assert processing == set(self.running)


def test_placement_state_machine(database_url):
    engine = make_engine(database_url, pool_size=2)
    init_schema(engine)
    Placement.engine = engine
    try:
        run_state_machine_as_test(
            Placement,
            settings=settings(
                max_examples=scaled(40),
                stateful_step_count=25,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    finally:
        engine.dispose()
