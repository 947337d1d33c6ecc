"""Running real dispatcher processes (``python -m dispatcher``) against the real stores and a simulated fleet.

Each process gets its own port and log file; ``kill()`` is a real SIGKILL. ``reconcile`` is the end-of-test
audit every scenario runs: every task ended, the slot table agrees with the tasks, Redis holds nothing.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine, bindparam, text
from sqlalchemy.exc import OperationalError

from dispatcher import testing
from dispatcher.db.attempts import slot_drift
from dispatcher.inproc import InProcessDispatcher
from dispatcher.states import TERMINAL
from dispatcher.testing import DispatcherProcess
from producer.job import Job
from producer.keys import Keys
from tests.dispatcher.helpers import wait_for

SECRET = "test-callback-secret-0123456789"
BEARER = "gpu-bearer-token"
ROOT = Path(__file__).resolve().parents[2]


free_port = testing.free_port  # the scenarios import it from here


#: A scenario's dispatcher settings under the test's own: the tests' callback secret and GPU token, JSON logs
#: at INFO.
DEFAULTS = {"CALLBACK_SECRET": SECRET, "BEARER_TOKEN": BEARER, "LOG_FORMAT": "json", "LOG_LEVEL": "INFO"}


class InProcess(InProcessDispatcher):
    """A scenario's dispatcher in this process (dispatcher/inproc.py), with the scenario defaults."""

    def __init__(self, env: dict[str, str], name: str = "d", workdir: Path | None = None) -> None:
        super().__init__(DEFAULTS | env, name=name, workdir=workdir)


class DispatcherProc(DispatcherProcess):
    """A scenario's dispatcher process (dispatcher/testing.py), with the scenario defaults; ``kill()`` is a
    real SIGKILL."""

    def __init__(self, env: dict[str, str], name: str = "d", workdir: Path | None = None) -> None:
        super().__init__(DEFAULTS | env, name=name, workdir=workdir)

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def push_jobs(
    rds: redis.Redis, queue: str, n: int, task_type: str = "start_transcribe", **data: Any
) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    pipe = rds.pipeline(transaction=False)
    for i, task_id in enumerate(ids):
        pipe.rpush(queue, Job(task_id=task_id, type=task_type, queue=queue, data={"i": i, **data}).to_redis())
    pipe.execute()
    return ids


def states(engine: Engine, ids: list[str] | None = None) -> Counter[str]:
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT task_id, state FROM tasks")).all()
    except OperationalError:  # the server restarted under a pooled connection (restart tests)
        engine.dispose()
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT task_id, state FROM tasks")).all()
    wanted = set(ids) if ids is not None else None
    return Counter(state for task_id, state in rows if wanted is None or task_id in wanted)


def wait_in_flight(engine: Engine, timeout: float = 20) -> int:
    """Until some task holds a slot, so a kill or SIGTERM sent next hits work in flight; returns how many."""
    return wait_for(lambda: states(engine)["processing"] or None, timeout, 0.01, what="jobs in flight")


def wait_final(
    engine: Engine, ids: list[str], timeout: float = 60.0, final: tuple[str, ...] = ("finished",)
) -> None:
    def done() -> bool:
        c = states(engine, ids)
        return sum(c[s] for s in final) == len(ids)

    def what() -> str:
        return f"all {len(ids)} tasks final; now {dict(states(engine, ids))}; {stuck(engine, ids, final)}"

    wait_for(done, timeout, 0.1, what=what)  # type: ignore[arg-type]


def stuck(engine: Engine, ids: list[str], final: tuple[str, ...] = ("finished",), most: int = 5) -> str:
    """The rows and attempt history of a few tasks not yet final: what a timed-out wait needs to be
    understood from a CI log alone (a flaky test is a bug, and its logs may be gone)."""
    wanted = set(ids)
    with engine.connect() as conn:
        rows = [
            r
            for r in conn.execute(
                text(
                    "SELECT task_id, state, attempt, dispatcher_id, gpu_id, slot_index, run_after,"
                    " fetched_attempt, updated_at FROM tasks WHERE state NOT IN :final"
                ).bindparams(bindparam("final", expanding=True)),
                {"final": list(final)},
            )
            if r.task_id in wanted
        ][:most]
        out = []
        for r in rows:
            history = conn.execute(
                text("SELECT * FROM attempts WHERE task_id = :t ORDER BY started_at"), {"t": r.task_id}
            ).all()
            slot = conn.execute(
                text("SELECT * FROM slots WHERE task_id = :t OR next_task_id = :t"), {"t": r.task_id}
            ).all()
            out.append(f"{tuple(r)} attempts={[tuple(h) for h in history]} slots={[tuple(s) for s in slot]}")
    return "not final: " + "; ".join(out)


def redis_leftovers(rds: redis.Redis, prefix: str, queues: list[str]) -> dict[str, int]:
    """Jobs still in the queues, processing lists, parked or set-aside lists."""
    leftovers = {q: rds.llen(q) for q in queues if rds.llen(q)}
    for kind in ("proc", "parked", "aside"):
        leftovers |= {k.decode(): rds.llen(k) for k in rds.scan_iter(f"{prefix}*:{kind}:*") if rds.llen(k)}
    return leftovers


def wait_swept(rds: redis.Redis, prefix: str, queues: list[str], timeout: float = 30.0) -> None:
    """After a kill -9 the dead process's processing list may still hold copies of tasks that have since
    finished (taken and recorded, never acknowledged); they stay until its heartbeat expires and a live
    dispatcher sweeps them back and drops them as known. Wait for that before ``reconcile``."""
    wait_for(lambda: not redis_leftovers(rds, prefix, queues), timeout, 0.2, what="Redis swept and empty")


def reconcile(engine: Engine, rds: redis.Redis, prefix: str, queues: list[str], ids: list[str]) -> None:
    """Every task ended exactly once in a final state, no slot drift, no busy slot, nothing left in Redis."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT task_id, state FROM tasks")).all()
        assert Counter(r[0] for r in rows if r[0] in set(ids)) == Counter(ids), (
            "each task has exactly one row"
        )
        assert all(r[1] in TERMINAL for r in rows if r[0] in set(ids))
        assert slot_drift(conn) == []
        busy = conn.execute(text("SELECT COUNT(*) FROM slots WHERE task_id IS NOT NULL")).scalar_one()
        assert busy == 0, f"{busy} slots still taken"
        processing = conn.execute(text("SELECT COUNT(*) FROM tasks WHERE state = 'processing'")).scalar_one()
        assert processing == 0
    keys = Keys(prefix)
    leftovers = redis_leftovers(rds, prefix, queues)
    assert not leftovers, f"jobs left in Redis: {leftovers}"
    assert rds.llen(keys.dead) == 0, rds.lrange(keys.dead, 0, 5)


def received_per_task(stats: dict[str, Any]) -> Counter[str]:
    return Counter(job["task_id"] for job in stats["jobs"])


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)[:4000]
