"""``POST /agents/{gpu_id}/jobs``: the long poll of a pull GPU's agent (SPEC §9; ``loop/agents.py``).

Answers: 200 ``{"jobs": [...]}`` (each exactly the body a pushed GPU receives), 204 when none came within
``wait_seconds``; 401 missing or wrong agent token, whatever GPU the path names (a caller without a valid
token learns nothing of which GPUs exist); 403 the token of another GPU; 404 a valid token and a GPU that
does not exist; 422 a malformed body, naming the field; 429 when the GPU already holds
``MAX_POLLS_PER_GPU`` polls waiting here. ``max: 0`` takes nothing and answers 204 at once:
an agent whose slots are all busy keeps itself in rotation with it (``AGENT_STALE_SECONDS``).
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from dispatcher.errors import (
    BadInput,
    Forbidden,
    NotFound,
    TooMany,
    Unauthorized,
    responses,
    validation_error,
)
from dispatcher.gpus.pull import TOKEN_PREFIX
from dispatcher.http.callback import bearer
from dispatcher.loop.agents import MAX_WAIT_SECONDS
from dispatcher.loop.core import Dispatcher

router = APIRouter()

_JSON = "application/json"
#: Jobs one answer may carry at most (a GPU's slots are at most 1024).
MAX_JOBS = 1024


class PollIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max: StrictInt = Field(
        default=1, ge=0, le=MAX_JOBS, description="jobs to take at most; 0: only say the agent is alive"
    )
    wait_seconds: float = Field(
        default=0,
        ge=0,
        le=MAX_WAIT_SECONDS,
        strict=True,
        description="how long to wait for a job (long poll)",
    )


class JobOut(BaseModel):
    task_id: str
    type: str
    data: Any
    attempt: int
    callback_url: str
    callback_token: str


class PollOut(BaseModel):
    jobs: list[JobOut]


def _plausible(token: str) -> bool:
    """Could this be an agent token? Anything else is refused before the database is asked."""
    return token.startswith(TOKEN_PREFIX) and len(token) <= 128 and token.isascii()


def agent_token(authorization: Annotated[str | None, Header()] = None) -> str:
    """A dependency: checked before the body is read (``_poll_body``): no token, no say about the body."""
    token = bearer(authorization)
    if token is None or not _plausible(token):
        raise Unauthorized("missing or wrong agent token")
    return token


async def _poll_body(request: Request) -> PollIn:
    """The body, read only once the token passed (a body parameter is read and parsed before any
    dependency runs: a caller with no token got 422s about its body, and its 8 MiB were parsed). An empty
    body takes the defaults."""
    raw = await request.body()
    try:
        data = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"body: not valid JSON: {exc}") from None
    try:
        return PollIn.model_validate(data)
    except ValidationError as exc:
        raise validation_error(
            exc.errors(include_url=False, include_context=False, include_input=False)
        ) from None


@router.post(
    "/agents/{gpu_id}/jobs",
    response_model=PollOut,
    openapi_extra={
        "requestBody": {"required": False, "content": {_JSON: {"schema": PollIn.model_json_schema()}}}
    },
    responses={
        204: {"description": "no job came within wait_seconds"},
        **responses(
            Unauthorized,
            Forbidden,
            NotFound,
            BadInput,
            TooMany,
            e401="missing or wrong agent token",
            e403="the agent token of another GPU",
            e404="no such GPU (asked with a valid agent token)",
            e422="malformed body; the detail names the field",
            e429="this GPU already holds MAX_POLLS_PER_GPU (16) long polls waiting in this process",
        ),
    },
)
async def agent_jobs(
    request: Request,
    gpu_id: Annotated[str, Path(max_length=64)],
    token: Annotated[str, Depends(agent_token)],
) -> Response:
    """A pull GPU's agent takes the jobs placed on its slots, waiting up to ``wait_seconds`` (≤ 30) for
    some. It calls back, heartbeats and learns of cancels (409 to a heartbeat) as a pushed GPU does."""
    body = await _poll_body(request)
    d: Dispatcher = request.app.state.dispatcher
    look, jobs = await d.agents.poll(
        gpu_id, token, max_jobs=body.max, wait=float(body.wait_seconds), gone=request.is_disconnected
    )
    if look.status == "unauthenticated":
        raise Unauthorized("missing or wrong agent token")
    if look.status == "forbidden":
        raise Forbidden(f"this agent token is not GPU {gpu_id}'s")
    if look.status == "unknown":
        raise NotFound(f"no GPU named {gpu_id}")
    if not jobs:
        return Response(status_code=204)
    return Response(orjson.dumps({"jobs": jobs}), media_type=_JSON)
