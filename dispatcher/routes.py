"""Routes: callbacks from GPU services, task and GPU views, health and metrics."""

from __future__ import annotations

import hmac
import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import generate_latest
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from dispatcher.core import Dispatcher
from dispatcher.db.engine import StoreUnavailable
from dispatcher.db.gpus import list_gpus
from dispatcher.db.reads import get_task
from dispatcher.states import Outcome
from dispatcher.tokens import verify_token

log = logging.getLogger("gpuq.http")
router = APIRouter()


class CallbackIn(BaseModel):
    """What a GPU service posts to ``CALLBACK_URL`` (SPEC §4)."""

    model_config = ConfigDict(extra="allow")

    task_id: str = Field(min_length=1, max_length=255)
    status: Literal["finished", "failed", "running"]
    result: Any = None
    error: str | None = Field(default=None, max_length=65536)
    retry: bool = False


class CallbackOut(BaseModel):
    task_id: str
    state: str | None
    applied: bool


class GpuOut(BaseModel):
    gpu_id: str
    url: str
    pool: str
    state: str
    healthy: bool
    slots: int
    busy: int
    consecutive_failures: int
    last_error: str | None


def get_dispatcher(request: Request) -> Dispatcher:
    d: Dispatcher = request.app.state.dispatcher
    return d


D = Annotated[Dispatcher, Depends(get_dispatcher)]


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def api_auth(d: D, authorization: Annotated[str | None, Header()] = None) -> None:
    """``/tasks`` and ``/gpus`` need ``Authorization: Bearer <API_TOKEN>`` when API_TOKEN is set."""
    expected = d.settings.api_token
    if expected is None or not expected.get_secret_value():
        return
    given = bearer(authorization) or ""
    if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise HTTPException(401, "missing or wrong API token", headers={"WWW-Authenticate": "Bearer"})


@router.post(
    "/callback",
    response_model=CallbackOut,
    responses={401: {}, 404: {}, 409: {}, 413: {}, 422: {}, 503: {}},
)
async def callback(
    body: CallbackIn, d: D, authorization: Annotated[str | None, Header()] = None
) -> CallbackOut:
    token = bearer(authorization)
    attempt = verify_token(d.settings.secret, body.task_id, token) if token else None
    if attempt is None:
        d.metrics.callbacks.labels("401").inc()
        raise HTTPException(401, "missing or wrong callback token", headers={"WWW-Authenticate": "Bearer"})
    if body.status == "running":
        fin = await d.heartbeat(body.task_id, attempt)
    else:
        if body.status == "finished":
            outcome, reported = Outcome.FINISHED, "finished"
        elif body.retry:
            outcome, reported = Outcome.FAILED_RETRY, "failed_retry"
        else:
            outcome, reported = Outcome.FAILED, "failed"
        error = body.error if body.status == "failed" else None
        if body.status == "failed" and not error:
            error = "the GPU service reported failure"
        fin = await d.end_attempt(
            body.task_id, attempt, outcome, result=body.result, error=error, reported=reported
        )
    if fin.code == "unknown":
        d.metrics.callbacks.labels("404").inc()
        raise HTTPException(404, f"unknown task {body.task_id!r}")
    if fin.code == "stale":
        d.metrics.callbacks.labels("409").inc()
        raise HTTPException(
            409, f"attempt {attempt} of task {body.task_id!r} is no longer current (task is {fin.state})"
        )
    d.metrics.callbacks.labels("200").inc()
    return CallbackOut(task_id=body.task_id, state=fin.state, applied=fin.code == "applied")


@router.get("/tasks/{task_id}", dependencies=[Depends(api_auth)])
async def task(task_id: str, d: D) -> dict[str, Any]:
    found = await d.db(get_task, task_id=task_id)
    if found is None:
        raise HTTPException(
            404, f"unknown task {task_id!r} (not yet taken by a dispatcher, or never enqueued)"
        )
    return found


@router.get("/gpus", dependencies=[Depends(api_auth)], response_model=list[GpuOut])
async def gpus(d: D) -> list[GpuOut]:
    return [
        GpuOut(**row.__dict__)
        if hasattr(row, "__dict__")
        else GpuOut.model_validate(row, from_attributes=True)
        for row in await d.db(list_gpus)
    ]


@router.get("/healthz")
async def healthz(d: D) -> JSONResponse:
    if d.fatal is not None:
        return JSONResponse({"status": "failing", "error": str(d.fatal)}, status_code=503)
    return JSONResponse({"status": "ok", "dispatcher_id": d.settings.dispatcher_id})


@router.get("/readyz")
async def readyz(d: D) -> JSONResponse:
    problems = {}
    try:
        await d.redis.ping()
    except (RedisError, OSError) as exc:
        problems["redis"] = str(exc)
    try:
        await d.db(lambda conn: conn.exec_driver_sql("SELECT 1").scalar())
    except (StoreUnavailable, OSError) as exc:
        problems["database"] = str(exc)
    if problems:
        return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics")
async def metrics(d: D) -> PlainTextResponse:
    m = d.metrics
    try:
        for row in await d.db(list_gpus):
            m.slots_busy.labels(row.gpu_id, row.pool).set(row.busy)
            m.slots_total.labels(row.gpu_id, row.pool).set(row.slots)
            m.gpu_healthy.labels(row.gpu_id, row.pool).set(1 if row.healthy and row.state == "active" else 0)
        for name, depth in (await d.intake.depths()).items():
            m.queue_depth.labels(name).set(depth)
    except (StoreUnavailable, RedisError) as exc:
        log.warning("metrics gauges stale", extra={"action": "metrics", "error": str(exc)})
    return PlainTextResponse(generate_latest(m.registry).decode(), media_type="text/plain; version=0.0.4")
