"""One workload through gpuq: the real Lambda handler (API Gateway REST proxy events of 100 tasks each,
called in this process), Redis, a fresh MariaDB database and one ``python -m dispatcher`` process, against
the simulator in async mode (202, then a callback).

The dispatcher is started and ready (GPUs registered, idle) before the clock starts; the clock starts just
before the first event is handed to the handler; a job counts as enqueued when the handler call that carried
it returned (its Lua push is done by then).
"""

from __future__ import annotations

import os
import secrets
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.analysis import measure
from bench.procs import Proc, ProcError, Sim, Usage, free_port, peak_rss_mb, python_env, wait_done
from bench.stores import BenchDatabase, BenchRedis
from bench.workloads import Workload
from demo.submit import api_event
from producer.settings import ProducerSettings

PREFIX = "gpuqbench:"
QUEUE = "bench"
BATCH = 100  # tasks per API Gateway event


@dataclass
class Context:
    redis: BenchRedis
    database: BenchDatabase
    workdir: Path


def producer_env(redis_url: str) -> None:
    """The handler reads its settings from the environment, as in AWS: only the benchmark's apply."""
    for name in ProducerSettings.model_fields:
        os.environ.pop(name.upper(), None)
    os.environ |= {"REDIS_URL": redis_url, "REDIS_KEY_PREFIX": PREFIX, "TASK_QUEUES": QUEUE}
    os.environ["POWERTOOLS_LOG_LEVEL"] = "WARNING"  # one INFO line per delivery would go to our stdout
    from producer.enqueue import close_clients
    from producer.settings import get_settings

    close_clients()
    get_settings.cache_clear()


def submit(jobs: int) -> tuple[float, dict[str, float]]:
    """(clock before the first event, task_id -> when its event was handled)."""
    from producer.handler import lambda_handler

    enqueued: dict[str, float] = {}
    started = time.monotonic()
    for first in range(0, jobs, BATCH):
        ids = [str(uuid.uuid4()) for _ in range(first, min(first + BATCH, jobs))]
        tasks = [{"task_id": tid, "type": "bench", "data": {"i": first + k}} for k, tid in enumerate(ids)]
        answer = lambda_handler(api_event(tasks, v2=False, b64=False), None)
        if answer.get("statusCode") != 202:
            raise ProcError(f"the producer answered {answer.get('statusCode')}: {answer.get('body')}")
        now = time.monotonic()
        enqueued.update(dict.fromkeys(ids, now))
    return started, enqueued


def start_dispatcher(ctx: Context, workdir: Path, sim: Sim, workload: Workload, token: str) -> Proc:
    port = free_port()
    settings = {
        "DATABASE_URL": ctx.database.url,
        "REDIS_URL": ctx.redis.url,
        "REDIS_KEY_PREFIX": PREFIX,
        "TASK_QUEUES": QUEUE,
        "GPU_ENDPOINTS": sim.endpoints,
        "SLOTS_PER_GPU": str(workload.slots),
        "CALLBACK_SECRET": secrets.token_urlsafe(32),
        "BEARER_TOKEN": token,
        "CALLBACK_HOST": "127.0.0.1",
        "CALLBACK_PORT": str(port),
        "LOG_FORMAT": "json",  # production defaults: JSON lines at INFO
        "LOG_LEVEL": "INFO",
    }
    proc = Proc("dispatcher", [sys.executable, "-m", "dispatcher"], python_env(settings), workdir)

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        proc.wait_until(ready, 60)
    except BaseException:
        proc.stop()
        raise
    return proc


def run(
    ctx: Context,
    workload: Workload,
    *,
    on_dispatcher: Callable[[int], None] | None = None,
    after: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """``on_dispatcher(pid)`` is called just before the jobs go in, ``after()`` once they are all done or the
    run failed, before the dispatcher stops (a profiler hooks in there)."""
    ctx.redis.flush()
    ctx.database.recreate()
    workdir = ctx.workdir / f"gpuq-{workload.name}"
    workdir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(16)
    sim = Sim(
        workdir, gpus=workload.gpus, slots=workload.slots, service=workload.service, mode="async", token=token
    )
    dispatcher: Proc | None = None
    try:
        dispatcher = start_dispatcher(ctx, workdir, sim, workload, token)
        producer_env(ctx.redis.url)
        usage = Usage(dispatcher.pid, sim.pid, ctx.redis.info_cpu)
        if on_dispatcher is not None:
            on_dispatcher(dispatcher.pid)
        started, enqueued = submit(workload.jobs)
        enqueue_s = time.monotonic() - started
        timeout = 60 + workload.jobs / 50 + workload.ideal_makespan * 3

        def answered(totals: dict[str, Any]) -> int:
            return int(totals["callbacks_answered"].get("200", 0))

        wait_done(sim, answered, workload.jobs, timeout, dispatcher)
        resources = usage.finish(workload.jobs) | {"peak_rss_mb": round(peak_rss_mb(dispatcher.pid), 1)}
        stats = sim.stats(jobs=True)
        result = measure(workload, stats["jobs"], enqueued, started)
        result |= resources | {
            "enqueue_s": round(enqueue_s, 3),
            "oversubscriptions": stats["totals"]["oversubscriptions"],
            "gpu_answers": stats["totals"]["answers"],
            "db_states": ctx.database.states(),
        }
    finally:
        if after is not None:
            after()
        exit_code = dispatcher.stop() if dispatcher is not None else None
        sim.stop()
    result["consumer_exit_code"] = exit_code
    return result
