"""gpuq as the system under test: the real Lambda handler (API Gateway REST proxy events of 100 tasks each,
called in this process), Redis, a fresh MariaDB database and one ``python -m dispatcher`` process, against
the simulator in async mode (202, then a callback). A job counts as enqueued when the handler call that
carried it returned (its Lua push is done by then)."""

from __future__ import annotations

import os
import secrets
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench.procs import Proc, ProcError, Sim, free_port, python_env
from bench.runner import Context
from bench.workloads import Workload
from demo.submit import api_event
from producer.settings import ProducerSettings

PREFIX = "gpuqbench:"
QUEUE = "bench"
BATCH = 100  # tasks per API Gateway event


class Gpuq:
    name = "gpuq"
    sim_mode = "async"

    def __init__(self) -> None:
        self.port = 0

    def prepare(self, ctx: Context) -> None:
        ctx.redis.flush()
        ctx.database.recreate()
        # The handler reads its settings from the environment, as in AWS: only the benchmark's apply.
        for name in ProducerSettings.model_fields:
            os.environ.pop(name.upper(), None)
        os.environ |= {"REDIS_URL": ctx.redis.url, "REDIS_KEY_PREFIX": PREFIX, "TASK_QUEUES": QUEUE}
        os.environ["POWERTOOLS_LOG_LEVEL"] = "WARNING"  # one INFO line per delivery would go to our stdout
        from producer.enqueue import close_clients
        from producer.settings import get_settings

        close_clients()
        get_settings.cache_clear()

    def start(self, ctx: Context, workdir: Path, sim: Sim, workload: Workload, token: str) -> Proc:
        self.port = free_port()
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
            "CALLBACK_PORT": str(self.port),
            "LOG_FORMAT": "json",  # production defaults: JSON lines at INFO
            "LOG_LEVEL": "INFO",
        }
        return Proc("dispatcher", [sys.executable, "-m", "dispatcher"], python_env(settings), workdir)

    def ready(self, proc: Proc) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def submit(self, jobs: int) -> dict[str, float]:
        from producer.handler import lambda_handler

        enqueued: dict[str, float] = {}
        for first in range(0, jobs, BATCH):
            ids = [str(uuid.uuid4()) for _ in range(first, min(first + BATCH, jobs))]
            tasks = [{"task_id": tid, "type": "bench", "data": {"i": first + k}} for k, tid in enumerate(ids)]
            answer = lambda_handler(api_event(tasks, v2=False, b64=False), None)
            if answer.get("statusCode") != 202:
                raise ProcError(f"the producer answered {answer.get('statusCode')}: {answer.get('body')}")
            now = time.monotonic()
            enqueued.update(dict.fromkeys(ids, now))
        return enqueued

    def done(self, totals: dict[str, Any]) -> int:
        return int(totals["callbacks_answered"].get("200", 0))  # answered: the dispatcher has recorded it

    def extra(self, ctx: Context) -> dict[str, Any]:
        return {"db_states": ctx.database.states()}
