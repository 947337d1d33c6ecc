"""The OpenAI side of ``POST /v1/embeddings``: the request body, the answers and OpenAI's error shape.

OpenAI clients read errors as ``{"error": {"message", "type", "param", "code"}}``, so every error answer of
the OpenAI routes carries that object, validation errors and a store that is down included (``OpenAIRoute``),
beside the ``detail`` and ``code`` every error answer of gpuq has (dispatcher/errors.py).

Tokens are counted approximately, as whitespace-separated words: gpuq does not know the model's tokenizer,
and ``usage`` is informative only.
"""

from __future__ import annotations

import base64
import struct
from typing import Annotated, Any, Literal

from fastapi.routing import APIRoute
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints
from pydantic_core import PydanticCustomError

from dispatcher.errors import ErrorBody, GpuqError, body

#: Texts per request at most (OpenAI's own limit); a GPU service may accept fewer per job.
MAX_INPUTS = 2048
MAX_WAIT_SECONDS = 30.0


#: Headers of an answer the official clients must not retry: they retry 409 and 5xx by default, and a failed
#: or cancelled task would only be enqueued again (it already had its MAX_ATTEMPTS).
NO_RETRY = {"x-should-retry": "false"}


def _field(loc: list[str | int]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


class OpenAIRoute(APIRoute):
    """A route whose error answers also carry OpenAI's ``error`` object (see ``openai_body``); the answers
    themselves are built where all are, by the handlers in dispatcher/http/app.py."""


def openai_body(err: GpuqError) -> dict[str, Any]:
    """gpuq's error body plus OpenAI's ``{"error": {"message", "type", "param", "code"}}``, which OpenAI
    clients read (they ignore the other fields)."""
    param = _field(err.errors[0]["loc"]) if err.errors else None
    code = err.code
    if err.errors and err.errors[0]["type"] == "token_input":
        code = "token_input"
    kind = "rate_limit_error" if err.status == 429 else "server_error" if err.status >= 500 else ""
    message = {"message": err.detail, "type": kind or "invalid_request_error", "param": param, "code": code}
    return {**body(err), "code": code, "error": message}


def _text_only(value: Any) -> Any:
    """OpenAI also takes token ids (a list of ints, or of lists of ints); gpuq's GPU services take text."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list):
        raise PydanticCustomError("text_input", "must be a string or a list of strings")
    if not texts:
        raise PydanticCustomError("text_input", "must hold at least one text")
    if any(isinstance(t, int | list) for t in texts):
        raise PydanticCustomError(
            "token_input",
            "gpuq embeds text: send a string or a list of strings, not token ids "
            "(the model's tokenizer runs on the GPU service)",
        )
    if len(texts) > MAX_INPUTS:
        raise PydanticCustomError("text_input", f"at most {MAX_INPUTS} texts per request, got {len(texts)}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise PydanticCustomError("text_input", f"item {i} is not a string")
        if not t.strip():
            raise PydanticCustomError("text_input", f"item {i} is empty")
    return value


def _no_dimensions(value: Any) -> None:
    if value is not None:
        raise PydanticCustomError("unsupported", "not supported: gpuq returns the model's own dimension")


#: What ``str.strip()`` removes (``str.isspace``), spelled as code points: ``\s`` means a different set in
#: JSON Schema's ECMAScript (no U+001C-U+001F, but U+FEFF), in Python and in pydantic's Rust regex, so a
#: schema saying ``\S`` let clients send "\u001d", which the server rejects as empty.
SPACE = r"\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
#: A text with something in it: the JSON schema says exactly what ``_text_only`` accepts.
Text = Annotated[str, StringConstraints(pattern=f"[^{SPACE}]")]


class EmbeddingsRequest(BaseModel):
    """OpenAI's body plus ``wait_seconds``; unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")

    input: Annotated[
        Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)], BeforeValidator(_text_only)
    ]
    model: str = Field(min_length=1, max_length=256)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[None, BeforeValidator(_no_dimensions)] = Field(
        default=None, description="Not supported: gpuq returns the model's own dimension."
    )
    user: str | None = None
    wait_seconds: float = Field(
        default=10.0, ge=0, le=MAX_WAIT_SECONDS, description="gpuq: how long to wait before answering 202."
    )

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorOut(ErrorBody):
    """gpuq's error body with OpenAI's error object."""

    error: ErrorDetail


class EmbeddingOut(BaseModel):
    object: Literal["embedding"]
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")
    index: int


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsOut(BaseModel):
    object: Literal["list"]
    data: list[EmbeddingOut]
    model: str
    usage: Usage


class TaskPending(BaseModel):
    id: str
    object: Literal["embedding.task"]
    status: Literal["queued", "processing"]
    result_url: str


class TaskResultOut(BaseModel):
    """The result of a task that did not come from /v1/embeddings, as its GPU service gave it."""

    id: str
    object: Literal["task.result"]
    type: str
    result: Any


def count_tokens(texts: list[str]) -> int:
    """Approximate: whitespace-separated words (see the module docstring)."""
    return sum(len(t.split()) for t in texts)


def encode(vector: list[float], encoding_format: str) -> list[float] | str:
    """``base64`` is OpenAI's: the vector as little-endian float32, base64-encoded."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def embeddings_body(
    result: Any, *, model: str, texts: list[str], encoding_format: str
) -> dict[str, Any] | None:
    """The OpenAI answer for a GPU service's ``{"embeddings": [[...], ...]}``; None if it is not that."""
    vectors = result.get("embeddings") if isinstance(result, dict) else None
    if not isinstance(vectors, list) or len(vectors) != len(texts):
        return None
    if not all(isinstance(v, list) and all(isinstance(x, int | float) for x in v) for v in vectors):
        return None
    tokens = count_tokens(texts)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "embedding": encode(v, encoding_format), "index": i}
            for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def pending_body(task_id: str, state: str | None) -> dict[str, Any]:
    """The 202 answer: the task is accepted and its result will be at ``result_url``."""
    return {
        "id": task_id,
        "object": "embedding.task",
        "status": "processing" if state == "processing" else "queued",
        "result_url": f"/tasks/{task_id}/result",
    }
