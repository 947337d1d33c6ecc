"""The HTTP side of the reference GPU service, following SPEC §4.

    POST /embed   Authorization: Bearer <BEARER_TOKEN>
                  {"task_id", "type", "data": {"input": "text" | ["text", ...], "hold_seconds"?}, "attempt",
                   "callback_url", "callback_token"}
        401  missing or wrong bearer token       -> the dispatcher fails the task (retrying cannot help)
        422  malformed body                      -> idem
        400  data.input missing, empty or not text -> idem
             (or data.hold_seconds beyond --max-hold-seconds: a job that keeps its slot at least that long,
             heartbeating, so tests and demos can outlast a lease on any hardware; off by default)
        429  all slots busy                      -> the dispatcher frees its slot and retries later
        202  accepted: the embeddings come by callback, with "status": "running" heartbeats meanwhile
        200  {"status": "finished", "result": ...} at once when the request has no callback_url, or the
             service runs with --sync (the dispatcher completes the task from the answer)
    POST /embed/cancel  {"task_id", "attempt"} (same Bearer): stop that job and send no callback for it;
        200 {"cancelled": true|false} once it no longer runs (false: it had ended, or never came), 409 while
        a batch already on the device is still finishing (the dispatcher asks again)
    GET /embed, /healthz   what runs here and how busy it is (the dispatcher probes a GPU with a GET)

A slot is held from the 202 until the inference ends, and freed *before* the callback is sent: the dispatcher
frees its slot the moment the callback arrives and may send the next job at once, which must not meet a 429.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Protocol
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator, model_validator

from reference.callback import Callbacks

log = logging.getLogger("reference.service")


class Model(Protocol):
    """What the service needs from a model (see reference/model.py)."""

    name: str
    dim: int
    device: str

    def embed(self, texts: list[str]) -> list[list[float]]: ...
    def is_transient(self, exc: BaseException) -> bool: ...


@dataclass(frozen=True)
class ServiceSettings:
    bearer_token: str
    slots: int = 4  # the dispatcher's SLOTS_PER_GPU: it never sends more, a 5th is refused with 429
    heartbeat_seconds: float = 10.0  # keep well below the dispatcher's TASK_TIMEOUT_SECONDS
    max_inputs: int = 256
    sync: bool = False
    shutdown_grace_seconds: float = 30.0
    max_hold_seconds: float = 0.0  # data.hold_seconds allowed up to this; 0: jobs may not ask for a hold
    pull: bool = False  # a pull agent (reference/agent.py): a heartbeat answered 409 stops the job


class EmbedRequest(BaseModel):
    task_id: str = Field(min_length=1, max_length=255)
    type: str
    data: dict[str, Any]
    attempt: int = Field(default=1, ge=1)
    callback_url: str | None = None
    callback_token: str | None = None

    @field_validator("callback_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("callback_url must be an http(s) URL")
        return value

    @model_validator(mode="after")
    def _token_with_url(self) -> EmbedRequest:
        if self.callback_url and not self.callback_token:
            raise ValueError("callback_token is required with callback_url")
        return self


def read_hold(data: dict[str, Any], max_hold_seconds: float) -> float:
    """``data.hold_seconds``: how long the job keeps its slot at least (a fast model must not make a lease
    test pass or fail by luck); refused beyond what the operator allowed, so no caller can pin slots."""
    hold = data.get("hold_seconds", 0)
    if isinstance(hold, bool) or not isinstance(hold, int | float) or not 0 <= hold <= max_hold_seconds:
        raise HTTPException(400, f"data.hold_seconds must be a number from 0 to {max_hold_seconds}")
    return float(hold)


def read_inputs(data: dict[str, Any], max_inputs: int) -> list[str]:
    """``data.input``: one text or a list of texts; anything else is the caller's mistake (400)."""
    raw = data.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts:
        raise HTTPException(400, "data.input must be a non-empty string or a non-empty list of strings")
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise HTTPException(400, "every item of data.input must be a non-empty string")
    if len(texts) > max_inputs:
        raise HTTPException(400, f"data.input has {len(texts)} texts; at most {max_inputs} per job")
    return texts


class CancelRequest(BaseModel):
    task_id: str = Field(min_length=1, max_length=255)
    attempt: int = Field(ge=1)


#: How long a cancel waits for a batch already on the device to finish before answering 409.
CANCEL_WAIT_SECONDS = 10.0


class EmbedService:
    """Slots, the inference thread and the background jobs of one running service."""

    def __init__(self, model: Model, settings: ServiceSettings, callbacks: Callbacks) -> None:
        self.model = model
        self.settings = settings
        self.callbacks = callbacks
        self.busy = 0
        self.jobs: set[asyncio.Task[None]] = set()
        self.running: dict[tuple[str, int], asyncio.Task[None]] = {}
        self.cancelled: set[tuple[str, int]] = set()
        # One thread: one batch at a time on the device. Jobs beyond the first wait here, holding their slot.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.slot_freed = asyncio.Event()  # a pull agent waits on it to ask for more jobs

    def take_slot(self) -> None:
        if self.busy >= self.settings.slots:
            raise HTTPException(429, f"all {self.settings.slots} slots busy", headers={"Retry-After": "1"})
        self.busy += 1

    async def infer(self, job: EmbedRequest, texts: list[str], hold: float = 0.0) -> dict[str, Any]:
        """The callback body for ``job``; frees the job's slot once the model is done with it, and not
        before ``hold`` seconds."""
        started = time.perf_counter()
        try:
            loop = asyncio.get_running_loop()
            vectors = await loop.run_in_executor(self._executor, self.model.embed, texts)
            await asyncio.sleep(hold - (time.perf_counter() - started))
        except Exception as exc:
            log.exception("inference failed for %s", job.task_id, extra={"action": "inference_failed"})
            return {
                "task_id": job.task_id,
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}",
                "retry": self.model.is_transient(exc),
            }
        finally:
            self.busy -= 1
            self.slot_freed.set()
        seconds = time.perf_counter() - started
        log.info(
            "embedded %d texts for %s in %.3f s",
            len(texts),
            job.task_id,
            seconds,
            extra={"action": "embedded", "task_id": job.task_id, "texts": len(texts), "seconds": seconds},
        )
        result = {"embeddings": vectors, "model": self.model.name, "dim": self.model.dim}
        return {"task_id": job.task_id, "status": "finished", "result": result}

    def start_job(self, job: EmbedRequest, texts: list[str], hold: float = 0.0) -> None:
        task = asyncio.create_task(self._run(job, texts, hold), name=f"job-{job.task_id}")
        self.jobs.add(task)  # owned until done: never garbage-collected mid-run, awaited at stop
        key = (job.task_id, job.attempt)
        self.running[key] = task

        def done(t: asyncio.Task[None]) -> None:
            self.jobs.discard(t)
            if self.running.get(key) is t:
                del self.running[key]
            self.cancelled.discard(key)

        task.add_done_callback(done)

    async def cancel(self, task_id: str, attempt: int) -> bool:
        """Stop a job: no callback will be sent for it. True once it stopped, False when it was not running.
        A batch already handed to the device cannot be interrupted: the answer waits for it to end."""
        key = (task_id, attempt)
        task = self.running.get(key)
        if task is None:
            return False
        self.cancelled.add(key)
        await asyncio.wait({task}, timeout=CANCEL_WAIT_SECONDS)
        if not task.done():
            raise HTTPException(
                409, f"job {task_id} attempt {attempt} is still finishing its batch; ask again"
            )
        log.info("cancelled %s", task_id, extra={"action": "cancelled", "task_id": task_id})
        return True

    async def _run(self, job: EmbedRequest, texts: list[str], hold: float) -> None:
        assert job.callback_url is not None
        assert job.callback_token is not None
        key = (job.task_id, job.attempt)
        beats = asyncio.create_task(
            self._heartbeats(job.callback_url, job.callback_token, job.task_id, job.attempt)
        )
        try:
            body = await self.infer(job, texts, hold)
        except asyncio.CancelledError:
            if key not in self.cancelled:  # the service is stopping
                raise
        finally:
            beats.cancel()
        if key in self.cancelled:
            if self.settings.pull:
                # Stopped after a heartbeat was answered 409: a final callback says so; the dispatcher
                # answers it 409 too, and frees the slot (a pushed service confirms by answering the cancel).
                stopped = {"task_id": job.task_id, "status": "failed", "error": "cancelled"}
                await self.callbacks.deliver(job.callback_url, job.callback_token, stopped)
            return  # the dispatcher asked us to stop: it frees the slot on our answer to the cancel
        await self.callbacks.deliver(job.callback_url, job.callback_token, body)

    async def _heartbeats(self, url: str, token: str, task_id: str, attempt: int) -> None:
        """Long batches only: the first beat goes out after one interval, so short jobs send none."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            status = await self.callbacks.heartbeat(url, token, task_id)
            if status is not None and 400 <= status < 500:
                log.warning(
                    "heartbeat for %s answered %d: the dispatcher no longer waits for this attempt",
                    task_id,
                    status,
                    extra={"action": "heartbeat_refused", "task_id": task_id},
                )
                if self.settings.pull and status == 409:
                    # How a pull GPU learns of a cancel (SPEC §9): stop the job (a hold is cut short; a
                    # batch already on the device ends there, its result dropped), then confirm (_run).
                    key = (task_id, attempt)
                    self.cancelled.add(key)
                    job = self.running.get(key)
                    if job is not None:
                        log.info("cancelled %s", task_id, extra={"action": "cancelled", "task_id": task_id})
                        job.cancel()
                return

    async def stop(self) -> None:
        """Let running jobs finish and call back (up to the grace period), so a restart loses no result."""
        if self.jobs:
            log.info("waiting for %d jobs", len(self.jobs), extra={"action": "draining"})
            await asyncio.wait(set(self.jobs), timeout=self.settings.shutdown_grace_seconds)
        for task in set(self.jobs):
            task.cancel()
        await self.callbacks.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


def get_service(request: Request) -> EmbedService:
    service: EmbedService = request.app.state.service
    return service


Service = Annotated[EmbedService, Depends(get_service)]


def create_app(model: Model, settings: ServiceSettings, callbacks: Callbacks | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = EmbedService(model, settings, callbacks or Callbacks())
        app.state.service = service
        yield
        await service.stop()

    app = FastAPI(title="gpuq reference GPU service: sentence embeddings", lifespan=lifespan)

    def require_bearer(authorization: Annotated[str | None, Header()] = None) -> None:
        # A dependency runs before the body is validated: a caller without the token learns nothing more.
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), settings.bearer_token.encode()
        ):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.post("/embed", status_code=202, dependencies=[Depends(require_bearer)])
    async def embed(job: EmbedRequest, service: Service) -> JSONResponse:
        texts = read_inputs(job.data, settings.max_inputs)
        hold = read_hold(job.data, settings.max_hold_seconds)
        service.take_slot()
        if settings.sync or job.callback_url is None:
            return JSONResponse(await service.infer(job, texts, hold), status_code=200)
        service.start_job(job, texts, hold)
        return JSONResponse({"task_id": job.task_id, "status": "accepted"}, status_code=202)

    @app.post("/embed/cancel", dependencies=[Depends(require_bearer)])
    async def cancel(body: CancelRequest, service: Service) -> dict[str, Any]:
        stopped = await service.cancel(body.task_id, body.attempt)
        return {"task_id": body.task_id, "attempt": body.attempt, "cancelled": stopped}

    @app.get("/embed")
    @app.get("/healthz")
    async def status(service: Service) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model.name,
            "dim": model.dim,
            "device": model.device,
            "slots": settings.slots,
            "busy": service.busy,
        }

    return app
