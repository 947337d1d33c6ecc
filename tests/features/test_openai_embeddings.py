"""``POST /v1/embeddings`` with the official ``openai`` client, through a real dispatcher, to the reference
MiniLM service (one service process for the module: the model takes seconds to load)."""

from __future__ import annotations

import base64
import math
import re
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from pydantic import ValidationError
from sqlalchemy import func, select, update

from dispatcher.db.schema import tasks
from dispatcher.http.openai_shapes import EmbeddingsRequest
from tests.dispatcher.conftest import Stack
from tests.dispatcher.helpers import wait_for
from tests.reference.conftest import ServiceProc
from tests.reference.test_embed_service import cosine, sentence

TOKEN = "openai-api-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SENTENCES = ["A man is playing a guitar.", "A man plays the guitar.", "The stock market fell today."]


def client(d_url: str, api_key: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{d_url}/v1", api_key=api_key, timeout=60)


def check(vectors: list[list[float]], n: int) -> None:
    assert len(vectors) == n
    for v in vectors:
        assert len(v) == 384 and all(isinstance(x, float) for x in v)
        assert math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, abs_tol=1e-4)


@pytest.mark.slow  # the reference model (torch)
def test_openai_client_embeds_through_gpuq(stack: Stack, service: ServiceProc) -> None:
    # GIVEN the reference service as the only GPU of pool "embedpool", which serves types embed and minilm
    d = stack.dispatcher(
        None,
        API_TOKEN=TOKEN,
        GPU_ENDPOINTS=f"embedpool:g0={service.url}",
        TASK_ROUTES="embed=embedpool,minilm=embedpool",
    )
    with client(d.url) as c, client(d.url, "wrong-key") as wrong:
        _embeds_and_refuses(d.url, c, wrong)


def _embeds_and_refuses(d_url: str, c: openai.OpenAI, wrong: openai.OpenAI) -> None:
    # WHEN the official client embeds three sentences (it asks for base64 and decodes it)
    res = c.embeddings.create(model="embed", input=SENTENCES)
    # THEN three unit vectors of 384 floats, in order, the paraphrases closer than the unrelated pair
    vectors = [e.embedding for e in res.data]
    check(vectors, 3)
    assert [e.index for e in res.data] == [0, 1, 2]
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3
    assert res.object == "list" and res.model == "embed"
    assert res.usage.prompt_tokens == res.usage.total_tokens == 16  # whitespace words
    # AND floats asked for explicitly are the same vectors (base64 carries float32)
    took = time.perf_counter()
    floats = c.embeddings.create(model="embed", input=SENTENCES, encoding_format="float")
    print(f"\n3 sentences through gpuq and MiniLM: {(time.perf_counter() - took) * 1000:.0f} ms")
    for a, b in zip(vectors, (e.embedding for e in floats.data), strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-6
    # AND a single string works, and a routed model name is the task type
    raw = c.embeddings.with_raw_response.create(model="minilm", input=SENTENCES[0])
    one = raw.parse()
    check([e.embedding for e in one.data], 1)
    assert cosine(one.data[0].embedding, vectors[0]) > 0.9999
    task = httpx.get(f"{d_url}/tasks/{raw.headers['x-gpuq-task-id']}", headers=AUTH).json()
    assert (task["type"], task["queue"], task["pool"], task["state"]) == (
        "minilm",
        "embedpool",
        "embedpool",
        "finished",
    )
    # AND a model name without a route is type "embed"
    raw = c.embeddings.with_raw_response.create(model="text-embedding-3-small", input="hello there")
    assert raw.parse().model == "text-embedding-3-small"
    task = httpx.get(f"{d_url}/tasks/{raw.headers['x-gpuq-task-id']}", headers=AUTH).json()
    assert (task["type"], task["pool"]) == ("embed", "embedpool")

    # a wrong API key: 401 in OpenAI's shape
    with pytest.raises(openai.AuthenticationError) as auth:
        wrong.embeddings.create(model="embed", input="x")
    assert auth.value.code == "invalid_api_key"
    # token ids, blank text, unsupported dimensions: 422 saying why
    for bad, says in (
        ({"input": [[15339, 1917]]}, "not token ids"),
        ({"input": [1, 2, 3]}, "not token ids"),
        ({"input": ["fine", "  "]}, "item 1 is empty"),
        ({"input": "x", "dimensions": 128}, "not supported"),
        ({"input": "x", "extra_body": {"wait_seconds": 31}}, "wait_seconds"),
    ):
        with pytest.raises(openai.UnprocessableEntityError) as err:
            c.embeddings.create(model="embed", **bad)  # type: ignore[arg-type]
        assert says in err.value.message, err.value.body
        assert isinstance(err.value.body, dict) and err.value.body["type"] == "invalid_request_error"


@pytest.mark.slow  # the reference model (torch)
def test_past_the_wait_202_then_the_result(stack: Stack, service: ServiceProc) -> None:
    d = stack.dispatcher(None, API_TOKEN=TOKEN, GPU_ENDPOINTS=f"g0={service.url}")
    # WHEN a long batch (over a second on a CPU) is asked for with a 10 ms wait
    texts = [sentence(i, 200) for i in range(24)]
    with client(d.url) as c:
        raw = c.embeddings.with_raw_response.create(
            model="embed", input=texts, encoding_format="float", extra_body={"wait_seconds": 0.01}
        )
    # THEN 202 with the task id and where its result will be
    assert raw.status_code == 202
    pending = raw.http_response.json()
    assert pending["object"] == "embedding.task" and pending["status"] in ("queued", "processing")
    assert pending["result_url"] == f"/tasks/{pending['id']}/result" == raw.headers["location"]
    url = f"{d.url}{pending['result_url']}"
    if httpx.get(f"{service.base}/healthz").json()["device"] == "cpu":  # a GPU may well be done already
        assert httpx.get(url, headers=AUTH).status_code == 202
    # AND the result, once there, in OpenAI's shape, as floats or base64
    wait_for(lambda: httpx.get(url, headers=AUTH).status_code != 202, 60, 0.1, what="the batch's result")
    body = httpx.get(url, headers=AUTH).json()
    assert (body["object"], body["model"], len(body["data"])) == ("list", "embed", 24)
    check([e["embedding"] for e in body["data"]], 24)
    packed = httpx.get(url, headers=AUTH, params={"encoding_format": "base64"}).json()["data"][0]["embedding"]
    unpacked = struct.unpack("<384f", base64.b64decode(packed))
    assert max(abs(x - y) for x, y in zip(unpacked, body["data"][0]["embedding"], strict=True)) < 1e-6
    # AND errors in OpenAI's shape: no token, unknown task, a result past RESULT_TTL_SECONDS
    assert httpx.get(url).json()["error"]["code"] == "invalid_api_key"
    gone = httpx.get(f"{d.url}/tasks/nobody/result", headers=AUTH)
    assert (gone.status_code, gone.json()["error"]["code"]) == (404, "task_not_found")
    with stack.engine.begin() as conn:
        finished_at = conn.execute(
            select(tasks.c.finished_at).where(tasks.c.task_id == pending["id"])
        ).scalar()
        conn.execute(
            update(tasks)
            .where(tasks.c.task_id == pending["id"])
            .values(finished_at=finished_at.replace(year=finished_at.year - 1))
        )
    expired = httpx.get(url, headers=AUTH)
    assert (expired.status_code, expired.json()["error"]["code"]) == (410, "result_expired")


@pytest.mark.slow  # the reference model (torch)
def test_a_failed_task_is_502_once(stack: Stack, service: ServiceProc) -> None:
    # GIVEN a request the GPU service refuses (it takes 256 texts per job at most: 400, the task fails)
    d = stack.dispatcher(None, API_TOKEN=TOKEN, GPU_ENDPOINTS=f"g0={service.url}")
    with client(d.url) as c, pytest.raises(openai.InternalServerError) as err:
        c.embeddings.create(model="embed", input=["a few words"] * 257)
    # THEN 502 with the task's error, and the client did not retry it (x-should-retry: false): one task
    assert err.value.status_code == 502 and err.value.code == "task_failed"
    assert "256" in err.value.message, err.value.message
    with stack.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(tasks)).scalar() == 1


@pytest.mark.slow  # 5 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_waiting_then_cancelled(stack: Stack, gpuq: Callable[..., Any]) -> None:
    # GIVEN model "nogpu" routed to a pool without GPUs, and "slow" to a GPU that takes a minute per job
    fleet = stack.fleet(gpus=1, slots=4, service_time="fixed:60")
    d = stack.dispatcher(
        None,
        API_TOKEN=TOKEN,
        TASK_ROUTES="nogpu=idle,slow=slow",
        GPU_ENDPOINTS=f"slow:{fleet.gpu_endpoints()}",
    )
    with client(d.url) as c:
        # WHEN the wait is over: 202; a job still in Redis (no row yet) is queued, its result_url says so
        raw = c.embeddings.with_raw_response.create(
            model="nogpu", input="waits", extra_body={"wait_seconds": 0.3}
        )
        assert (raw.status_code, raw.http_response.json()["status"]) == (202, "queued")
        waiting = httpx.get(f"{d.url}/tasks/{raw.headers['x-gpuq-task-id']}/result", headers=AUTH)
        assert (waiting.status_code, waiting.json()["status"]) == (202, "queued")
        # AND a running one is processing
        raw = c.embeddings.with_raw_response.create(
            model="slow", input="runs", extra_body={"wait_seconds": 2}
        )
        assert (raw.status_code, raw.http_response.json()["status"]) == (202, "processing")

        # WHEN an operator cancels a task while its request waits
        answers: list[Exception] = []
        took: list[float] = []

        def ask() -> None:
            asked = time.monotonic()
            try:
                c.embeddings.create(model="slow", input="cancelled", extra_body={"wait_seconds": 30})
            except openai.APIStatusError as exc:
                answers.append(exc)
            took.append(time.monotonic() - asked)

        asker = threading.Thread(target=ask)
        asker.start()

        def running() -> str | None:
            page = httpx.get(f"{d.url}/tasks", params={"state": "processing"}, headers=AUTH).json()
            ids = [t["task_id"] for t in page["tasks"] if t["task_id"] != raw.headers["x-gpuq-task-id"]]
            return ids[0] if ids else None

        wait_for(running, 10, 0.05, what="the second slow task running")
        res = gpuq("task", "cancel", running())
        assert res.exit_code == 0, res.stderr
        asker.join(60)
    # THEN its request is answered on the event, before its 30 s deadline (however slow the machine is in
    # getting there, it is far from 30 s): 409, not retried
    assert len(answers) == 1 and isinstance(answers[0], openai.ConflictError), answers
    assert answers[0].code == "task_cancelled"
    assert took[0] < 30, took


def _patterns(schema: Any) -> set[str]:
    if isinstance(schema, dict):
        found = {schema["pattern"]} if "pattern" in schema else set()
        return found.union(*(_patterns(v) for v in schema.values()))
    if isinstance(schema, list):
        return set().union(*(_patterns(v) for v in schema))
    return set()


def test_the_documented_input_is_exactly_what_the_server_accepts():
    # GIVEN the pattern the OpenAPI document gives every input text
    [pattern] = _patterns(EmbeddingsRequest.model_json_schema()["properties"]["input"])
    # THEN it spells out its code points: \s is not the same set in ECMAScript (what JSON Schema means, and
    # what clients check), in Python and in pydantic's Rust regex ("\u001d" passes ECMAScript's \S)
    assert not re.search(r"\\[sS]", pattern), pattern
    # AND a text of one code point matches it exactly when the server takes it
    compiled = re.compile(pattern)
    code_points = (chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    assert [hex(ord(c)) for c in code_points if bool(compiled.search(c)) != bool(c.strip())] == []
    for text in ["\u001d", "\u001c\u001f", "\ufeff", "\u0085", " \u3000", "a", " a "]:
        try:
            EmbeddingsRequest.model_validate({"input": [text], "model": "m"})
            accepted = True
        except ValidationError:
            accepted = False
        assert accepted is bool(compiled.search(text)), repr(text)
