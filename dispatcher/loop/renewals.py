"""Which attempts' leases this process extended lately, so that partial output costs no database write.

A GPU streaming output sends a ``running`` callback per token or chunk (SPEC §4: "passed on ... and is not
stored"). Each used to extend the lease in its own transaction: a database commit per token. A partial now
extends the lease only when this process has not done so for that attempt within ``every`` seconds
(``min(TASK_TIMEOUT_SECONDS / 3, 5 s)``: the lease never gets near its end, and a cancel made where no
wake-up reaches is still seen within seconds). Heartbeats without a partial always go to the database.

Whatever may have ended an attempt forgets it here: its end in this process (``forget(task_id)``) and every
cancel (the ``cancel`` wake-up every dispatcher listens to: ``forget()``), so the next partial is checked
against the database and answered 409.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: Attempts remembered at most; past this, the ones not renewed within ``every`` are dropped first.
MAX_REMEMBERED = 4096


class Renewals:
    def __init__(self, every: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self._clock = clock
        self._at: dict[tuple[str, int], float] = {}

    def fresh(self, task_id: str, attempt: int) -> bool:
        """Did this process extend this attempt's lease less than ``every`` seconds ago?"""
        at = self._at.get((task_id, attempt))
        return at is not None and self._clock() - at < self.every

    def extended(self, task_id: str, attempt: int) -> None:
        now = self._clock()
        if len(self._at) >= MAX_REMEMBERED:
            self._at = {k: t for k, t in self._at.items() if now - t < self.every}
            if len(self._at) >= MAX_REMEMBERED:
                self._at.clear()
        self._at[(task_id, attempt)] = now

    def forget(self, task_id: str | None = None) -> None:
        """Forget one task's attempts, or (None) all of them."""
        if task_id is None:
            self._at.clear()
        else:
            self._at = {k: t for k, t in self._at.items() if k[0] != task_id}
