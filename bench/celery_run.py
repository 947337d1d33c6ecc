"""The Celery baseline as the system under test (see ``bench.celery_app``): the driver sends each job with
``apply_async`` (what ``.delay()`` does), one Celery worker runs them against the simulator in sync mode.
A job counts as enqueued when its ``apply_async`` returned."""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.procs import Proc, Sim
from bench.runner import Context
from bench.workloads import Workload
from dispatcher.testing import process_env


class CeleryBaseline:
    name = "celery"
    sim_mode = "sync"

    def __init__(self) -> None:
        self.ready_file = Path()

    def prepare(self, ctx: Context) -> None:
        from bench.celery_app import configure

        ctx.redis.flush()
        configure(ctx.redis.url)

    def start(self, ctx: Context, workdir: Path, sim: Sim | None, workload: Workload, token: str) -> Proc:
        assert sim is not None  # Celery runs no pull workload
        self.ready_file = workdir / "celery-ready"
        env = {
            "BENCH_CELERY_BROKER": ctx.redis.url,
            "BENCH_CELERY_GPUS": ",".join(sim.urls),
            "BENCH_CELERY_SLOTS": str(workload.slots),
            "BENCH_CELERY_TOKEN": token,
            "BENCH_CELERY_READY_FILE": str(self.ready_file),
        }
        argv = [sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker", "--pool", "threads"]
        argv += ["--concurrency", str(workload.capacity), "--prefetch-multiplier", "1"]
        argv += ["--loglevel", "WARNING", "--hostname", f"bench-{uuid.uuid4().hex[:6]}@%h"]
        return Proc("celery-worker", argv, process_env(env), workdir)

    def ready(self, proc: Proc) -> bool:
        return self.ready_file.exists()

    def submit(self, jobs: int) -> dict[str, float]:
        from bench.celery_app import gpu_job

        enqueued: dict[str, float] = {}
        for i in range(jobs):
            task_id = str(uuid.uuid4())
            gpu_job.apply_async(args=(task_id, {"i": i}), task_id=task_id)
            enqueued[task_id] = time.monotonic()
        return enqueued

    def done(self, totals: dict[str, Any]) -> int:
        return int(totals["answers"].get("200", 0))

    def extra(self, ctx: Context) -> dict[str, Any]:
        return {}
