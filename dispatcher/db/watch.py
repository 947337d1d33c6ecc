"""How long the database has kept this process waiting: said in the log, and by ``/readyz``.

A database that hangs (SIGSTOP, a network blackhole, an RDS failover) refuses nothing and resets nothing:
each call waits out the driver's read timeout (30 s) and its retries. An outside trial froze MariaDB for
75 s under two busy dispatchers: neither wrote a line, and every ``/readyz`` probe went unanswered (its own
``SELECT 1`` waited as long) instead of a 503 naming the database. Every database call of the process is
counted in and out here; the heartbeat (which needs no database) looks at the oldest one still waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator

log = logging.getLogger("gpuq.dispatcher")

#: A database call waiting longer than this is "not answering" (``/readyz`` says so at once).
SLOW_SECONDS = 5.0
#: While it lasts, the stall is logged at most this often.
SAY_EVERY_SECONDS = 10.0
#: ``/readyz``'s own look at the database waits this long at most.
PROBE_SECONDS = 2.0


class DbWatch:
    def __init__(self) -> None:
        self._calls: dict[int, float] = {}  # call -> when it started (monotonic)
        self._ids = itertools.count()
        self._stalled_since: float | None = None
        self._said_at = 0.0
        self._probe: asyncio.Future[object] | None = None

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        key = next(self._ids)
        self._calls[key] = time.monotonic()
        try:
            yield
        finally:
            del self._calls[key]

    def waiting(self) -> float:
        """Seconds the oldest database call still in flight has waited (0: none)."""
        return time.monotonic() - min(self._calls.values()) if self._calls else 0.0

    def look(self) -> None:
        """Say a stall as it goes on (every ``SAY_EVERY_SECONDS``), and its end."""
        now, waited = time.monotonic(), self.waiting()
        if waited >= SLOW_SECONDS:
            self._stalled_since = self._stalled_since or now - waited
            if now - self._said_at >= SAY_EVERY_SECONDS:
                self._said_at = now
                log.warning(
                    f"database not answering: a call has waited {waited:.0f} s (slots are neither freed nor"
                    " given meanwhile; the driver gives up on a connection after its read timeout, 30 s, and"
                    " tries again)",
                    extra={"action": "db_stalled", "waited_s": round(waited, 1), "calls": len(self._calls)},
                )
        elif self._stalled_since is not None:
            log.warning(
                "database answering again",
                extra={"action": "db_stalled", "stalled_s": round(now - self._stalled_since, 1)},
            )
            self._stalled_since, self._said_at = None, 0.0

    async def answers(self, probe: Callable[[], Awaitable[object]]) -> bool:
        """Does the database answer ``probe`` within ``PROBE_SECONDS``? One probe at a time: one that
        outlived its caller is waited for by the next (it holds a thread and a pooled connection until the
        driver gives up). Its errors reach the caller."""
        if self.waiting() >= SLOW_SECONDS:
            return False
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(probe())
        try:
            await asyncio.wait_for(asyncio.shield(self._probe), PROBE_SECONDS)
        except TimeoutError:
            return False
        return True
