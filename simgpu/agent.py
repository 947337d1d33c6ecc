"""Simulated GPUs as pull agents (SPEC §9): each GPU long-polls the dispatcher for its jobs instead of
taking POSTs, then runs them exactly as a pushed simulated GPU does (service time, faults, callbacks).

    python -m simgpu --pull http://dispatcher:8000 --agent g7=$TOKEN7 --agent g8=$TOKEN8

Each agent asks for as many jobs as its GPU has slots, free or not: the dispatcher must never hand it
more than its free slots, and a job that arrives with every slot held counts as an oversubscription, as
for a pushed GPU. A heartbeat answered 409 stops the job (that is how a pull GPU learns of a cancel), and a
final ``failed`` callback confirms the stop (answered 409, it frees the slot: ``GpuSim._call``). A GPU
that is ``down`` stops polling: a dead agent, for the dispatcher. A refusal fault (``http_500`` ...)
loses the job it drew: an agent that died after fetching it, which only the lease settles.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
import orjson

from simgpu.jobs import BadJob, Job

if TYPE_CHECKING:
    from simgpu.gpu import GpuSim
    from simgpu.server import SimServer

log = logging.getLogger("simgpu.agent")

#: Seconds each long poll may wait for jobs (the dispatcher allows up to 30).
POLL_WAIT_SECONDS = 20.0
#: Pause after a failed poll (dispatcher restarting), doubled up to MAX_PAUSE_SECONDS.
PAUSE_SECONDS = 0.2
MAX_PAUSE_SECONDS = 5.0


class PullAgents:
    def __init__(self, server: SimServer, base_url: str, tokens: dict[str, str]) -> None:
        self.server = server
        self.base_url = base_url.rstrip("/")
        self.tokens = tokens
        self.polls = 0
        self.refused: dict[str, int] = {}  # GPU -> polls answered 401/403/404 (a misconfigured agent)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=POLL_WAIT_SECONDS + 15), cookie_jar=aiohttp.DummyCookieJar()
        )
        for name, gpu in self.server.gpus.items():
            gpu.pull = True
            task = asyncio.create_task(self._agent(gpu, self.tokens[name]), name=f"agent-{name}")
            self._tasks.add(task)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()

    async def _agent(self, gpu: GpuSim, token: str) -> None:
        assert self._session is not None
        # One path segment whatever the name holds: unescaped, a GPU registered as g?x polled /agents/g (404).
        url = f"{self.base_url}/agents/{quote(gpu.name, safe='')}/jobs"
        headers = {"Authorization": f"Bearer {token}"}
        pause = PAUSE_SECONDS
        while True:
            if gpu.down:  # a dead agent polls nothing
                await asyncio.sleep(0.05)
                continue
            body = {"max": gpu.behaviour.slots, "wait_seconds": POLL_WAIT_SECONDS}
            try:
                async with self._session.post(url, json=body, headers=headers) as response:
                    raw = await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.info("poll failed", extra={"action": "poll_failed", "gpu": gpu.name, "error": str(exc)})
                await asyncio.sleep(pause)
                pause = min(pause * 2, MAX_PAUSE_SECONDS)
                continue
            self.polls += 1
            if status == 200:
                pause = PAUSE_SECONDS
                for job in orjson.loads(raw)["jobs"]:
                    self._take(gpu, job)
            elif status == 204:
                pause = PAUSE_SECONDS
            else:
                if status in (401, 403, 404):
                    self.refused[gpu.name] = self.refused.get(gpu.name, 0) + 1
                log.warning(
                    "poll refused",
                    extra={"action": "poll_refused", "gpu": gpu.name, "status": status, "body": raw[:200]},
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, MAX_PAUSE_SECONDS)

    def _take(self, gpu: GpuSim, body: dict[str, Any]) -> None:
        """What ``SimServer._job`` does with a POSTed job, without the HTTP answer."""
        raw = orjson.dumps(body)
        gpu.arrive(raw)
        try:
            job = Job.parse(raw, gpu.name, needs_callback=True)
        except BadJob as exc:  # the dispatcher sent a malformed job: nothing to call back to
            log.error("bad job", extra={"action": "bad_job", "gpu": gpu.name, "error": str(exc)})
            return
        plan = gpu.draw(job)
        self.server.jobs.append(job)
        if plan.refusal is not None:
            gpu.answers[f"lost_{plan.refusal}"] += 1
            return
        if plan.delay:
            task = asyncio.create_task(self._start_later(gpu, job, plan.delay), name=f"start-{job.task_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        gpu.may_start(job)
        gpu.start(job)

    @staticmethod
    async def _start_later(gpu: GpuSim, job: Job, delay: float) -> None:
        await asyncio.sleep(delay)
        if gpu.may_start(job):
            gpu.start(job)
