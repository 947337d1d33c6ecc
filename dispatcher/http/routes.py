"""Routes: task and GPU views, health and metrics (the callback has its own module)."""

from __future__ import annotations

import hmac
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import generate_latest
from pydantic import BaseModel
from redis.exceptions import RedisError

from dispatcher.db.engine import StoreUnavailable
from dispatcher.db.gpus import list_gpus
from dispatcher.db.overview import open_tasks
from dispatcher.db.reads import get_task
from dispatcher.errors import ErrorBody, NotFound, Unauthorized, Unavailable, responses
from dispatcher.gpus.same_service import shown_url
from dispatcher.http.callback import bearer
from dispatcher.loop.core import Dispatcher
from dispatcher.queues.event_hub import EventHub
from dispatcher.queues.queue_view import Plan, ping, read_async
from dispatcher.queues.reprioritize import find_waiting_async

log = logging.getLogger("gpuq.http")
router = APIRouter()


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


def get_hub(request: Request) -> EventHub:
    """The process's one event subscription (dispatcher/queues/event_hub.py), on a Redis client of its own."""
    hub: EventHub = request.app.state.hub
    return hub


H = Annotated[EventHub, Depends(get_hub)]


#: The body of every error answer (its old name here; dispatcher/errors.py has it).
Detail = ErrorBody


def bearer_is(authorization: str | None, expected: str) -> bool:
    """The request's Bearer token is ``expected`` (compared in constant time)."""
    return hmac.compare_digest((bearer(authorization) or "").encode(), expected.encode())


def api_auth(d: D, authorization: Annotated[str | None, Header()] = None) -> None:
    """``/tasks`` and ``/gpus`` need ``Authorization: Bearer <API_TOKEN>`` when API_TOKEN is set."""
    expected = d.settings.api_secret
    if expected is not None and not bearer_is(authorization, expected):
        raise Unauthorized("missing or wrong API token")


@router.get(
    "/tasks/{task_id}",
    dependencies=[Depends(api_auth)],
    responses=responses(NotFound),
)
async def task(task_id: str, d: D) -> dict[str, Any]:
    """The task as recorded; a job still waiting in Redis (no row yet) answers ``queued`` with its list and
    position there."""
    found = await find_task(d, task_id)
    if found is None:
        raise NotFound(f"unknown task {task_id!r} (not in the database nor waiting in Redis)")
    return found


async def find_task(d: Dispatcher, task_id: str) -> dict[str, Any] | None:
    """The task as recorded, else as it waits in Redis (``queued``), else None.

    The database is read again after Redis: a job leaves Redis (its processing list) only once its row is
    committed, so a job recorded between the first read and the Redis look is found by the second read
    instead of looking unknown (404) for that instant."""
    found = await d.db(get_task, task_id=task_id)
    if found is None:
        s = d.settings
        pools = sorted(set(s.routes.values()) | {"default"})
        found = await find_waiting_async(
            d.redis, keys=d.keys, task_id=task_id, queues=s.all_queues, pools=pools
        )
    if found is None:
        found = await d.db(get_task, task_id=task_id)
    return found


@router.get("/gpus", dependencies=[Depends(api_auth)], response_model=list[GpuOut])
async def gpus(d: D) -> list[GpuOut]:
    return [
        GpuOut.model_validate(row, from_attributes=True).model_copy(update={"url": shown_url(row.url)})
        for row in await d.db(list_gpus)
    ]


class Failing(ErrorBody):
    """/healthz's 503: the error body, with the ``status`` and ``error`` a liveness probe's log shows."""

    status: str
    error: str


class NotReady(ErrorBody):
    """/readyz's 503: the error body, with each store that is down (``problems``)."""

    status: str
    problems: dict[str, str]


@router.get("/healthz", responses={503: {"model": Failing, "description": "a part of the dispatcher died"}})
async def healthz(d: D) -> JSONResponse:
    if d.fatal is not None:
        error = str(d.fatal)
        extra = {"status": "failing", "error": error}
        raise Unavailable(f"a part of the dispatcher died: {error}", code="failing", extra=extra)
    return JSONResponse({"status": "ok", "dispatcher_id": d.settings.dispatcher_id})


#: How long /readyz says not ready after a callback found a store failing.
STORE_TROUBLE_SECONDS = 5.0


@router.get(
    "/readyz", responses={503: {"model": NotReady, "description": "Redis or the database is unreachable"}}
)
async def readyz(d: D, hub: H) -> JSONResponse:
    """Names the store that is down, never its error text (which tells a stranger hosts, ports and users);
    the error goes to the log."""
    problems = {}
    try:
        await ping(hub.redis)
    except (RedisError, OSError) as exc:
        problems["redis"] = "unreachable"
        log.warning("not ready", extra={"action": "readyz", "store": "redis", "error": str(exc)})
    try:
        if not await d.rt.db_watch.answers(
            lambda: d.db(lambda conn: conn.exec_driver_sql("SELECT 1").scalar())
        ):
            # hung, not refusing: a probe that waited with it left Kubernetes' probes unanswered
            problems["database"] = "not answering"
            log.warning(
                "not ready",
                extra={
                    "action": "readyz",
                    "store": "database",
                    "error": "not answering",
                    "waited_s": round(d.rt.db_watch.waiting(), 1),
                },
            )
    except (StoreUnavailable, OSError) as exc:
        problems["database"] = "unreachable"
        log.warning("not ready", extra={"action": "readyz", "store": "database", "error": str(exc)})
    at, store = d.rt.store_failed
    if store and store not in problems and time.monotonic() - at < STORE_TROUBLE_SECONDS:
        problems[store] = "failing callbacks"  # reachable from here, not from where callbacks need it
    if problems:
        down = " and ".join(f"{store} {what}" for store, what in problems.items())
        extra = {"status": "not ready", "problems": problems | d.warnings}
        raise Unavailable(f"not ready: {down}", code="not_ready", extra=extra)
    # A setting that is wrong but leaves this process working (SLOTS_PER_GPU unlike the fleet's): ready.
    return JSONResponse({"status": "ready", "problems": d.warnings} if d.warnings else {"status": "ready"})


def metrics_auth(d: D, authorization: Annotated[str | None, Header()] = None) -> None:
    """``/metrics`` needs ``Authorization: Bearer <METRICS_TOKEN>`` when METRICS_TOKEN is set (Prometheus:
    ``authorization: {credentials: ...}``); open otherwise, as scrapers expect."""
    expected = d.settings.metrics_token
    if expected and expected.get_secret_value() and not bearer_is(authorization, expected.get_secret_value()):
        raise Unauthorized("missing or wrong metrics token")


@router.get(
    "/metrics",
    # Response (no media type of its own): the 200 is the Prometheus text declared below, and the error
    # answers are declared as the JSON they are (a text/plain route would have them documented as text)
    response_class=Response,
    dependencies=[Depends(metrics_auth)],
    responses={
        200: {"description": "Prometheus text", "content": {"text/plain": {"schema": {"type": "string"}}}},
        **responses(Unauthorized, e401="missing or wrong METRICS_TOKEN (when set)"),
    },
)
async def metrics(d: D, hub: H) -> PlainTextResponse:
    m = d.metrics
    try:
        gpus = await d.db(list_gpus)
        for row in gpus:
            m.slots_busy.labels(row.gpu_id, row.pool).set(row.busy)
            m.slots_total.labels(row.gpu_id, row.pool).set(row.slots)
            m.gpu_healthy.labels(row.gpu_id, row.pool).set(1 if row.healthy and row.state == "active" else 0)
        current = {(row.gpu_id, row.pool) for row in gpus}
        for gone in m.gpu_labels - current:  # removed (or moved to another pool) since the last scrape
            for gauge in (m.slots_busy, m.slots_total, m.gpu_healthy):
                gauge.remove(*gone)
        m.gpu_labels = current
        for state, count in (await d.db(open_tasks)).items():
            m.tasks.labels(state).set(count)
        pools = sorted({g.pool for g in gpus} | set(d.settings.routes.values()) | {"default"})
        view = await read_async(
            hub.redis, Plan(d.keys, d.settings.all_queues, pools), d.handoffs.buffer.held()
        )
        for q in view.queues:
            m.queue_depth.labels(q.queue, q.priority).set(q.depth)
            m.queue_oldest.labels(q.queue, q.priority).set(q.oldest_age or 0)
        for pool, count in view.parked.items():
            m.parked.labels(pool).set(count)
        m.dead_letter_jobs.set(view.dead)
    except (StoreUnavailable, RedisError) as exc:
        log.warning("metrics gauges stale", extra={"action": "metrics", "error": str(exc)})
    return PlainTextResponse(generate_latest(m.registry).decode(), media_type="text/plain; version=0.0.4")
