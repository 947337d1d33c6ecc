"""A job as the simulator sees it: parsed from the dispatcher's request (SPEC §4), logged for the stats."""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from typing import Any

import orjson

from simgpu.plan import NO_FAULTS, Plan


def json_object(raw: bytes, error: type[ValueError]) -> dict[str, Any]:
    """``raw`` as a JSON object; ``error`` (the caller's 400) when it is not JSON or not an object."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise error(f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise error("body must be a JSON object")
    return body


class BadJob(ValueError):
    """The request body is not a job the simulator can run; the message names the field."""


class Job:
    __slots__ = (
        "answered_mono",
        "attempt",
        "beat",
        "callback_answered_mono",
        "callback_sent_at",
        "callback_sent_mono",
        "callback_status",
        "callback_token",
        "callback_url",
        "data",
        "duplicate_sent_mono",
        "duplicate_status",
        "gpu",
        "plan",
        "received_at",
        "received_mono",
        "released_at",
        "service_time",
        "task_id",
        "timer",
        "type",
    )

    def __init__(self, body: dict[str, Any], gpu: str) -> None:
        self.gpu = gpu
        self.task_id: str = body["task_id"]
        self.attempt: int = body.get("attempt", 1)
        self.type: str | None = body.get("type")
        self.data: Any = body.get("data")
        self.callback_url: str = body.get("callback_url") or ""
        self.callback_token: str = body.get("callback_token") or ""
        self.received_at = time.time()
        self.received_mono = time.monotonic()
        self.plan: Plan = NO_FAULTS
        self.service_time = 0.0
        self.callback_sent_at: float | None = None
        self.callback_sent_mono: float | None = None
        self.callback_status: int | None = None
        self.callback_answered_mono: float | None = None  # when the final callback's answer came back
        # duplicate_callback: when the second copy went out and its answer (200 applied false, or 409 once the
        # attempt is no longer current: a retried task may have started its next attempt by then)
        self.duplicate_sent_mono: float | None = None
        self.duplicate_status: int | None = None
        self.answered_mono: float | None = None  # sync mode: when the slot was freed and the answer went out
        self.released_at: float | None = None  # async mode: when the job gave its slot back (wall clock)
        self.timer: asyncio.TimerHandle | None = None
        self.beat: asyncio.TimerHandle | None = None

    @classmethod
    def parse(cls, raw: bytes, gpu: str, *, needs_callback: bool) -> Job:
        body = json_object(raw, BadJob)
        if not isinstance(body.get("task_id"), str) or not body["task_id"]:
            raise BadJob("task_id: a non-empty string is required")
        attempt = body.get("attempt", 1)
        if isinstance(attempt, bool) or not isinstance(attempt, int):
            raise BadJob(f"attempt: expected an integer, got {attempt!r}")
        for name in ("callback_url", "callback_token"):
            value = body.get(name)
            if value is None and not needs_callback:
                continue
            if not isinstance(value, str) or not value:
                raise BadJob(f"{name}: a non-empty string is required")
        url = body.get("callback_url")
        if isinstance(url, str) and not url.startswith(("http://", "https://")):
            raise BadJob(f"callback_url: {url!r} is not an http(s) URL")
        return cls(body, gpu)

    def result_body(self) -> dict[str, Any]:
        """The final report: the callback body in async mode, the answer's body in sync mode."""
        outcome = self.plan.outcome
        if outcome in ("finished", "lost"):
            result = {
                "gpu": self.gpu,
                "type": self.type,
                "data": self.data,
                "service_time": self.service_time,
            }
            texts = self.data.get("input") if isinstance(self.data, dict) else None
            if isinstance(texts, list):  # an embeddings job (POST /v1/embeddings): a vector per text
                result["embeddings"] = [fake_embedding(str(t)) for t in texts]
            return {"task_id": self.task_id, "status": "finished", "result": result}
        body: dict[str, Any] = {
            "task_id": self.task_id,
            "status": "failed",
            "error": f"simulated failure on {self.gpu}",
        }
        if outcome == "retry":
            body["retry"] = True
        return body

    def record(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "attempt": self.attempt,
            "gpu": self.gpu,
            "outcome": self.plan.refusal or self.plan.outcome,
            "service_time": self.service_time,
            "received_at": self.received_at,
            "received_mono": self.received_mono,
            "released_at": self.released_at,
            "callback_sent_at": self.callback_sent_at,
            "callback_sent_mono": self.callback_sent_mono,
            "callback_status": self.callback_status,
            "callback_answered_mono": self.callback_answered_mono,
            "duplicate_sent_mono": self.duplicate_sent_mono,
            "duplicate_status": self.duplicate_status,
            "answered_mono": self.answered_mono,
        }


def fake_embedding(text: str, dimensions: int = 8) -> list[float]:
    """A unit vector that depends on the text only: a simulated GPU answers embeddings jobs in the shape the
    reference service does (``{"embeddings": [[...], ...]}``), so OpenAI-compatible requests through a
    simulated fleet finish as they would on real GPUs."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [b - 127.5 for b in digest[:dimensions]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]
