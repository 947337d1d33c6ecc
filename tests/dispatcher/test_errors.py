"""The error tree (dispatcher/errors.py) through the dispatcher's own handlers: each error its status, one
body shape for every error answer (``detail`` a string, ``code``), FastAPI's and Starlette's own errors and
a store that is down answered in that shape too, and an OpenAPI document that declares that body for every
error answer of every route. The handlers run in-process (no stores needed): the answers over a real socket
are checked by tests/faults/test_openapi.py."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest
from fastapi import APIRouter, FastAPI
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError

from dispatcher import errors
from dispatcher.db.engine import StoreUnavailable
from dispatcher.http.app import create_app, install_error_answers
from dispatcher.http.edge_limits import _408, _503
from dispatcher.http.openai_shapes import OpenAIRoute

CASES: list[tuple[errors.GpuqError, int, str]] = [
    (errors.BadInput("limit: too big"), 422, "invalid_input"),
    (errors.Unauthorized("missing or wrong API token"), 401, "unauthorized"),
    (errors.Forbidden("not yours"), 403, "forbidden"),
    (errors.NotFound("unknown task 'x'"), 404, "not_found"),
    (errors.Conflict("task 'x' is already finished"), 409, "conflict"),
    (errors.Gone("expired"), 410, "gone"),
    (errors.TooLarge("body larger than 1 bytes"), 413, "too_large"),
    (errors.TooMany("busy", retry_after=5), 429, "too_many"),
    (errors.UpstreamFailed("task failed"), 502, "upstream_failed"),
    (errors.Unavailable(errors.STORE_DOWN), 503, "unavailable"),
    (errors.GpuqError("internal error"), 500, "internal"),
]


class Item(BaseModel):
    n: int


def _app(raised: BaseException | None = None) -> FastAPI:
    app = FastAPI()
    install_error_answers(app)

    @app.get("/raise")
    async def raise_it() -> None:
        assert raised is not None
        raise raised

    @app.post("/items")
    async def items(item: Item, limit: int = 10) -> dict[str, int]:
        return {"n": item.n, "limit": limit}

    openai = APIRouter(route_class=OpenAIRoute)

    @openai.post("/v1/thing")
    async def thing(item: Item) -> None:
        if raised is not None:
            raise raised

    app.include_router(openai)
    return app


def _call(app: FastAPI, method: str, path: str, **kw: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, **kw)

    return asyncio.run(go())


def _shaped(res: httpx.Response) -> dict[str, Any]:
    """The one body: a JSON object whose ``detail`` and ``code`` are non-empty strings."""
    assert res.headers["content-type"].startswith("application/json"), res.headers
    body = res.json()
    assert isinstance(body["detail"], str) and body["detail"], body
    assert isinstance(body["code"], str) and body["code"], body
    return dict(body)


@pytest.mark.parametrize(("err", "status", "code"), CASES, ids=[c[2] for c in CASES])
def test_each_error_is_its_status_and_the_one_body(err, status, code):
    res = _call(_app(err), "GET", "/raise")
    assert res.status_code == status
    assert _shaped(res) == {"detail": err.detail, "code": code}
    assert errors.answer(err) == (status, {"detail": err.detail, "code": code}, err.headers or None)


def test_headers_go_with_the_answer_and_a_code_can_be_named():
    assert _call(_app(errors.Unauthorized("no")), "GET", "/raise").headers["www-authenticate"] == "Bearer"
    assert _call(_app(errors.TooMany("busy", retry_after=5)), "GET", "/raise").headers["retry-after"] == "5"
    res = _call(_app(errors.NotFound("unknown task 'x'", code="task_not_found")), "GET", "/raise")
    assert (res.status_code, res.json()["code"]) == (404, "task_not_found")


@pytest.mark.parametrize("exc", [StoreUnavailable("db down"), RedisConnectionError("redis down")])
def test_a_store_that_is_down_is_the_one_503_without_its_error_text(exc):
    res = _call(_app(exc), "GET", "/raise")
    assert res.status_code == 503
    assert _shaped(res) == {"detail": errors.STORE_DOWN, "code": "unavailable"}
    assert "down" not in res.text


def test_an_unforeseen_error_is_500_in_the_same_shape_without_a_traceback():
    res = _call(_app(ZeroDivisionError("secret internals")), "GET", "/raise")
    assert res.status_code == 500
    assert _shaped(res)["code"] == "internal"
    assert "secret" not in res.text and "Traceback" not in res.text


def test_a_malformed_request_is_422_naming_each_field():
    app = _app()
    res = _call(app, "POST", "/items?limit=many", json={"n": "x"})
    assert res.status_code == 422
    body = _shaped(res)
    assert body["code"] == "invalid_input"
    assert {tuple(e["loc"]) for e in body["errors"]} == {("body", "n"), ("query", "limit")}
    assert "body.n" in body["detail"] and "query.limit" in body["detail"]
    res = _call(app, "POST", "/items", content=b"{not json", headers={"content-type": "application/json"})
    assert res.status_code == 422 and _shaped(res)["errors"]


def test_fastapis_own_answers_take_the_shape():
    app = _app()
    missing = _call(app, "GET", "/nowhere")
    assert (missing.status_code, _shaped(missing)["code"]) == (404, "not_found")
    wrong = _call(app, "DELETE", "/items")
    assert (wrong.status_code, _shaped(wrong)["code"]) == (405, "http_405")


def test_openai_routes_add_openais_error_object():
    app = _app(errors.Conflict("task t was cancelled", code="task_cancelled"))
    res = _call(app, "POST", "/v1/thing", json={"n": 1})
    assert res.status_code == 409
    assert _shaped(res)["error"] == {
        "message": "task t was cancelled",
        "type": "invalid_request_error",
        "param": None,
        "code": "task_cancelled",
    }
    bad = _call(app, "POST", "/v1/thing", json={"n": "x"})
    assert bad.status_code == 422
    assert _shaped(bad)["error"]["param"] == "n" and bad.json()["error"]["code"] == "invalid_input"
    down = _call(_app(StoreUnavailable("x")), "POST", "/v1/thing", json={"n": 1})
    assert down.status_code == 503 and down.json()["error"]["type"] == "server_error"


def test_the_connection_guards_raw_answers_take_the_shape():
    for raw, status in ((_408, 408), (_503, 503)):
        head, _, payload = raw.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} ".encode())
        assert f"content-length: {len(payload)}".encode() in head
        body = orjson.loads(payload)
        assert set(body) == {"detail", "code"}


def _schema_of(doc: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    schema = answer["content"]["application/json"]["schema"]
    ref = schema.get("$ref", "")
    return dict(doc["components"]["schemas"][ref.rsplit("/", 1)[-1]]) if ref else dict(schema)


def test_every_error_answer_in_the_document_is_the_one_body():
    """Every 4xx and 5xx of every route is declared with the error body (detail and code required), and
    FastAPI's own validation-error schema appears nowhere."""
    doc = create_app(None, None, None).openapi()  # type: ignore[arg-type]  # only the document is read
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    seen = 0
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            statuses = {int(s) for s in op["responses"]}
            assert 503 in statuses, (method, path)
            if op.get("parameters") or op.get("requestBody"):
                assert 422 in statuses, (method, path)
            for status, answer in op["responses"].items():
                if int(status) < 400:
                    continue
                schema = _schema_of(doc, answer)
                assert {"detail", "code"} <= set(schema["required"]), (method, path, status)
                seen += 1
    assert seen > 30
