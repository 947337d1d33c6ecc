"""``POST /v1/embeddings`` (OpenAI-compatible) and ``GET /tasks/{id}/result``.

A request is one task. Its handler subscribes to the task's event channel (``Keys.task_events``) *before*
pushing the job, so the end cannot slip by unseen, pushes it with the producer's script (atomic, with its
idempotency mark), then waits for ``finished`` or ``failed`` up to ``wait_seconds`` without touching the
database; only at the deadline, or after a ``cancelled``, is the task read once (an event lost while Redis
was away shows there). A task still waiting or running by then is answered 202 with its ``result_url``.

Routing: the task type is the request's ``model`` when ``TASK_ROUTES`` routes that name (a model with a pool
of its own), else ``embed``; the type's route then picks the queue and pool as for any job. The task's data
is ``{"input": [texts], "openai": {"model": <model>}}``: what the GPU service needs, and what ``/result``
needs to answer in OpenAI's shape later. Results are served until ``RESULT_TTL_SECONDS`` after the task ended.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from redis.exceptions import RedisError

from dispatcher.db.engine import StoreUnavailable
from dispatcher.db.reads import get_task
from dispatcher.errors import (
    BadInput,
    Conflict,
    Gone,
    GpuqError,
    NotFound,
    TooMany,
    Unauthorized,
    UpstreamFailed,
)
from dispatcher.http.openai_shapes import (
    NO_RETRY,
    EmbeddingsOut,
    EmbeddingsRequest,
    ErrorOut,
    OpenAIRoute,
    TaskPending,
    TaskResultOut,
    embeddings_body,
    pending_body,
)
from dispatcher.http.routes import D, H, bearer_is
from dispatcher.loop.core import Dispatcher
from dispatcher.queues.event_hub import RETRY_AFTER_SECONDS, EventHub, HubFull, Listener
from dispatcher.queues.submit import push, pushed
from dispatcher.states import TERMINAL
from producer.errors import InvalidJob
from producer.job import TaskIn, build_job

log = logging.getLogger("gpuq.http")
router = APIRouter(route_class=OpenAIRoute)

#: The task type of embeddings requests whose model has no route of its own.
DEFAULT_TYPE = "embed"


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorOut, "description": f"{description} (with OpenAI's error object)"}


_PENDING = {"model": TaskPending, "description": "not ended yet: the task id and its result_url"}
_COMMON: dict[int | str, dict[str, Any]] = {
    401: _error("missing or wrong API key, when API_TOKEN is set"),
    409: _error("the task was cancelled"),
    422: _error("invalid request"),
    502: _error("the task failed (its error), or its result holds no embeddings"),
    503: _error("Redis or the database is unavailable; try again"),
}


def openai_auth(d: D, authorization: Annotated[str | None, Header()] = None) -> None:
    """OpenAI clients send their ``api_key`` as a bearer token: it must be API_TOKEN when that is set."""
    expected = d.settings.api_secret
    if expected is not None and not bearer_is(authorization, expected):
        raise Unauthorized(
            "missing or wrong API key (Authorization: Bearer <API_TOKEN>)", code="invalid_api_key"
        )


def task_type_for(model: str, routes: dict[str, str]) -> str:
    return model if model in routes else DEFAULT_TYPE


@router.post(
    "/v1/embeddings",
    dependencies=[Depends(openai_auth)],
    responses={
        200: {"model": EmbeddingsOut},
        202: _PENDING,
        429: _error("EVENT_LISTENERS_MAX streams and waits are open; try after Retry-After"),
        **_COMMON,
    },
)
async def embeddings(body: EmbeddingsRequest, d: D, hub: H) -> Response:
    """Embed ``input`` on a GPU service through the queue; answers once the task ends, or 202."""
    texts = body.texts
    task_id = f"emb-{uuid.uuid4().hex}"
    data = {"input": texts, "openai": {"model": body.model}}
    try:
        async with hub.listen(task_id) as events:
            await _enqueue(d, hub, task_id, task_type_for(body.model, d.settings.routes), data)
            task = await _wait(d, events, task_id, body.wait_seconds)
    except HubFull as exc:
        raise TooMany(
            f"{exc}; try again later", retry_after=RETRY_AFTER_SECONDS, code="rate_limit_exceeded"
        ) from None
    # OpenAI's body has no place for the task id; operators want it, on an error answer too
    try:
        answer = _answer(task_id, task, model=body.model, texts=texts, encoding_format=body.encoding_format)
    except GpuqError as err:
        err.headers["X-Gpuq-Task-Id"] = task_id
        raise
    answer.headers["X-Gpuq-Task-Id"] = task_id
    return answer


@router.get(
    "/tasks/{task_id}/result",
    dependencies=[Depends(openai_auth)],
    responses={
        200: {
            "model": EmbeddingsOut | TaskResultOut,
            "description": "OpenAI's embeddings list for a /v1/embeddings task, else the task's result",
        },
        202: _PENDING,
        404: _error("unknown task"),
        410: _error("the task ended more than RESULT_TTL_SECONDS ago"),
        **_COMMON,
    },
)
async def task_result(
    task_id: str, d: D, hub: H, encoding_format: Literal["float", "base64"] = "float"
) -> Response:
    """A task's result while it is fresh; 202 while the task waits or runs."""
    task = await d.db(get_task, task_id=task_id)
    if task is None:
        # Pushed but not yet taken by a dispatcher: the push's idempotency mark says it exists.
        if await pushed(hub.redis, d.keys, d.settings.all_queues, f"task:{task_id}"):
            return JSONResponse(pending_body(task_id, None), status_code=202)
        raise NotFound(f"unknown task {task_id!r}", code="task_not_found")
    if task["finished_at"] and _expired(task["finished_at"], d):
        raise Gone(
            f"the result of task {task_id!r} has expired (kept {d.settings.result_ttl_seconds:g} s)",
            code="result_expired",
            headers=NO_RETRY,
        )
    data = task["data"] or {}
    meta = data.get("openai")
    if not isinstance(meta, dict) and task["state"] == "finished":
        # Not an embeddings task: its result as the GPU service gave it.
        return JSONResponse(
            {"id": task_id, "object": "task.result", "type": task["type"], "result": task["result"]}
        )
    model = str(meta.get("model", "")) if isinstance(meta, dict) else ""
    given = data.get("input")
    texts = [str(t) for t in given] if isinstance(given, list) else [str(given or "")]
    return _answer(task_id, task, model=model, texts=texts, encoding_format=encoding_format)


async def _enqueue(d: Dispatcher, hub: EventHub, task_id: str, task_type: str, data: dict[str, Any]) -> None:
    try:
        task = TaskIn(type=task_type, data=data, task_id=task_id)
        job = build_job(
            task,
            default_queue=d.settings.queues[0],
            routes=d.settings.routes,
            max_bytes=d.settings.max_job_bytes,
        )
    except (ValidationError, InvalidJob) as exc:
        raise BadInput(f"cannot enqueue this request: {exc}") from None
    await push(
        hub.redis, d.keys, job, idempotency_key=f"task:{task_id}", ttl=d.settings.idempotency_ttl_seconds
    )
    if d.settings.redis_wait_replicas:
        # Not acknowledged before replicas hold it; NotReplicated is a RedisError, answered as Redis trouble.
        await d.intake.fence(job.queue)


async def _wait(d: Dispatcher, events: Listener, task_id: str, seconds: float) -> dict[str, Any] | None:
    """The task once it has ended, or as the database has it at the deadline (None: not yet taken).

    The job is in the queue by now: a store failing from here on must not become a 503, which clients
    retry by sending the request (a second task) again; the caller gets 202 and the result_url instead.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        while (left := deadline - loop.time()) > 0:
            ev = await events.next(left)
            if ev is None:
                break
            if ev["event"] in ("finished", "failed"):
                return {"state": ev["event"], "result": ev.get("result"), "error": ev.get("error")}
            if ev["event"] == "cancelled":
                break
    except (RedisError, OSError) as exc:
        log.warning("task events unavailable", extra={"action": "openai_wait", "error": str(exc)})
    try:
        return await d.db(get_task, task_id=task_id)
    except StoreUnavailable as exc:
        log.warning("task not readable", extra={"action": "openai_wait", "error": str(exc)})
        return None


def _answer(
    task_id: str, task: dict[str, Any] | None, *, model: str, texts: list[str], encoding_format: str
) -> Response:
    state = task["state"] if task else None
    if task is None or state not in TERMINAL:
        return JSONResponse(
            pending_body(task_id, state), status_code=202, headers={"Location": f"/tasks/{task_id}/result"}
        )
    if state == "failed":
        error = task.get("error")
        raise UpstreamFailed(f"task {task_id} failed: {error}", code="task_failed", headers=NO_RETRY)
    if state == "cancelled":
        raise Conflict(f"task {task_id} was cancelled", code="task_cancelled", headers=NO_RETRY)
    body = embeddings_body(task.get("result"), model=model, texts=texts, encoding_format=encoding_format)
    if body is None:
        raise UpstreamFailed(
            f"task {task_id} finished, but its result holds no embeddings for the {len(texts)} inputs",
            code="bad_result",
            headers=NO_RETRY,
        )
    return JSONResponse(body)


def _expired(finished_at: str, d: Dispatcher) -> bool:
    ended = datetime.fromisoformat(finished_at.removesuffix("Z"))
    return d.now() - ended > timedelta(seconds=d.settings.result_ttl_seconds)
