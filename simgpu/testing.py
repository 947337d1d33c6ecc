"""Helpers for tests that drive a simulated fleet: a callback receiver and a deadline poll.

``CallbackReceiver`` stands in for the dispatcher's ``POST /callback``: it records every call and answers
200 ``{"task_id", "state", "applied": true}``, or the statuses queued with ``answer_with`` (to test retries).
``before_answer``, a coroutine function given the body, runs on the receiver's loop before each answer: it
can delay the answer, or act as a dispatcher that sends the next job before it answers.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from aiohttp import web

from simgpu.threaded import ThreadedService

T = TypeVar("T")


def poll_until(
    condition: Callable[[], T | None],
    timeout: float = 5.0,
    *,
    interval: float = 0.01,
    what: str | Callable[[], str] = "condition",
) -> T:
    """Call ``condition`` until it returns something truthy, and return that; TimeoutError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            raise TimeoutError(f"{text} not met within {timeout} s")
        time.sleep(interval)


@dataclass(frozen=True)
class ReceivedCallback:
    path: str
    authorization: str | None
    content_type: str | None
    body: Any  # the parsed JSON, or the raw bytes when it was not JSON
    received_at: float  # time.monotonic()
    peer: Any = None  # the client's (host, port): which connection carried it


class CallbackReceiver(ThreadedService):
    def __init__(
        self, host: str = "127.0.0.1", *, before_answer: Callable[[Any], Awaitable[None]] | None = None
    ) -> None:
        super().__init__()
        self.host = host
        self.before_answer = before_answer
        self.url = ""
        self.calls: list[ReceivedCallback] = []
        self.warmups: list[Any] = []  # the client (host, port) of each GET /healthz: connections opened ahead
        self.prefixed_warmups: list[Any] = []  # those of GET /gpuq/healthz (a callback URL behind a prefix)
        self._answers: deque[int] = deque()
        self._runner: web.AppRunner | None = None

    def answer_with(self, *statuses: int) -> None:
        """The next callbacks get these statuses, in order; then 200 again."""
        self._answers.extend(statuses)

    def bodies(self, status: str | None = None) -> list[Any]:
        """The bodies received so far, optionally only those whose ``status`` field is ``status``."""
        return [c.body for c in list(self.calls) if status is None or c.body.get("status") == status]

    def wait_for(self, count: int, timeout: float = 5.0) -> list[ReceivedCallback]:
        poll_until(
            lambda: len(self.calls) >= count, timeout, what=lambda: f"{count} callbacks ({self.calls})"
        )
        return list(self.calls)

    def clear(self) -> None:
        self.calls.clear()
        self._answers.clear()

    async def _startup(self) -> None:
        app = web.Application()
        app.router.add_post("/callback", self._handle)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/gpuq/healthz", self._prefixed_healthz)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.url = f"http://{self.host}:{self._runner.addresses[0][1]}/callback"

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        self.warmups.append(_peer(request))
        return web.json_response({"status": "ok"})

    async def _prefixed_healthz(self, request: web.Request) -> web.Response:
        self.prefixed_warmups.append(_peer(request))
        return web.json_response({"status": "ok"})

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = raw
        self.calls.append(
            ReceivedCallback(
                request.path,
                request.headers.get("Authorization"),
                request.headers.get("Content-Type"),
                body,
                time.monotonic(),
                _peer(request),
            )
        )
        if self.before_answer is not None:
            await self.before_answer(body)
        status = self._answers.popleft() if self._answers else 200
        if status != 200:
            return web.json_response({"error": "scripted answer"}, status=status)
        task_id = body.get("task_id") if isinstance(body, dict) else None
        state = body.get("status") if isinstance(body, dict) else None
        return web.json_response({"task_id": task_id, "state": state, "applied": True})


def _peer(request: web.Request) -> Any:
    """The client's (host, port): which connection carried the request."""
    return request.transport.get_extra_info("peername") if request.transport else None
