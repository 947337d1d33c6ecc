"""The dispatcher's errors: the transient ones its loop waits out, and the ones its HTTP API answers with.

``TRANSIENT``: a store that is down or restarting. Work that meets one waits and tries again, holding its jobs
in Redis (or leaving an attempt to its lease); it never drops a job or stops the process.

``GpuqError`` and its subclasses: what a request can be refused for. Each class is one HTTP status and a
default ``code``; ``answer`` turns any of them into the one body every error answer of the API has::

    {"detail": "<what is wrong, for a person>", "code": "<stable, for a program>"}

plus ``errors`` (each field that failed validation: ``loc``, ``msg``, ``type``) on a 422 for a malformed
request. ``detail`` is always a string, so a client prints it as it is. The routes raise these errors; the
handlers in http/app.py are the one place that turns them into answers (the callback's fast path and
the connection guard, which answer before FastAPI sees a request, use ``answer`` and ``raw_http`` from
here), and a store that is down becomes ``Unavailable`` there, never a 500.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import orjson
from pydantic import BaseModel, Field
from redis.exceptions import RedisClusterException, RedisError

from dispatcher.db.engine import StoreUnavailable

# RedisClusterException is not a RedisError: redis-py's cluster client raises it (SlotNotCoveredError) while a
# failover leaves a slot without a master for a moment.
TRANSIENT: tuple[type[Exception], ...] = (RedisError, RedisClusterException, StoreUnavailable, OSError)
#: A store that is down, as the HTTP API meets it: answered 503 (``Unavailable``), never 500.
STORE_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException, StoreUnavailable)


class FieldError(BaseModel):
    """One field of a malformed request: where (``["query", "limit"]``), what, and the check that failed."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    """The body of every error answer of the dispatcher's API."""

    detail: str = Field(description="What is wrong, for a person.")
    code: str = Field(description="What is wrong, for a program: stable across versions.")
    errors: list[FieldError] | None = Field(
        default=None, description="422 for a malformed request only: each field that failed validation."
    )


class GpuqError(Exception):
    """A request refused. A subclass names its ``status``, default ``code`` and ``meaning`` (what the status
    means for every route that answers it, for the OpenAPI document) in its class line; ``code`` may be
    narrowed where one is raised; ``headers`` go with the answer (``WWW-Authenticate``, ``Retry-After``)."""

    status: int = 500
    code: str = "internal"
    meaning: ClassVar[str] = "internal error"

    def __init_subclass__(cls, *, status: int, code: str, meaning: str, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.status, cls.code, cls.meaning = status, code, meaning

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})
        self.errors = errors
        #: More fields of the body for the routes that document them (readyz's ``problems``).
        self.extra = dict(extra or {})


class BadInput(
    GpuqError,
    status=422,
    code="invalid_input",
    meaning="malformed request: `detail` names the field, `errors` lists each one",
):
    """A field, body or query parameter the caller got wrong."""


class Unauthorized(GpuqError, status=401, code="unauthorized", meaning="missing or wrong token"):
    """A missing or wrong token; the answer asks for a Bearer token."""

    def __init__(self, detail: str, **kw: Any) -> None:
        kw.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(detail, **kw)


class Forbidden(GpuqError, status=403, code="forbidden", meaning="the token does not allow this"):
    """A right token that does not allow what was asked."""


class NotFound(GpuqError, status=404, code="not_found", meaning="unknown task"):
    """Nothing of that name (a task, a GPU)."""


class Conflict(GpuqError, status=409, code="conflict", meaning="no longer applies to the task's state"):
    """The request does not fit what the task has become (ended, cancelled, another attempt)."""


class Gone(GpuqError, status=410, code="gone", meaning="it existed, and has expired"):
    """Kept for a while, and that while is over."""


class TooLarge(GpuqError, status=413, code="too_large", meaning="the body is larger than the limit"):
    """A body, or a part of one, over its limit."""


class TooMany(GpuqError, status=429, code="too_many", meaning="too many at once; try after Retry-After"):
    """A shared resource is full; the answer says when to try again."""

    def __init__(self, detail: str, *, retry_after: float, **kw: Any) -> None:
        kw.setdefault("headers", {"Retry-After": f"{retry_after:g}"})
        super().__init__(detail, **kw)


class UpstreamFailed(
    GpuqError, status=502, code="upstream_failed", meaning="the GPU service failed the task, or its result"
):
    """The GPU service failed the task, or gave a result that does not fit the request."""


class Unavailable(
    GpuqError, status=503, code="unavailable", meaning="Redis or the database is unavailable; try again"
):
    """A store is down or restarting: nothing was changed, the same request may be sent again."""


#: What a store that is down is answered with, wherever it is met (the one 503 of the API).
STORE_DOWN = "storage temporarily unavailable, try again"

#: Every class by its status, for statuses met outside gpuq's own code (FastAPI's 404/405, a 413 of the
#: body limit, a 408 of the connection guard).
_CLASSES = (BadInput, Unauthorized, Forbidden, NotFound, Conflict, Gone, TooLarge, TooMany, UpstreamFailed)
BY_STATUS: dict[int, type[GpuqError]] = {cls.status: cls for cls in (*_CLASSES, Unavailable)}


def from_status(status: int, detail: str, headers: dict[str, str] | None = None) -> GpuqError:
    """The error for a status met outside gpuq's code (FastAPI's 404 for an unknown path, its 405); a
    status without a class of its own is answered as it is, with the code ``http_<status>``."""
    cls = BY_STATUS.get(status)
    code = cls.code if cls is not None else f"http_{status}"
    return GpuqError(detail, code=code, headers=headers, status=status)


def body(err: GpuqError) -> dict[str, Any]:
    """The one error body: ``detail``, ``code``, then ``errors`` and the route's extra fields if any."""
    out: dict[str, Any] = {"detail": err.detail, "code": err.code}
    if err.errors is not None:
        out["errors"] = err.errors
    out.update(err.extra)
    return out


def answer(err: GpuqError) -> tuple[int, dict[str, Any], dict[str, str] | None]:
    """(status, body, headers): what the callback's fast path and the FastAPI handlers send."""
    return err.status, body(err), err.headers or None


def raw_http(err: GpuqError, reason: str) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, for the connection guard (which answers before
    any ASGI app sees the request)."""
    payload = orjson.dumps(body(err)) + b"\n"
    head = [f"HTTP/1.1 {err.status} {reason}", "content-type: application/json", "connection: close"]
    head += [f"{k.lower()}: {v}" for k, v in err.headers.items()]
    head.append(f"content-length: {len(payload)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


def validation_error(errors: Sequence[Mapping[str, Any]]) -> BadInput:
    """A 422 for pydantic's errors: ``detail`` names each field and what is wrong with it."""
    fields = []
    for e in errors:
        loc = [p for p in e.get("loc", ()) if isinstance(p, str | int)]
        fields.append(FieldError(loc=loc, msg=e["msg"], type=e["type"]))
    detail = "; ".join(f"{'.'.join(map(str, f.loc)) or 'body'}: {f.msg}" for f in fields)
    return BadInput(detail or "malformed request", errors=[f.model_dump() for f in fields])


def responses(*errors: type[GpuqError], **meanings: str) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route that raises these errors; ``meanings`` (``e404="unknown task"``) says
    what a status means for this route where the class's ``meaning`` is too general."""
    return {
        cls.status: {"model": ErrorBody, "description": meanings.get(f"e{cls.status}", cls.meaning)}
        for cls in errors
    }
