"""Talking to GPU services: one shared aiohttp session, and the reading of their answers (SPEC §4).

aiohttp rather than httpx here because measured on this hardware an httpx.AsyncClient POST costs 5-9 ms of
CPU at 32 in flight against ~0.2 ms for aiohttp, and the dispatcher must sustain well over 1,000 POST/s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp
import orjson


class Verdict(StrEnum):
    ACCEPTED = "accepted"  # 2xx: the slot stays busy until the callback
    FINISHED = "finished"  # 2xx with {"status": "finished"}: a synchronous service
    FAILED = "failed"  # final: 4xx (not 408/429), or {"status": "failed"}
    RETRY = "retry"  # the attempt failed: 5xx, 408, 429, connection refused; free the slot, try again
    UNKNOWN = "unknown"  # sent but no answer (timeout, dropped connection): the lease decides


@dataclass(frozen=True, slots=True)
class Answer:
    verdict: Verdict
    status: int | None = None
    error: str | None = None
    result: Any = None
    unhealthy: bool = False  # counts towards taking the GPU out of rotation


_MAX_ANSWER_BYTES = 1 << 20


class GpuClient:
    def __init__(self, *, bearer_token: str, connect_timeout: float, request_timeout: float) -> None:
        self._headers = {"Content-Type": "application/json"}
        if bearer_token:
            self._headers["Authorization"] = f"Bearer {bearer_token}"
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=request_timeout)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=60)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, json_serialize=lambda o: orjson.dumps(o).decode()
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, url: str, body: dict[str, Any]) -> Answer:
        assert self._session is not None, "GpuClient.start() first"
        try:
            payload = orjson.dumps(body)
        except TypeError as exc:  # the job itself (a lone surrogate, a 65-bit integer): no GPU can take it
            return Answer(Verdict.FAILED, error=f"the job cannot be sent as JSON: {exc}")
        try:
            async with self._session.post(url, data=payload, headers=self._headers) as resp:
                text = (await resp.content.read(_MAX_ANSWER_BYTES)).decode(errors="replace")
                return _judge(resp.status, text)
        except aiohttp.ConnectionTimeoutError as exc:
            return Answer(Verdict.RETRY, error=f"connect timeout: {exc}", unhealthy=True)
        except aiohttp.ClientConnectorError as exc:
            return Answer(Verdict.RETRY, error=f"connection failed: {exc}", unhealthy=True)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            # The request may have reached the GPU: only its callback or the lease can tell.
            return Answer(Verdict.UNKNOWN, error=f"no answer: {type(exc).__name__}: {exc}", unhealthy=True)

    async def probe(self, url: str) -> tuple[bool, str]:
        """Is the service up again? Any HTTP answer below 500 to a GET of its URL says yes."""
        assert self._session is not None
        try:
            async with self._session.get(
                url, headers=self._headers, timeout=aiohttp.ClientTimeout(total=5)
            ) as r:
                return r.status < 500, f"probe answered {r.status}"
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return False, f"probe failed: {type(exc).__name__}: {exc}"


def _judge(status: int, text: str) -> Answer:
    if 200 <= status < 300:
        reply = _json_object(text)
        reported = reply.get("status") if reply else None
        if reported == "finished":
            return Answer(Verdict.FINISHED, status, result=reply.get("result") if reply else None)
        if reported == "failed":
            error = str((reply or {}).get("error") or "the GPU service reported failure")
            verdict = Verdict.RETRY if (reply or {}).get("retry") is True else Verdict.FAILED
            return Answer(verdict, status, error=error)
        return Answer(Verdict.ACCEPTED, status)
    snippet = text[:500]
    if status in (408, 429) or status >= 500:
        return Answer(
            Verdict.RETRY, status, error=f"GPU answered {status}: {snippet}", unhealthy=status >= 500
        )
    return Answer(Verdict.FAILED, status, error=f"GPU answered {status}: {snippet}")


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text) if text else None
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
