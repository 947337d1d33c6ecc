"""Group commit of attempt endings: while one transaction runs, the endings that arrive meanwhile queue up
and go together in the next one. Under load that is one COMMIT and one thread hop per burst of callbacks
instead of one per callback; alone, a callback waits for nobody."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from dispatcher.db.attempts import Finish
from dispatcher.db.engine import StoreUnavailable

log = logging.getLogger("gpuq.dispatcher")

#: Attempt endings committed in one transaction at most.
BATCH = 200

Entry = tuple[dict[str, Any], "asyncio.Future[Finish]"]


class GroupCommit:
    def __init__(
        self,
        end_many: Callable[[list[dict[str, Any]]], Awaitable[list[Finish]]],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self._end_many = end_many
        self._spawn = spawn
        self._queue: list[Entry] = []
        self._running = False

    async def submit(self, item: dict[str, Any]) -> Finish:
        future: asyncio.Future[Finish] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if not self._running:
            self._running = True
            self._spawn(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:BATCH], self._queue[BATCH:]
                try:
                    results = await self._end_many([item for item, _ in batch])
                except StoreUnavailable as exc:  # every caller answers 503 / leaves it to the lease
                    _settle(batch, exc)
                    continue
                except Exception:
                    # Not the store: one item is at fault. Alone, each item fails or succeeds on its own.
                    log.exception("batched attempt endings failed; ending them one by one")
                    for entry in batch:
                        try:
                            _settle([entry], (await self._end_many([entry[0]]))[0])
                        except Exception as exc:
                            _settle([entry], exc)
                    continue
                for entry, fin in zip(batch, results, strict=True):
                    _settle([entry], fin)
        finally:
            self._running = False


def _settle(entries: list[Entry], outcome: Finish | BaseException) -> None:
    for _, future in entries:
        if future.done():  # the caller went away (its request was cancelled)
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
