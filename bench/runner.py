"""One workload through one system, the same way for gpuq and for Celery.

Two ways to start (see RESULTS.md):

- live (the efficiency run): the consumer (dispatcher / Celery worker) is started and ready first; then
  the driver enqueues every job in one burst. The clock starts just before the first enqueue.
- backlog (the overhead-bound run): every job is enqueued first, then the consumer is started. The clock
  starts when the first job reaches a GPU, and a job counts as enqueued no earlier than that. The producer
  (this process) is then idle while the consumer works: on a 2-core machine its CPU would otherwise be
  taken from the system under test (Celery's ``apply_async`` costs ~10x gpuq's batched Lambda push).

The consumer's CPU per job is taken over the middle of the run (from 10 % to 90 % of the jobs done), so
that neither its start-up (imports, schema) nor the drain at the end counts.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bench.analysis import measure
from bench.procs import Proc, ProcError, Sim, Usage, peak_rss_mb
from bench.stores import BenchDatabase, BenchRedis
from bench.workloads import Workload


@dataclass
class Context:
    redis: BenchRedis
    database: BenchDatabase
    workdir: Path
    runs: int = 0

    def new_workdir(self, name: str) -> Path:
        """A directory of the run's own for its processes' logs and files."""
        self.runs += 1
        path = self.workdir / f"{self.runs:02d}-{name}"
        path.mkdir(parents=True)
        return path


class System(Protocol):
    name: str
    sim_mode: str  # "async" (202 + callback) or "sync" (the answer carries the result)

    def prepare(self, ctx: Context) -> None:
        """Fresh state and the producer's settings."""

    def start(self, ctx: Context, workdir: Path, sim: Sim | None, workload: Workload, token: str) -> Proc:
        """Start the consumer (without waiting for it)."""

    def ready(self, proc: Proc) -> bool:
        """Whether the consumer takes jobs now."""

    def submit(self, jobs: int) -> dict[str, float]:
        """Enqueue ``jobs`` jobs; task_id -> when it was enqueued (monotonic)."""

    def done(self, totals: dict[str, Any]) -> int:
        """Jobs finished and handed back, from the simulator's counters."""

    def extra(self, ctx: Context) -> dict[str, Any]:
        """System-specific end-of-run checks (gpuq: task states in the database)."""


@dataclass
class Hooks:
    on_consumer: Callable[[int], None] | None = None  # the consumer's pid, before the jobs run
    after: Callable[[], None] | None = None  # once they ran (or failed), before the consumer stops


def run(
    ctx: Context, system: System, workload: Workload, *, backlog: bool, hooks: Hooks | None = None
) -> dict[str, Any]:
    hooks = hooks or Hooks()
    system.prepare(ctx)
    workdir = ctx.new_workdir(f"{system.name}-{workload.name}")
    token = secrets.token_urlsafe(16)
    # Pull agents need the dispatcher's URL and their tokens: the system starts them (``pull_sim``).
    sim: Sim | None = None
    if not workload.pull:
        sim = Sim(workdir, workload, mode=system.sim_mode, token=token)
    consumer: Proc | None = None
    try:
        if backlog:
            started = time.monotonic()
            enqueued = system.submit(workload.jobs)
            enqueue_s = time.monotonic() - started
        consumer = proc = system.start(ctx, workdir, sim, workload, token)
        proc.wait_until(lambda: system.ready(proc), 90)
        if sim is None:
            sim = system.pull_sim  # type: ignore[attr-defined]
            assert sim is not None
        usage = Usage(proc.pid, sim.pid, ctx.redis.info_cpu)
        if hooks.on_consumer is not None:
            hooks.on_consumer(proc.pid)
        if not backlog:
            started = time.monotonic()
            enqueued = (
                system.submit(workload.jobs, high_last=True)  # type: ignore[call-arg]
                if hasattr(system, "figures")
                else system.submit(workload.jobs)
            )
            enqueue_s = time.monotonic() - started
        timeout = 60 + workload.jobs / 20 + workload.ideal_makespan * 3
        _wait(sim, proc, system, usage, jobs=workload.jobs, timeout=timeout)
        resources = usage.finish(workload.jobs) | {"peak_rss_mb": round(peak_rss_mb(proc.pid), 1)}
        stats = sim.stats(jobs=True)
        jobs = stats["jobs"]
        if backlog and jobs:
            started = min(float(job["received_mono"]) for job in jobs)
            enqueued = {task_id: max(t, started) for task_id, t in enqueued.items()}
        result = measure(workload, jobs, enqueued, started)
        result |= resources | system.extra(ctx)
        if hasattr(system, "figures"):
            result |= system.figures(jobs, enqueued)
        if "db_commits" in result:
            result["db_commits_per_job"] = round(result["db_commits"] / workload.jobs, 3)
            result["handoff_share"] = round(result["handoffs"] / workload.jobs, 3)
        result |= {
            "start": "backlog" if backlog else "live",
            "enqueue_s": round(enqueue_s, 3),
            "producer_jobs_per_s": round(workload.jobs / enqueue_s, 1) if enqueue_s > 0 else None,
            "oversubscriptions": stats["totals"]["oversubscriptions"],
            "gpu_answers": stats["totals"]["answers"],
        }
    finally:
        if hooks.after is not None:
            hooks.after()
        if hasattr(system, "cleanup"):
            system.cleanup()  # the other dispatchers of a several-dispatcher run
        exit_code = consumer.stop(30) if consumer is not None else None
        if sim is not None:
            sim.stop()
    result["consumer_exit_code"] = exit_code
    return result


def _wait(sim: Sim, consumer: Proc, system: System, usage: Usage, *, jobs: int, timeout: float) -> None:
    """Poll the simulator's counters (cheap: without the job log) until every job is done."""
    deadline = time.monotonic() + timeout
    done = 0
    while time.monotonic() < deadline:
        sim.check_alive()
        consumer.check_alive()
        done = system.done(sim.stats()["totals"])
        usage.sample(done)
        if done >= jobs:
            return
        time.sleep(0.2)
    raise ProcError(f"{system.name}: only {done} of {jobs} jobs done after {timeout:.0f} s")
