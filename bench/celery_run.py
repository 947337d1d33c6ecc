"""One workload through the Celery baseline (see ``bench.celery_app``): the driver sends each job with
``apply_async`` (what ``.delay()`` does), one Celery worker runs them against the simulator in sync mode.

The worker is started and ready (connected, consuming) before the clock starts; a job counts as enqueued
when its ``apply_async`` returned.
"""

from __future__ import annotations

import secrets
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.analysis import measure
from bench.gpuq_run import Context
from bench.procs import Proc, Sim, Usage, peak_rss_mb, python_env, wait_done
from bench.workloads import Workload


def start_worker(ctx: Context, workdir: Path, sim: Sim, workload: Workload, token: str) -> Proc:
    ready = workdir / "celery-ready"
    env = {
        "BENCH_CELERY_BROKER": ctx.redis.url,
        "BENCH_CELERY_GPUS": ",".join(sim.urls),
        "BENCH_CELERY_SLOTS": str(workload.slots),
        "BENCH_CELERY_TOKEN": token,
        "BENCH_CELERY_READY_FILE": str(ready),
    }
    argv = [sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker", "--pool", "threads"]
    argv += ["--concurrency", str(workload.capacity), "--prefetch-multiplier", "1", "--loglevel", "WARNING"]
    argv += ["--hostname", f"bench-{uuid.uuid4().hex[:6]}@%h"]
    proc = Proc("celery-worker", argv, python_env(env), workdir)
    try:
        proc.wait_until(ready.exists, 90)
    except BaseException:
        proc.stop()
        raise
    return proc


def submit(jobs: int) -> tuple[float, dict[str, float]]:
    from bench.celery_app import gpu_job

    enqueued: dict[str, float] = {}
    started = time.monotonic()
    for i in range(jobs):
        task_id = str(uuid.uuid4())
        gpu_job.apply_async(args=(task_id, {"i": i}), task_id=task_id)
        enqueued[task_id] = time.monotonic()
    return started, enqueued


def run(ctx: Context, workload: Workload) -> dict[str, Any]:
    from bench.celery_app import configure

    ctx.redis.flush()
    workdir = ctx.workdir / f"celery-{workload.name}"
    workdir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(16)
    sim = Sim(
        workdir, gpus=workload.gpus, slots=workload.slots, service=workload.service, mode="sync", token=token
    )
    worker: Proc | None = None
    try:
        worker = start_worker(ctx, workdir, sim, workload, token)
        configure(ctx.redis.url)
        usage = Usage(worker.pid, sim.pid, ctx.redis.info_cpu)
        started, enqueued = submit(workload.jobs)
        enqueue_s = time.monotonic() - started
        timeout = 60 + workload.jobs / 20 + workload.ideal_makespan * 3

        def answered(totals: dict[str, Any]) -> int:
            return int(totals["answers"].get("200", 0))

        wait_done(sim, answered, workload.jobs, timeout, worker)
        resources = usage.finish(workload.jobs) | {"peak_rss_mb": round(peak_rss_mb(worker.pid), 1)}
        stats = sim.stats(jobs=True)
        result = measure(workload, stats["jobs"], enqueued, started)
        result |= resources | {
            "enqueue_s": round(enqueue_s, 3),
            "oversubscriptions": stats["totals"]["oversubscriptions"],
            "gpu_answers": stats["totals"]["answers"],
        }
    finally:
        exit_code = worker.stop(30) if worker is not None else None
        sim.stop()
    result["consumer_exit_code"] = exit_code
    return result
