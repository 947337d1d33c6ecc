"""Callbacks refused for their token (401) are logged, at most once per ``EVERY_SECONDS`` with how many came
since: a metric alone left an operator blind. In an outside trial a dispatcher started with another
``CALLBACK_SECRET`` than its peers had 29 callbacks refused and not one log line, and its tasks ended
"no callback before the lease ran out" although their callbacks had come. A forged-callback flood costs one
line per interval, not one per request."""

from __future__ import annotations

import logging
import time

from dispatcher.gpus.tokens import token_shaped

log = logging.getLogger("gpuq.http")

EVERY_SECONDS = 10.0


def why_refused(token: str | None) -> str:
    """What was wrong with a refused callback's token, in an operator's terms."""
    if token is None:
        return "no bearer token"
    if not token_shaped(token):
        return "not a gpuq callback token"
    return (
        "a token this dispatcher's CALLBACK_SECRET did not sign for that task and attempt (every dispatcher"
        " sharing a fleet needs the same CALLBACK_SECRET)"
    )


class Refusals:
    def __init__(self, every: float = EVERY_SECONDS) -> None:
        self.every = every
        self._count = 0
        self._next_at = 0.0

    def note(self, token: str | None, task_id: str | None = None) -> None:
        self._count += 1
        now = time.monotonic()
        if now < self._next_at:
            return
        log.warning(
            "callback refused: wrong token",
            extra={
                "action": "callback_refused",
                "refused": self._count,  # since the last line
                "reason": why_refused(token),
                "task_id": task_id,
            },
        )
        self._count = 0
        self._next_at = now + self.every


#: This process's; callbacks of every dispatcher in it count together (one per process outside tests).
REFUSED = Refusals()
