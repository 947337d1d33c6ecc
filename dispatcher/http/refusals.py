"""Callbacks refused for their token (401) are logged, at most once per ``EVERY_SECONDS`` per dispatcher, with
how many came since and why: a metric alone left an operator blind. In an outside trial a dispatcher started
with another ``CALLBACK_SECRET`` than its peers had 29 callbacks refused and not one log line, and its tasks
ended "no callback before the lease ran out" although their callbacks had come. A forged-callback flood
costs one line per interval, not one per request."""

from __future__ import annotations

import logging
import time
from collections import Counter

from dispatcher.gpus.tokens import token_shaped

log = logging.getLogger("gpuq.http")

EVERY_SECONDS = 10.0
#: Characters of a refused callback's task id that reach the log (a forged one is the sender's text).
_TASK_ID_CHARS = 100


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
        self._reasons: Counter[str] = Counter()
        self._next_at = 0.0

    def note(self, token: str | None, task_id: str | None = None) -> None:
        reason = why_refused(token)
        self._reasons[reason] += 1
        now = time.monotonic()
        if now < self._next_at:
            return
        log.warning(
            "callback refused: wrong token",
            extra={
                "action": "callback_refused",
                "refused": sum(self._reasons.values()),  # since the last line
                "reason": reason,
                # every reason since the last line: one tokenless request per interval must not hide the rest
                "reasons": dict(self._reasons),
                # escaped: a forged id must not write lines of its own into a text log
                "task_id": None if task_id is None else ascii(task_id[:_TASK_ID_CHARS]),
            },
        )
        self._reasons.clear()
        self._next_at = now + self.every


def refusals_of(dispatcher: object) -> Refusals:
    """The dispatcher's own (several live in one test process; each logs its own), kept on it."""
    found = getattr(dispatcher, "_callback_refusals", None)
    if found is None:
        found = Refusals()
        setattr(dispatcher, "_callback_refusals", found)  # noqa: B010 - an attribute the class does not declare
    return found
