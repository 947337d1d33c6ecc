"""Group commit of attempt endings: while one transaction runs, the endings that arrive meanwhile queue up
and go together in the next one. Under load that is one COMMIT and one thread hop per burst of callbacks
instead of one per callback; alone, a callback waits for nobody.

A batch is bounded by count and by the bytes of results and errors it carries (``max_bytes``, from the
database's max_allowed_packet: eight 7 MiB results in one statement made MariaDB drop the connection, and
all eight were answered 503 round after round). A batch that fails anyway is split: halves while the store
seems down (a statement too big looks just like that), one by one for any other error, so one item's fault
is its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from dispatcher.db.attempts import Finish
from dispatcher.db.engine import StoreUnavailable
from dispatcher.limits import Limits, item_bytes

log = logging.getLogger("gpuq.dispatcher")

#: Attempt endings committed in one transaction at most.
BATCH = 200

Entry = tuple[dict[str, Any], "asyncio.Future[Finish]"]


class GroupCommit:
    def __init__(
        self,
        end_many: Callable[[list[dict[str, Any]]], Awaitable[list[Finish]]],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        max_bytes: int = Limits.default().batch_bytes,
    ) -> None:
        self._end_many = end_many
        self._spawn = spawn
        self.max_bytes = max_bytes
        self._queue: list[Entry] = []
        self._running = False

    async def submit(self, item: dict[str, Any]) -> Finish:
        future: asyncio.Future[Finish] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if not self._running:
            self._running = True
            self._spawn(self._drain())
        return await future

    def _next_batch(self) -> list[Entry]:
        """The oldest entries that fit in BATCH and ``max_bytes`` (at least one)."""
        size, n = 0, 0
        for item, _ in self._queue[:BATCH]:
            size += item_bytes(item)
            if n and size > self.max_bytes:
                break
            n += 1
        batch, self._queue = self._queue[:n], self._queue[n:]
        return batch

    async def _drain(self) -> None:
        try:
            while self._queue:
                await self._commit(self._next_batch())
        finally:
            self._running = False

    async def _commit(self, batch: list[Entry]) -> None:
        try:
            results = await self._end_many([item for item, _ in batch])
        except StoreUnavailable as exc:
            if len(batch) > 1 and sum(item_bytes(item) for item, _ in batch) > _SPLIT_BYTES:
                # A big statement that "lost the connection" may just be too big: halves before 503s.
                log.warning(
                    "a large batch of attempt endings failed; splitting it", extra={"action": "split"}
                )
                half = len(batch) // 2
                await self._commit(batch[:half])
                await self._commit(batch[half:])
                return
            _settle(batch, exc)  # every caller answers 503 / leaves it to the lease
            return
        except Exception as exc:
            # Not the store: one item is at fault. Alone, each item fails or succeeds on its own.
            if len(batch) == 1:
                log.exception("an attempt ending failed", extra={"action": "finish_error"})
                _settle(batch, exc)
                return
            log.exception("batched attempt endings failed; ending them one by one", extra={"action": "split"})
            for entry in batch:
                await self._commit([entry])
            return
        for entry, fin in zip(batch, results, strict=True):
            _settle([entry], fin)


#: Below this, a batch that meets a store error is not split: the store is down, not the batch too big.
_SPLIT_BYTES = 1024 * 1024


def _settle(entries: list[Entry], outcome: Finish | BaseException) -> None:
    for _, future in entries:
        if future.done():  # the caller went away (its request was cancelled)
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
