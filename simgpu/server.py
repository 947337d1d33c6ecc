"""The simulator's HTTP side: the GPU endpoints, and where they listen.

Two layouts. Path mode (default): one port, GPU i at ``/g{i}``, the control endpoints beside them; a GPU
that is down answers 503. Port mode (``gpu_ports``): GPU i alone on port ``gpu_ports + i`` at ``/``, the
control endpoints on ``port``; a GPU that is down closes its listener and its open connections, so the
dispatcher sees connections refused, as from a dead host.

    POST <gpu url>    a job (SPEC §4)             GET <gpu url>    probe: 200, or 503 when down
    POST /_control    change behaviour (JSON)     GET /_stats      counters and job log (?jobs=0: without)
    POST /_reset      zero counters, empty the job log ({"config": true}: also restore the start config)
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import hdrs, web

from simgpu.callbacks import CallbackClient
from simgpu.config import SimConfig
from simgpu.control import ControlMixin, json_response
from simgpu.gpu import GpuSim
from simgpu.jobs import BadJob, Job

if TYPE_CHECKING:
    from simgpu.agent import PullAgents

log = logging.getLogger("simgpu")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ERROR_STATUS = {"http_500": 500, "http_400": 400, "http_429": 429}
# Long enough for a sync job to finish its answer, short enough that stopping never stalls a test run.
SHUTDOWN_SECONDS = 1.0


@dataclass
class Listener:
    runner: web.AppRunner
    host: str
    port: int
    site: web.TCPSite | None = None

    async def open(self) -> None:
        self.site = web.TCPSite(self.runner, self.host, self.port)
        await self.site.start()
        self.port = self.runner.addresses[-1][1]

    async def close_listener(self) -> None:
        if self.site is not None:
            await self.site.stop()
            self.site = None
        if self.runner.server is not None:
            for connection in self.runner.server.connections:
                connection.force_close()


class SimServer(ControlMixin):
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.token = config.token
        self.callbacks = CallbackClient(
            tries=config.callback_tries,
            timeout=config.callback_timeout,
            backoff=config.callback_backoff,
            deadline=config.callback_deadline,
            warm=config.warm_callbacks,
        )
        seed = config.seed
        self.gpus: dict[str, GpuSim] = {
            name: GpuSim(
                name,
                "",
                config.gpu_behaviour(name),
                random.Random(f"{seed}/{name}") if seed is not None else random.Random(),  # noqa: S311
                self.callbacks,
            )
            for name in config.gpu_names
        }
        self.jobs: list[Job] = []
        self.control_url = ""
        self._listeners: dict[str, Listener] = {}  # "control", or a GPU name in port mode
        self._closing = asyncio.Event()
        self.agents: PullAgents | None = None

    @property
    def urls(self) -> dict[str, str]:
        return {name: gpu.url for name, gpu in self.gpus.items()}

    def gpu_endpoints(self) -> str:
        """The dispatcher's ``GPU_ENDPOINTS`` value for this fleet."""
        return ",".join(f"{name}={gpu.url}" for name, gpu in self.gpus.items())

    async def start(self) -> None:
        await self.callbacks.open()
        try:
            await self._listen()
            if self.config.pull is not None:
                from simgpu.agent import PullAgents

                self.agents = PullAgents(self, self.config.pull, dict(self.config.agents))
                await self.agents.start()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "simulator listening",
            extra={
                "action": "started",
                "control_url": self.control_url,
                "gpu_endpoints": self.gpu_endpoints(),
            },
        )

    async def _listen(self) -> None:
        host, cfg = self.config.host, self.config
        control = await self._add_listener("control", self._control_routes(), cfg.port)
        self.control_url = f"http://{host}:{control.port}"
        if cfg.gpu_ports is None:
            for name, gpu in self.gpus.items():
                gpu.url = f"{self.control_url}/{name}"
            await self._apply_down()
            return
        for i, (name, gpu) in enumerate(self.gpus.items()):
            routes = [
                web.post("/", self._job_handler(gpu)),
                web.get("/", self._probe_handler(gpu)),
                web.post("/cancel", self._cancel_handler(gpu)),
            ]
            listener = await self._add_listener(name, routes, cfg.gpu_ports + i if cfg.gpu_ports else 0)
            gpu.url = f"http://{host}:{listener.port}/"
        await self._apply_down()

    def _control_routes(self) -> list[web.RouteDef]:
        routes = [
            web.post("/_control", self.handle_control),
            web.get("/_control", self.handle_describe),
            web.get("/_stats", self.handle_stats),
            web.post("/_reset", self.handle_reset),
        ]
        if self.config.gpu_ports is None:
            for name, gpu in self.gpus.items():
                routes += [
                    web.post(f"/{name}", self._job_handler(gpu)),
                    web.get(f"/{name}", self._probe_handler(gpu)),
                    web.post(f"/{name}/cancel", self._cancel_handler(gpu)),
                ]
        return routes

    async def _add_listener(self, key: str, routes: list[web.RouteDef], port: int) -> Listener:
        app = web.Application()
        app.add_routes(routes)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_SECONDS)
        await runner.setup()
        listener = self._listeners[key] = Listener(runner, self.config.host, port)
        await listener.open()
        return listener

    async def _apply_down(self) -> None:
        """Port mode: a GPU that is down has no listener; one that came back listens again on its port."""
        for name, gpu in self.gpus.items():
            listener = self._listeners.get(name)
            if listener is None:
                continue
            if gpu.down and listener.site is not None:
                await listener.close_listener()
            elif not gpu.down and listener.site is None:
                await listener.open()

    async def stop(self) -> None:
        self._closing.set()  # hanging requests give up their connections
        if self.agents is not None:
            await self.agents.stop()
        for listener in self._listeners.values():
            await listener.runner.cleanup()
        self._listeners.clear()
        for gpu in self.gpus.values():
            await gpu.abandon()
        await self.callbacks.close()

    def _job_handler(self, gpu: GpuSim) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._job(request, gpu)

        return handle

    def _cancel_handler(self, gpu: GpuSim) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._cancel(request, gpu)

        return handle

    async def _cancel(self, request: web.Request, gpu: GpuSim) -> web.StreamResponse:
        """``POST <gpu>/cancel`` ``{"task_id", "attempt"}``: 200 once the job no longer runs here (also when
        it never did), 409 while a synchronous job cannot be stopped, 503 when the GPU is down."""
        if gpu.down:
            return self._down(request, gpu)
        if self.token is not None and request.headers.get(hdrs.AUTHORIZATION) != f"Bearer {self.token}":
            return json_response({"error": "missing or wrong bearer token"}, 401)
        try:
            body = orjson.loads(await request.read())
            task_id, attempt = body["task_id"], body["attempt"]
            if not isinstance(task_id, str) or not isinstance(attempt, int):
                raise TypeError("task_id must be a string and attempt an integer")
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            return json_response({"error": f"bad cancel body: {exc}"}, 400)
        outcome = gpu.cancel(task_id, attempt)
        if outcome == "busy":
            return json_response({"error": "a synchronous job cannot be stopped; its answer ends it"}, 409)
        return json_response({"task_id": task_id, "attempt": attempt, "cancelled": outcome == "stopped"}, 200)

    def _probe_handler(self, gpu: GpuSim) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            body = {
                "gpu": gpu.name,
                "slots": gpu.behaviour.slots,
                "in_flight": gpu.in_flight,
                "down": gpu.down,
            }
            return json_response(body, 503 if gpu.down else 200)

        return handle

    async def _job(self, request: web.Request, gpu: GpuSim) -> web.StreamResponse:
        raw = await request.read()
        # Counted only now: from here to taking the slot (gpu.draw) nothing awaits, so concurrent requests
        # are checked against each other's slots.
        gpu.arrive(raw)
        if gpu.down:
            return self._down(request, gpu)
        if self.token is not None and request.headers.get(hdrs.AUTHORIZATION) != f"Bearer {self.token}":
            return self._answer(gpu, 401, {"error": "missing or wrong bearer token"})
        sync = gpu.behaviour.mode == "sync"
        try:
            job = Job.parse(raw, gpu.name, needs_callback=not sync)
        except BadJob as exc:
            return self._answer(gpu, 400, {"error": str(exc)})
        plan = gpu.draw(job)
        self.jobs.append(job)
        if plan.delay:
            await asyncio.sleep(plan.delay)
        # A job cancelled while its answer was delayed never starts.
        refusal = plan.refusal if plan.refusal is not None or gpu.may_start(job) else "cancelled"
        if refusal is not None:
            return await self._refuse(request, gpu, refusal)
        if sync:
            return self._answer(gpu, 200, await gpu.run_sync(job))
        gpu.start(job)
        return self._answer(gpu, 202, {"task_id": job.task_id, "status": "accepted"})

    def _down(self, request: web.Request, gpu: GpuSim) -> web.Response:
        if gpu.name in self._listeners:  # port mode: a request on a connection opened before it went down
            return self._drop(request, gpu, "refused")
        return self._answer(gpu, 503, {"error": f"{gpu.name} is down"})

    async def _refuse(self, request: web.Request, gpu: GpuSim, refusal: str) -> web.StreamResponse:
        if refusal == "hang":
            gpu.answers["hang"] += 1
            await self._closing.wait()
            return self._drop(request, gpu, None)
        if refusal == "close":
            return self._drop(request, gpu, "close")
        if refusal == "cancelled":
            return self._answer(gpu, 409, {"error": "cancelled before it started"})
        error = {"error": f"simulated {refusal} on {gpu.name}"}
        return self._answer(gpu, ERROR_STATUS[refusal], error)

    @staticmethod
    def _answer(gpu: GpuSim, status: int, body: Mapping[str, Any]) -> web.Response:
        gpu.answers[str(status)] += 1
        return json_response(body, status)

    @staticmethod
    def _drop(request: web.Request, gpu: GpuSim, label: str | None) -> web.Response:
        if label is not None:
            gpu.answers[label] += 1
        if request.transport is not None:
            request.transport.close()
        return web.Response()  # never written: aiohttp finds the connection closed and lets it go
