"""gpuq as the system under test: the real Lambda handler (API Gateway REST proxy events of 100 tasks each,
called in this process), Redis, a fresh MariaDB database and one ``python -m dispatcher`` process (or
several, every callback going to the first: ``Workload.dispatchers``), against the simulator in async mode
(202, then a callback). A job counts as enqueued when the handler call that carried it returned (its Lua push
is done by then).

The last job of a live run is of high priority: how many normal jobs started between its enqueue and its
start is the priority inversion the hand-off buffers allow (README "Slot hand-off"). The dispatchers'
``/metrics`` give the database commits and the hand-offs per job."""

from __future__ import annotations

import os
import secrets
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.procs import Proc, ProcError, Sim
from bench.runner import Context
from bench.workloads import Workload
from demo.submit import api_event
from dispatcher.testing import free_port, is_ready, process_env
from producer.settings import ProducerSettings

PREFIX = "gpuqbench:"
QUEUE = "bench"
BATCH = 100  # tasks per API Gateway event
#: HANDOFF_BUFFER for the dispatchers (``--handoff-buffer``); None: the dispatcher's default.
HANDOFF_BUFFER: int | None = None
#: COMMIT_PIPELINE for the dispatchers (``--commit-pipeline``); None: the dispatcher's default.
COMMIT_PIPELINE: int | None = None
#: STANDBY_JOBS for the dispatchers (``--standby-jobs``); None: the dispatcher's default.
STANDBY_JOBS: str | None = "true"  # what the benchmark measures; the dispatcher's default is off for now


class Gpuq:
    name = "gpuq"
    sim_mode = "async"

    def __init__(self) -> None:
        self.port = 0
        self.ports: list[int] = []
        self.others: list[Proc] = []
        self.high: str | None = None  # the high-priority job's task id
        self.high_pushed = datetime.now(UTC).replace(tzinfo=None)  # and when it was pushed (naive UTC)
        self.pull_sim: Sim | None = None  # a pull workload's agents, started with the dispatcher

    def prepare(self, ctx: Context) -> None:
        ctx.redis.flush()
        ctx.database.recreate()
        # The handler reads its settings from the environment, as in AWS: only the benchmark's apply.
        for name in ProducerSettings.model_fields:
            os.environ.pop(name.upper(), None)
        os.environ |= {"REDIS_URL": ctx.redis.url, "REDIS_KEY_PREFIX": PREFIX, "TASK_QUEUES": QUEUE}
        os.environ["POWERTOOLS_LOG_LEVEL"] = "WARNING"  # one INFO line per delivery would go to our stdout
        import producer.handler  # noqa: F401
        from producer.enqueue import close_clients
        from producer.settings import get_settings

        # Imported here, not on the first ``submit``: its ~20 ms of imports (Powertools, pydantic models)
        # fell inside the efficiency run's clock, before the first job, where Celery's task module is
        # imported by ``prepare`` too. A deployed Lambda imports once per cold start, not per event.
        close_clients()
        get_settings.cache_clear()

    def start(self, ctx: Context, workdir: Path, sim: Sim | None, workload: Workload, token: str) -> Proc:
        self.port = free_port()
        self.ports = [self.port]
        secret = secrets.token_urlsafe(32)
        agents = self._register_pull(ctx, workload) if workload.pull else {}
        main = self._start(
            ctx, workdir, sim, workload, token=token, secret=secret, port=self.port, name="dispatcher"
        )
        if workload.pull:
            # The agents poll the dispatcher once it listens (they give up on 401s before the schema is
            # there); simgpu's stats are then read as for a pushed fleet.
            main.wait_until(lambda: self._ready(self.port), 90)
            self.pull_sim = Sim(
                workdir,
                workload,
                mode=self.sim_mode,
                token=token,
                pull=f"http://127.0.0.1:{self.port}",
                agents=agents,
            )
        if workload.dispatchers > 1:  # the first creates the schema; creating it at once from several races
            main.wait_until(lambda: self._ready(self.port), 90)
        for i in range(1, workload.dispatchers):
            port = free_port()
            self.ports.append(port)
            other = self._start(
                ctx, workdir, sim, workload, token=token, secret=secret, port=port, name=f"dispatcher-{i}"
            )
            other.wait_until(lambda port=port: self._ready(port), 90)  # type: ignore[misc]
            self.others.append(other)
        return main

    def _register_pull(self, ctx: Context, workload: Workload) -> dict[str, str]:
        """What ``gpuq gpu add g<i> --pull`` does for each GPU of the fleet; their agent tokens."""
        from dispatcher.db.agents import register_pull
        from dispatcher.db.engine import init_schema, make_engine, transaction, utcnow

        engine = make_engine(ctx.database.url, pool_size=1)
        try:
            init_schema(engine)
            tokens = {}
            for i in range(workload.gpus):
                token = transaction(
                    engine,
                    register_pull,
                    gpu_id=f"g{i}",
                    pool="default",
                    slot_count=workload.slots,
                    now=utcnow(),
                )
                assert token is not None  # a fresh database: every GPU is new
                tokens[f"g{i}"] = token
            return tokens
        finally:
            engine.dispose()

    def _start(
        self,
        ctx: Context,
        workdir: Path,
        sim: Sim | None,
        workload: Workload,
        *,
        token: str,
        secret: str,
        port: int,
        name: str,
    ) -> Proc:
        settings = {
            "DATABASE_URL": ctx.database.url,
            "REDIS_URL": ctx.redis.url,
            "REDIS_KEY_PREFIX": PREFIX,
            "TASK_QUEUES": QUEUE,
            "GPU_ENDPOINTS": sim.endpoints if sim is not None else "",  # pull GPUs: registered already
            "SLOTS_PER_GPU": str(workload.slots),
            "CALLBACK_SECRET": secret,  # shared: a callback for any dispatcher's attempt goes to the first
            "BEARER_TOKEN": token,
            "CALLBACK_HOST": "127.0.0.1",
            "CALLBACK_PORT": str(port),
            "CALLBACK_URL": f"http://127.0.0.1:{self.port}/callback",
            "LOG_FORMAT": "json",  # production defaults: JSON lines at INFO
            "LOG_LEVEL": "INFO",
        }
        if HANDOFF_BUFFER is not None:
            settings["HANDOFF_BUFFER"] = str(HANDOFF_BUFFER)
        if COMMIT_PIPELINE is not None:
            settings["COMMIT_PIPELINE"] = str(COMMIT_PIPELINE)
        if STANDBY_JOBS is not None:
            settings["STANDBY_JOBS"] = STANDBY_JOBS
        return Proc(name, [sys.executable, "-m", "dispatcher"], process_env(settings), workdir)

    def ready(self, proc: Proc) -> bool:
        return self._ready(self.port)

    def _ready(self, port: int) -> bool:
        return is_ready(f"http://127.0.0.1:{port}")

    def cleanup(self) -> None:
        for other in self.others:
            other.stop(30)
        self.others = []

    def submit(self, jobs: int, *, high_last: bool = False) -> dict[str, float]:
        from producer.handler import lambda_handler

        enqueued: dict[str, float] = {}
        self.high = None
        for first in range(0, jobs, BATCH):
            ids = [str(uuid.uuid4()) for _ in range(first, min(first + BATCH, jobs))]
            tasks: list[dict[str, Any]] = [
                {"task_id": tid, "type": "bench", "data": {"i": first + k}} for k, tid in enumerate(ids)
            ]
            if high_last and first + BATCH >= jobs:  # in its own event, after every other job is pushed
                self.high = ids[-1]
                tasks[-1]["priority"] = "high"
                enqueued |= self._push(lambda_handler, tasks[:-1])
                tasks = tasks[-1:]
                self.high_pushed = datetime.now(UTC).replace(tzinfo=None)
            enqueued |= self._push(lambda_handler, tasks)
        return enqueued

    def _push(self, lambda_handler: Any, tasks: list[dict[str, Any]]) -> dict[str, float]:
        enqueued: dict[str, float] = {}
        if tasks:
            ids = [t["task_id"] for t in tasks]
            answer = lambda_handler(api_event(tasks, v2=False, b64=False), None)
            if answer.get("statusCode") != 202:
                raise ProcError(f"the producer answered {answer.get('statusCode')}: {answer.get('body')}")
            enqueued.update(dict.fromkeys(ids, time.monotonic()))
        return enqueued

    def done(self, totals: dict[str, Any]) -> int:
        return int(totals["callbacks_answered"].get("200", 0))  # answered: the dispatcher has recorded it

    def extra(self, ctx: Context) -> dict[str, Any]:
        """Task states in the database; commits and hand-offs summed over the dispatchers' /metrics."""
        totals = {"commits": 0.0, "handoffs": 0.0}
        for port in self.ports:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            for line in text.splitlines():
                if line.startswith("gpuq_db_commits_total "):
                    totals["commits"] += float(line.split()[1])
                elif line.startswith("gpuq_handoffs_total "):
                    totals["handoffs"] += float(line.split()[1])
        out: dict[str, Any] = {
            "db_states": ctx.database.states(),
            "db_commits": totals["commits"],
            "handoffs": totals["handoffs"],
        }
        if self.high is not None:
            # normal jobs recorded as started after the high-priority one was enqueued, before it started:
            # what the hand-off buffers (and a pass already under way) let overtake it
            out["priority_inversion_jobs"] = ctx.database.started_ahead(self.high, self.high_pushed)
        return out

    def figures(self, jobs: list[dict[str, Any]], enqueued: dict[str, float]) -> dict[str, Any]:
        """The priority inversion of the high-priority job, if there was one."""
        out: dict[str, Any] = {}
        if self.high is not None and self.high in enqueued:
            received = {j["task_id"]: float(j["received_mono"]) for j in jobs}
            pushed, ran = enqueued[self.high], received.get(self.high)
            if ran is not None:
                out["priority_overtaken_at_gpu"] = sum(1 for t in received.values() if pushed < t < ran)
                out["priority_wait_ms"] = round((ran - pushed) * 1000, 2)
        return out
