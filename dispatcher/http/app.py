"""The HTTP edge (FastAPI): callbacks from GPU services, task and GPU views, health, metrics.

Errors become answers here and only here (``install_error_answers``; the callback's fast path, which runs in
front of FastAPI, uses the same ``dispatcher.errors.answer``): every error answer has the one body of
dispatcher/errors.py, a store that is down is 503 (GPU services retry their callback), bad bodies are 422
naming the field, and no traceback ever reaches a caller.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.dependencies.utils import get_flat_params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from dispatcher.errors import (
    STORE_DOWN,
    STORE_ERRORS,
    BadInput,
    ErrorBody,
    GpuqError,
    TooLarge,
    Unauthorized,
    Unavailable,
    answer,
    from_status,
    validation_error,
)
from dispatcher.http.agent_api import router as agent_router
from dispatcher.http.callback import router as callback_router
from dispatcher.http.cancel_api import router as cancel_router
from dispatcher.http.dashboard import router as dashboard_router
from dispatcher.http.edge_limits import BODIES, BUSY
from dispatcher.http.openai_api import router as openai_router
from dispatcher.http.openai_shapes import OpenAIRoute, openai_body
from dispatcher.http.routes import api_auth, router
from dispatcher.http.task_api import router as task_api_router
from dispatcher.loop.core import Dispatcher
from dispatcher.queues.event_hub import EventHub

log = logging.getLogger("gpuq.http")

MAX_BODY_BYTES = 8 * 1024 * 1024


class _TooLarge(HTTPException):
    """The request body passed the limit while the app was reading it. An HTTPException, so that FastAPI
    passes it on (it turns other errors met reading a body into 400) and answers 413 itself when the route
    was reading; BodyLimit answers when nothing did."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"body larger than {limit} bytes")


class _Busy(HTTPException):
    """The bodies in memory passed their budget while the app was reading this one (``BODIES``)."""

    def __init__(self) -> None:
        super().__init__(503, BUSY.detail)


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413 before reading them into memory: at once when the
    Content-Length says so, else (chunked transfer encoding) as soon as the bytes received pass the limit;
    the app behind never gets more than ``limit`` bytes. Bodies held past the process's budget
    (``edge_limits.BODIES``) are answered 503."""

    def __init__(self, app: Callable[..., Awaitable[None]], limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status, body, _ = answer(TooLarge(f"body larger than {self.limit} bytes"))
        too_large = JSONResponse(body, status_code=status)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await too_large(scope, receive, send)
                return
        received = 0
        started = False

        async def limited_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                size = received + len(message.get("body", b""))
                if size > self.limit:
                    raise _TooLarge(self.limit)
                if not BODIES.grow(received, size):
                    raise _Busy()
                received = size
            return message

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _TooLarge:
            if not started:
                await too_large(scope, receive, send)
        except _Busy:
            if not started:
                status, body, headers = answer(BUSY)
                await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)
        finally:
            BODIES.release(received)


def create_app(
    make_dispatcher: Callable[[], Awaitable[Dispatcher | None]],
    close: Callable[[], Awaitable[None]],
    hub: EventHub,
) -> FastAPI:
    """``hub``: the event streams' and embedding waits' one subscription, on a Redis client that is not the
    dispatch loop's (the HTTP routes' other Redis commands use that client too)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        d = await make_dispatcher()
        if d is None:  # a signal stopped the start before a dispatcher was made: the server stops at once
            try:
                yield
            finally:
                await close()
            return
        app.state.dispatcher = d
        app.state.hub = hub
        try:
            await hub.start()
            yield
        finally:
            await hub.stop()
            await d.stop()
            await close()

    # FastAPI's OpenTelemetry hooks look up the environment on every request; gpuq exports Prometheus.
    app = FastAPI(
        title="gpuq dispatcher",
        version="0.1.0",
        lifespan=lifespan,
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.add_middleware(BodyLimit)
    install_error_answers(app)

    for routes in (
        callback_router,
        agent_router,
        router,
        task_api_router,
        cancel_router,
        openai_router,
        dashboard_router,
    ):
        _document_shared_answers(routes)
        app.include_router(routes)

    return app


def install_error_answers(app: FastAPI) -> None:
    """The one place where errors become answers: gpuq's own (``GpuqError``), a store that is down, FastAPI's
    and Starlette's (validation, unknown path, wrong method, the body limit), and anything unforeseen (500,
    logged with its traceback, which the caller never sees)."""

    def send(request: Request, err: GpuqError) -> JSONResponse:
        status, body, headers = answer(err)
        if isinstance(request.scope.get("route"), OpenAIRoute):
            body = openai_body(err)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(GpuqError)
    async def _gpuq(request: Request, exc: GpuqError) -> JSONResponse:
        return send(request, exc)

    async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning("store unavailable", extra={"action": "http_503", "error": str(exc)})
        return send(request, Unavailable(STORE_DOWN))

    for store_error in STORE_ERRORS:
        app.add_exception_handler(store_error, _unavailable)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return send(request, validation_error(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return send(request, from_status(exc.status_code, str(exc.detail), dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("request failed", exc_info=exc, extra={"action": "http_500", "path": request.url.path})
        return send(request, GpuqError("internal error; see the dispatcher's log"))


def _document_shared_answers(routes: APIRouter) -> None:
    """Answers given in one place for many routes are documented in one place too: 401 where API_TOKEN
    guards the route, 422 where a route takes parameters or a body, 503 wherever a store may be down (the
    handlers in ``install_error_answers``). A route's own ``responses=`` say more and are kept."""
    for route in routes.routes:
        if not isinstance(route, APIRoute):
            continue
        shared: list[tuple[type[GpuqError], str]] = [(Unavailable, Unavailable.meaning)]
        if any(dep.dependency is api_auth for dep in route.dependencies):
            shared.append((Unauthorized, "missing or wrong API token (API_TOKEN is set)"))
        if get_flat_params(route.dependant) or route.body_field is not None:  # as FastAPI decides it
            shared.append((BadInput, BadInput.meaning))
        for cls, meaning in shared:
            route.responses.setdefault(cls.status, {"model": ErrorBody, "description": meaning})
