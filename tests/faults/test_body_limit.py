"""``BodyLimit`` (dispatcher/http/app.py) in front of any ASGI app: a chunked body (no Content-Length) over the
limit is refused with 413 once the limit is passed, and the app behind never sees more than the limit.

Before the fix it only looked at Content-Length, so a chunked body went through whole: harmless for the
running dispatcher (its ``/callback`` fast path counts bytes itself; other routes read no body), but not for
the FastAPI ``/callback`` route that anyone mounting ``create_app`` without the fast path gets.
The running process is checked end to end in test_security.py (50 MB chunked, peak RSS)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from fastapi import FastAPI
from pydantic import BaseModel

from dispatcher.http.app import BodyLimit, install_error_answers

MIB = 1024 * 1024


class Body(BaseModel):
    text: str


CHUNK = 64 * 1024


def _run(limit: int, total: int, content_length: bool = False) -> tuple[list[int], int, int]:
    """Send ``total`` bytes through BodyLimit to an app that reads its whole body; returns (what the app
    read, how much the client was asked for, the answered status)."""
    read: list[int] = []
    asked = 0
    answers: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        n = 0
        while True:
            message = await receive()
            n += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        read.append(n)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> dict[str, Any]:
        nonlocal asked
        size = min(CHUNK, total - asked)
        asked += size
        return {"type": "http.request", "body": b"x" * size, "more_body": asked < total}

    async def send(message: dict[str, Any]) -> None:
        answers.append(message)

    headers = [(b"content-length", str(total).encode())] if content_length else []
    scope = {"type": "http", "method": "POST", "path": "/callback", "headers": headers}
    asyncio.run(BodyLimit(app, limit=limit)(scope, receive, send))
    return read, asked, answers[0]["status"]


def test_a_chunked_body_over_the_limit_is_refused_before_the_app_has_it():
    read, asked, status = _run(limit=MIB, total=50 * MIB)
    assert status == 413
    assert read == []  # the app never got to the end of its body
    assert asked <= MIB + CHUNK  # and nothing past the limit was pulled from the client


def test_bodies_within_the_limit_pass_whole():
    assert _run(limit=MIB, total=MIB) == ([MIB], MIB, 200)
    assert _run(limit=MIB, total=MIB // 2, content_length=True) == ([MIB // 2], MIB // 2, 200)


def test_a_declared_length_over_the_limit_is_refused_unread():
    read, asked, status = _run(limit=MIB, total=2 * MIB, content_length=True)
    assert (read, asked, status) == ([], 0, 413)


def test_a_fastapi_route_with_a_body_model_answers_413_not_400():
    """FastAPI turns an error met while reading a body into 400; the limit's refusal must stay a 413."""
    api = FastAPI()
    api.add_middleware(BodyLimit, limit=MIB)
    install_error_answers(api)  # the dispatcher's error answers, as create_app installs them

    @api.post("/echo")
    async def echo(body: Body) -> dict[str, int]:
        return {"n": len(body.text)}

    async def chunks():
        yield b'{"text": "'
        for _ in range(5 * MIB // CHUNK):
            yield b"x" * CHUNK
        yield b'"}'

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            small = await client.post("/echo", json={"text": "hi"})
            assert small.json() == {"n": 2}
            return await client.post("/echo", content=chunks(), headers={"Content-Type": "application/json"})

    res = asyncio.run(call())
    assert res.status_code == 413
    assert res.json() == {"detail": f"body larger than {MIB} bytes", "code": "too_large"}
