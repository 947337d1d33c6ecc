"""``POST /callback``: the hottest route (one call per job).

Under load, FastAPI's middleware stack, dependency injection and body binding cost about six times the
handler itself (measured with py-spy: 35% of the dispatcher's CPU). So ``CallbackFastPath`` answers
``POST /callback`` as a plain ASGI app in front of FastAPI, and the FastAPI route below (same logic) is kept
for the OpenAPI document and for anyone mounting the app without the wrapper.
"""

from __future__ import annotations

import collections
import itertools
import logging
import operator
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import orjson
from fastapi import APIRouter, FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from dispatcher.db.attempts import Finish
from dispatcher.db.engine import StoreUnavailable
from dispatcher.errors import (
    STORE_DOWN,
    STORE_ERRORS,
    BadInput,
    Conflict,
    GpuqError,
    NotFound,
    TooLarge,
    Unauthorized,
    Unavailable,
    answer,
    responses,
    validation_error,
)
from dispatcher.gpus.tokens import token_shaped, verify_token
from dispatcher.http.callback_check import CHECK_OK, CHECK_TASK, SELF_CHECK
from dispatcher.http.edge_limits import BUSY, CALLBACK_BODIES
from dispatcher.http.refusals import refusals_of
from dispatcher.loop.core import Dispatcher
from dispatcher.queues.task_events import encode
from dispatcher.states import Outcome, TaskState

log = logging.getLogger("gpuq.http")
router = APIRouter()


class CallbackIn(BaseModel):
    """What a GPU service posts to ``CALLBACK_URL``."""

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


_ADAPTER = TypeAdapter(CallbackIn)
_JSON = "application/json"

#: A ``"task_id": "…"`` pair anywhere in a body: the ids a token may be checked against before parsing.
_TASK_ID = re.compile(rb'"task_id"\s*:\s*"((?:[^"\\]|\\.){1,1024})"')
#: A ``task_id`` among the body's leading top-level keys: the first key, or one after keys whose values are
#: plain strings, numbers, booleans or null (``{"status": "finished", "task_id": ...}``; no object or list
#: before it, so it cannot be a nested key). The callback's own id for sure, so its token can be checked
#: before the rest of the body has arrived.
_SCALAR = rb'(?:"(?:[^"\\]|\\.){0,1024}"|-?[0-9][0-9.eE+-]{0,64}|true|false|null)'
_LEADING_TASK_ID = re.compile(
    rb'\s*\{\s*(?:"(?:[^"\\]|\\.){0,64}"\s*:\s*'
    + _SCALAR
    + rb'\s*,\s*){0,16}"task_id"\s*:\s*"((?:[^"\\]|\\.){1,1024})"'
)
#: While a body is arriving, its start is looked at for a leading ``task_id`` once it reaches each of these
#: sizes (and at its end): a handful of looks at most, however it is cut into chunks.
_LEAD_LOOKS = tuple(1024 << i for i in range(9))  # 1 KiB .. 256 KiB
#: Candidates checked from each end of the body (the first distinct ones, the last ones found). A legitimate
#: callback's own ``task_id`` is a top-level key, so it comes before or after a ``result`` listing many task
#: ids. Parsing the body past 64 distinct candidates (as was done) let any forged callback carrying 65 decoy
#: ids be parsed in full again.
_MAX_CANDIDATES = 64
#: A body this small is parsed even when no task id was found in it, for its detailed 422.
_SMALL_BODY = 64 * 1024
#: Bytes looked at from each end of a bigger body: a forged 8 MiB callback costs the regex 512 KiB, not 8 MiB.
#: A callback's own ``task_id`` is a top-level key, so it sits before or after the (maybe huge) result.
_WINDOW = 256 * 1024
_UNAUTHORIZED = answer(Unauthorized("missing or wrong callback token"))
_SELF_CHECK = SELF_CHECK.encode()


def _claimed_ids(raw: bytes) -> set[str]:
    """The task ids the body may speak for, found without parsing it: the first ``_MAX_CANDIDATES``
    distinct ones and the last ``_MAX_CANDIDATES`` found (one pass; the tail kept by a bounded deque fed
    at C speed, as a stuffed body has hundreds of thousands of matches). Of a body over two ``_WINDOW``
    only the first and last ``_WINDOW`` bytes are looked at."""
    view = memoryview(raw)
    matches = _TASK_ID.finditer(view if len(view) <= 2 * _WINDOW else view[:_WINDOW])
    first: dict[bytes, None] = {}
    for match in itertools.islice(matches, 16 * _MAX_CANDIDATES):
        first[match.group(1)] = None
        if len(first) >= _MAX_CANDIDATES:
            break
    if len(view) > 2 * _WINDOW:
        matches = _TASK_ID.finditer(view[-_WINDOW:])
    last = collections.deque(map(operator.methodcaller("group", 1), matches), maxlen=_MAX_CANDIDATES)
    ids = set()
    for value in {*first, *last}:
        try:
            ids.add(orjson.loads(b'"' + value + b'"'))
        except orjson.JSONDecodeError:
            continue
    return ids


def forged_lead(secret: bytes, head: bytes, token: str) -> bool | None:
    """Whether a body starting with ``head`` is a forgery, known before the rest arrives: True when a leading
    top-level key is ``task_id`` (``_LEADING_TASK_ID``) and ``token`` is not that task's; None when ``head``
    does not settle it (no leading ``task_id`` yet, or at all). An unauthenticated client dripping an 8 MiB
    callback at the slow-link rate held a connection for about 1.5 h although the id it claimed sat in its
    first 50 bytes (an outside trial); with ``status`` first, past a first-key-only look (a review)."""
    match = _LEADING_TASK_ID.match(head)
    if match is None:
        return None
    try:
        task_id = orjson.loads(b'"' + match.group(1) + b'"')
    except orjson.JSONDecodeError:
        return None
    return verify_token(secret, task_id, token) is None


def precheck(secret: bytes, raw: bytes, token: str | None) -> tuple[int, dict[str, Any], Any] | None:
    """The answer to a callback whose token cannot be right, decided before its body is parsed (a forged
    8 MiB callback used to cost 125 ms of CPU on the event loop and 10 MB of memory); None: parse it."""
    if token is None or not token_shaped(token):
        return _UNAUTHORIZED
    ids = _claimed_ids(raw)
    if not ids:
        where = (
            "the body" if len(raw) <= 2 * _WINDOW else f"the first or last {_WINDOW // 1024} KiB of the body"
        )
        return None if len(raw) <= _SMALL_BODY else answer(BadInput(f"task_id: not found in {where}"))
    if not any(verify_token(secret, task_id, token) is not None for task_id in ids):
        return _UNAUTHORIZED
    return None


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _answer(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=_JSON, headers=headers)


@router.post(
    "/callback",
    response_model=CallbackOut,
    responses=responses(
        Unauthorized,
        NotFound,
        Conflict,
        TooLarge,
        BadInput,
        Unavailable,
        e401="missing or wrong callback token",
        e409="the attempt is no longer current",
        e413="body too large, or a partial over PARTIAL_MAX_BYTES",
    ),
    openapi_extra={
        "requestBody": {"required": True, "content": {_JSON: {"schema": CallbackIn.model_json_schema()}}}
    },
)
async def callback(request: Request) -> Response:
    status, body, headers = await handle(
        request.app.state.dispatcher, await request.body(), request.headers.get("authorization")
    )
    return _answer(status, body, headers)


def _refused(d: Dispatcher, token: str | None, task_id: str | None = None) -> None:
    """A callback refused for its token (401): counted, and logged at most once per interval."""
    d.metrics.callbacks.labels("401").inc()
    refusals_of(d).note(token, task_id)


def _partial_too_large(partial: Any, limit: int) -> str | None:
    """Why a ``partial`` is refused (its JSON over PARTIAL_MAX_BYTES), or None."""
    if partial is None:
        return None
    size = len(encode(partial))  # not orjson.dumps: an integer past 64 bits made it raise (a 500)
    return f"partial is {size} bytes; at most {limit} (PARTIAL_MAX_BYTES)" if size > limit else None


async def handle(
    d: Dispatcher, raw: bytes, authorization: str | None
) -> tuple[int, dict[str, Any], dict[str, str] | None]:
    """The callback contract (SPEC §4): (status, JSON body, extra headers)."""
    token = bearer(authorization)
    early = precheck(d.settings.secret, raw, token)
    if early is not None:
        if early[0] == 401:
            _refused(d, token)
        else:
            d.metrics.callbacks.labels(str(early[0])).inc()
        return early
    try:
        body = _ADAPTER.validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        d.metrics.callbacks.labels("422").inc()
        return answer(validation_error(errors))
    attempt = verify_token(d.settings.secret, body.task_id, token) if token else None
    if attempt is None:
        _refused(d, token, body.task_id)
        return _UNAUTHORIZED
    if body.status == "running":
        extra = dict(body.model_extra or {})
        partial: Any = extra.pop("partial", None)
        too_large = _partial_too_large(partial, d.settings.partial_max_bytes)
        if too_large is not None:
            d.metrics.callbacks.labels("413").inc()
            return answer(TooLarge(too_large))
        fin = await d.ends.heartbeat(body.task_id, attempt, extra, partial)
    else:
        if body.status == "finished":
            outcome, reported = Outcome.FINISHED, "finished"
        elif body.retry:
            outcome, reported = Outcome.FAILED_RETRY, "failed_retry"
        else:
            outcome, reported = Outcome.FAILED, "failed"
        error = (body.error or "the GPU service reported failure") if body.status == "failed" else None
        fin = await d.ends.end_attempt(
            body.task_id, attempt, outcome, result=body.result, error=error, reported=reported
        )
    refused = _not_applied(body.task_id, attempt, fin)
    if refused is not None:
        d.metrics.callbacks.labels(str(refused.status)).inc()
        return answer(refused)
    d.metrics.callbacks.labels("200").inc()
    return 200, {"task_id": body.task_id, "state": fin.state, "applied": fin.code == "applied"}, None


def _not_applied(task_id: str, attempt: int, fin: Finish) -> GpuqError | None:
    """Why a callback changed nothing, as the GPU should hear it (None: it applied, or was a repeat)."""
    if fin.code == "stale" and fin.state == TaskState.STANDBY:
        # A standby sent by its owner on its slot's holder's callback, whose transaction has not committed
        # yet (db/standby.py): the attempt is about to be current. Sent again, the callback applies.
        return Unavailable(
            f"attempt {attempt} of task {task_id!r} has not started yet (standby); try again",
            code="not_started",
            headers={"Retry-After": "1"},
        )
    if fin.code == "unknown":
        return NotFound(f"unknown task {task_id!r}")
    if fin.code == "stale":
        return Conflict(f"attempt {attempt} of task {task_id!r} is no longer current (task is {fin.state})")
    return None


class CallbackFastPath:
    """Serves ``POST /callback`` directly; hands every other request (and the lifespan) to ``app``."""

    def __init__(self, app: FastAPI, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http" or scope["path"] != "/callback" or scope["method"] != "POST":
            await self.app(scope, receive, send)  # type: ignore[arg-type]
            return
        authorization, checking = None, False
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == _SELF_CHECK:
                checking = True
        token = bearer(authorization)
        if checking:  # CALLBACK_URL's look at start (callback_check.py): not a refusal, nothing read
            secret = self.app.state.dispatcher.settings.secret
            if token is not None and verify_token(secret, CHECK_TASK, token) is not None:
                await _send(send, 200, {"callback_check": CHECK_OK}, None)
            else:  # none (an older gpuq's look), or signed with another CALLBACK_SECRET
                await _send(send, *_UNAUTHORIZED)
            return
        if token is None or not token_shaped(token):  # not even shaped like ours: refused unread
            _refused(self.app.state.dispatcher, token)
            await _send(send, *_UNAUTHORIZED)
            return
        held = [0]  # bytes of the body counted in CALLBACK_BODIES
        try:
            raw = await self._read(receive, send, token, held)
            if raw is not None:
                await self._handle(raw, authorization, send)
        finally:
            CALLBACK_BODIES.release(held[0])

    async def _read(
        self,
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
        token: str,
        held: list[int],
    ) -> bytes | None:
        """The whole body; None when it was answered before its end (too large, no room, a forged token
        seen in its first key) or the client left."""
        chunks: list[bytes] = []
        looks = iter(_LEAD_LOOKS)  # sizes at which a body still arriving is looked at for a leading task_id
        look_at: int | None = next(looks)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size = held[0]
            if size + len(chunk) > self.max_body:
                await _send(send, *answer(TooLarge(f"body larger than {self.max_body} bytes")))
                return None
            if not CALLBACK_BODIES.grow(size, size + len(chunk)):
                await _send(send, *answer(BUSY))
                return None
            held[0] = size = size + len(chunk)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
            if look_at is not None and size >= look_at:
                chunks = [b"".join(chunks)]
                forged = forged_lead(self.app.state.dispatcher.settings.secret, chunks[0], token)
                if forged:  # refused now, and the connection closed: the rest is never read
                    _refused(self.app.state.dispatcher, token)
                    status, body, headers = _UNAUTHORIZED
                    await _send(send, status, body, {**(headers or {}), "Connection": "close"})
                    return None
                # settled (its token is right: the rest may take its time), or past the last look
                look_at = None if forged is False else next((n for n in looks if n > size), None)

    async def _handle(
        self, raw: bytes, authorization: str | None, send: Callable[[dict[str, Any]], Awaitable[None]]
    ) -> None:
        d: Dispatcher = self.app.state.dispatcher
        try:
            status, body, headers = await handle(d, raw, authorization)
        except STORE_ERRORS as exc:
            log.warning("store unavailable", extra={"action": "http_503", "error": str(exc)})
            d.rt.store_failed = (
                time.monotonic(),
                "database" if isinstance(exc, StoreUnavailable) else "redis",
            )
            status, body, headers = answer(Unavailable(STORE_DOWN))
        except Exception:
            log.exception("callback failed", extra={"action": "http_500"})
            status, body, headers = answer(GpuqError("internal error; the callback was not applied"))
        await _send(send, status, body, headers)


async def _send(
    send: Callable[[dict[str, Any]], Awaitable[None]],
    status: int,
    body: dict[str, Any],
    headers: dict[str, str] | None,
) -> None:
    payload = orjson.dumps(body)
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})
