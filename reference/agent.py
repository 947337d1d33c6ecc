"""The reference service as a pull agent (SPEC §9): ``python -m reference --pull URL --gpu-id g7``.

It listens on nothing. It long-polls ``POST <URL>/agents/<gpu id>/jobs`` with its agent token
(``--agent-token`` or ``$GPUQ_AGENT_TOKEN``), asking for as many jobs as it has free slots, runs each as
the pushed service runs a POSTed one (heartbeats, then the callback with the embeddings). A job the pushed
service would refuse (400: bad ``data.input``) is answered with a ``failed`` callback carrying the
same message. A heartbeat answered 409 means nobody waits for the job any more (it was cancelled, or its
lease ran out): the job is stopped and a final ``failed`` callback ("cancelled") says so; the dispatcher
answers it 409 and frees the slot then (that is a pull GPU's confirmation of a cancel).

While all its slots are busy it still polls, with ``max: 0``, at least every ``KEEPALIVE_SECONDS``: a pull
GPU silent for ``AGENT_STALE_SECONDS`` leaves the dispatcher's rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import quote

import httpx
from fastapi import HTTPException
from pydantic import ValidationError

from reference.embed_service import EmbedRequest, EmbedService, read_hold, read_inputs

log = logging.getLogger("reference.agent")

#: How long each long poll may wait for jobs (the dispatcher allows 30 s at most).
POLL_WAIT_SECONDS = 20.0
#: With every slot busy, a poll with ``max: 0`` at least this often says the agent is alive.
KEEPALIVE_SECONDS = 10.0
#: Pauses after a failed poll, doubled up to MAX_PAUSE_SECONDS.
PAUSE_SECONDS = 0.5
MAX_PAUSE_SECONDS = 10.0


class AgentRefused(Exception):
    """The dispatcher refused the agent itself (401/403/404): a wrong token or GPU id; retrying won't help."""


class PullAgent:
    def __init__(self, service: EmbedService, base_url: str, gpu_id: str, token: str) -> None:
        self.service = service
        # One path segment whatever the name holds: unescaped, a GPU registered as g?x polled /agents/g (404).
        self.url = f"{base_url.rstrip('/')}/agents/{quote(gpu_id, safe='')}/jobs"
        self.gpu_id = gpu_id
        self._headers = {"Authorization": f"Bearer {token}"}
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(POLL_WAIT_SECONDS + 15, connect=10))

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop``; raises AgentRefused when the dispatcher will not have this agent."""
        pause = PAUSE_SECONDS
        log.info("polling %s as GPU %s", self.url, self.gpu_id, extra={"action": "agent_start"})
        try:
            while not stop.is_set():
                free = self.service.settings.slots - self.service.busy
                if free <= 0:
                    # Full: wait for a slot, or say we are alive now and then.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.service.slot_freed.wait(), KEEPALIVE_SECONDS)
                    self.service.slot_freed.clear()
                    if self.service.settings.slots - self.service.busy > 0:
                        continue
                body = {"max": max(free, 0), "wait_seconds": POLL_WAIT_SECONDS if free > 0 else 0}
                try:
                    jobs = await self._poll(body, stop)
                except httpx.TransportError as exc:
                    log.warning(
                        "poll failed (%s); again in %.1f s", exc, pause, extra={"action": "poll_failed"}
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), pause)
                    pause = min(pause * 2, MAX_PAUSE_SECONDS)
                    continue
                pause = PAUSE_SECONDS
                for job in jobs:
                    await self._start(job)
        finally:
            await self._client.aclose()

    async def _poll(self, body: dict[str, Any], stop: asyncio.Event) -> list[dict[str, Any]]:
        request = asyncio.ensure_future(self._client.post(self.url, json=body, headers=self._headers))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({request, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not request.done():  # stopping: a poll cut short takes nothing (the dispatcher sees us gone)
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await request
            return []
        response = request.result()
        if response.status_code == 204:
            return []
        if response.status_code in (401, 403, 404):
            raise AgentRefused(
                f"the dispatcher refused this agent: {response.status_code} {response.text[:200]}"
            )
        if response.status_code != 200:
            raise httpx.TransportError(f"HTTP {response.status_code}: {response.text[:200]}")
        jobs: list[dict[str, Any]] = response.json()["jobs"]
        return jobs

    async def _start(self, raw: dict[str, Any]) -> None:
        """Start one job as POST /embed would, or fail it by callback with what /embed would answer."""
        try:
            job = EmbedRequest.model_validate(raw)
        except ValidationError as exc:
            log.error("malformed job from the dispatcher: %s", exc, extra={"action": "bad_job"})
            return  # nothing trustworthy to call back to; the lease settles it
        if job.callback_url is None or job.callback_token is None:
            log.error("job %s without a callback URL", job.task_id, extra={"action": "bad_job"})
            return
        try:
            texts = read_inputs(job.data, self.service.settings.max_inputs)
            hold = read_hold(job.data, self.service.settings.max_hold_seconds)
        except HTTPException as exc:
            failed = {"task_id": job.task_id, "status": "failed", "error": str(exc.detail)}
            await self.service.callbacks.deliver(job.callback_url, job.callback_token, failed)
            return
        try:
            self.service.take_slot()
        except HTTPException:  # more jobs than slots: the dispatcher's bug, never ours to hide
            log.error(
                "job %s beyond our slots; asking for a retry", job.task_id, extra={"action": "oversubscribed"}
            )
            body: dict[str, Any] = {"task_id": job.task_id, "status": "failed", "error": "all slots busy"}
            body["retry"] = True
            await self.service.callbacks.deliver(job.callback_url, job.callback_token, body)
            return
        self.service.start_job(job, texts, hold)
