"""Running real dispatcher processes (``python -m dispatcher``) against the real stores and a simulated fleet.

Each process gets its own port and log file; ``kill()`` is a real SIGKILL. ``reconcile`` is the end-of-test
audit every scenario runs: every task ended, the slot table agrees with the tasks, Redis holds nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from dispatcher.db.attempts import slot_drift
from producer.job import Job
from producer.keys import Keys
from tests.dispatcher.helpers import wait_for

SECRET = "test-callback-secret-0123456789"
BEARER = "gpu-bearer-token"
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DispatcherProc:
    def __init__(self, env: dict[str, str], name: str = "d", workdir: Path | None = None) -> None:
        self.port = int(env.get("CALLBACK_PORT") or free_port())
        self.name = name
        self.env = {
            **os.environ,
            "CALLBACK_HOST": "127.0.0.1",
            "CALLBACK_PORT": str(self.port),
            "CALLBACK_SECRET": SECRET,
            "BEARER_TOKEN": BEARER,
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
            "DISPATCHER_ID": f"{name}-{uuid.uuid4().hex[:6]}",
            "PYTHONPATH": str(ROOT),
            **env,
        }
        # The process runs in this directory: embedded mode's default database is ./.gpuq/gpuq.db.
        self.log_path = (workdir or Path(tempfile.mkdtemp(prefix="gpuq-disp-"))) / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> DispatcherProc:
        self.env["DISPATCHER_ID"] = f"{self.name}-{uuid.uuid4().hex[:6]}"  # a restart is a new process
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dispatcher"],
            env=self.env,
            stdout=log,
            stderr=log,
            cwd=self.log_path.parent,
        )
        log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until /readyz answers 200; fails at once, with the log, if the process exits instead. The bound
        is generous because the wait ends at readiness: on a loaded 2-core machine the imports alone once
        took 15 s (1.2 s of CPU)."""

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"dispatcher exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout, 0.05, what=f"dispatcher {self.name} ready")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def term(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

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


def wait_final(
    engine: Engine, ids: list[str], timeout: float = 60.0, final: tuple[str, ...] = ("finished",)
) -> None:
    def done() -> bool:
        c = states(engine, ids)
        return sum(c[s] for s in final) == len(ids)

    wait_for(done, timeout, 0.1, what=lambda: f"all {len(ids)} tasks final; now {dict(states(engine, ids))}")  # type: ignore[arg-type]


def redis_leftovers(rds: redis.Redis, prefix: str, queues: list[str]) -> dict[str, int]:
    """Jobs still in the queues, processing lists or parked lists."""
    leftovers = {q: rds.llen(q) for q in queues if rds.llen(q)}
    leftovers |= {k.decode(): rds.llen(k) for k in rds.scan_iter(f"{prefix}*:proc:*") if rds.llen(k)}
    leftovers |= {k.decode(): rds.llen(k) for k in rds.scan_iter(f"{prefix}*:parked:*") if rds.llen(k)}
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
        assert all(r[1] in ("finished", "failed", "cancelled") for r in rows if r[0] in set(ids))
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
