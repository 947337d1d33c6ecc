"""Calling the dispatcher back (SPEC §4): the final callback with retries, and heartbeats.

The final callback is retried with exponential backoff on connection errors, timeouts and 5xx: the dispatcher
applies a repeated callback once, so asking again is always safe. It is never retried on an answer below 500:
401, 404, 409 and 422 are the dispatcher's final word (wrong token, unknown task, attempt no longer current,
bad body) and asking again cannot change them. A heartbeat is tried once: the next one is never far off.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import httpx

log = logging.getLogger("reference.callback")


class Callbacks:
    def __init__(
        self, *, tries: int = 10, backoff: float = 0.2, max_backoff: float = 10.0, timeout: float = 10.0
    ) -> None:
        self.tries = tries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._client = httpx.AsyncClient(timeout=timeout)
        self._jitter = random.Random()  # noqa: S311 - spreads retries, no secrets

    async def close(self) -> None:
        await self._client.aclose()

    async def deliver(self, url: str, token: str, body: dict[str, Any]) -> int | None:
        """POST the final callback; the dispatcher's HTTP status, or None when it never answered below 500."""
        delay = self.backoff
        for attempt in range(1, self.tries + 1):
            status, reason = await self._post(url, token, body)
            if status is not None and status < 500:
                if status != 200:
                    log.warning(
                        "callback for %s refused: %s",
                        body["task_id"],
                        reason,
                        extra={"action": "callback_refused", "task_id": body["task_id"], "status": status},
                    )
                return status
            if attempt == self.tries:
                break
            log.warning(
                "callback for %s failed (%s), try %d of %d in %.1f s",
                body["task_id"],
                reason,
                attempt,
                self.tries,
                delay,
                extra={"action": "callback_retry", "task_id": body["task_id"]},
            )
            await asyncio.sleep(delay * self._jitter.uniform(0.8, 1.2))
            delay = min(delay * 2, self.max_backoff)
        log.error(
            "callback for %s given up after %d tries; the dispatcher's lease will retry the task",
            body["task_id"],
            self.tries,
            extra={"action": "callback_given_up", "task_id": body["task_id"]},
        )
        return None

    async def heartbeat(self, url: str, token: str, task_id: str) -> int | None:
        """``{"status": "running"}`` extends the attempt's lease; a 409 means nobody waits for it any more."""
        status, _ = await self._post(url, token, {"task_id": task_id, "status": "running"})
        return status

    async def _post(self, url: str, token: str, body: dict[str, Any]) -> tuple[int | None, str]:
        headers = {"Authorization": f"Bearer {token}"}
        try:
            response = await self._client.post(url, json=body, headers=headers)
        except httpx.TransportError as exc:  # refused, reset, timed out: the dispatcher may be restarting
            return None, f"{type(exc).__name__}: {exc}"
        return response.status_code, f"HTTP {response.status_code}: {response.text[:200]}"
