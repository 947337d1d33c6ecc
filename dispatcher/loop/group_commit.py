"""Group commit of attempt endings: while one transaction runs, the endings that arrive meanwhile queue up
and go together in the next one. Under load that is one COMMIT and one thread hop per burst of callbacks
instead of one per callback; alone, a callback waits for nobody.

Up to ``depth`` batches are in flight at once (``COMMIT_PIPELINE``, each on a database connection of its own:
``db/hot.py``), but only one runs its statements at a time: the next batch takes what queued meanwhile and
starts as soon as the one before it has sent its last round trip (the one carrying or followed by its
COMMIT), instead of after that round trip's answer. Batches stay as large as with one in flight, and two of
them meet on a row only while the first commits. Two copies of one callback in consecutive batches are
ordered by the task's row lock: the second is a repeat or stale, as it would be one batch later.

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
from dispatcher.db.hot import STATEMENTS_DONE
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
        depth: int = 1,
    ) -> None:
        self._end_many = end_many
        self._spawn = spawn
        self.max_bytes = max_bytes
        self.depth = max(1, depth)
        self._queue: list[Entry] = []
        self._running = 0  # drains spawned and not yet finished: batches in flight, at most depth
        self._turn = asyncio.Lock()  # held by the batch running its statements

    async def submit(self, item: dict[str, Any]) -> Finish:
        future: asyncio.Future[Finish] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._running < self.depth:
            self._running += 1
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
                await self._turn.acquire()
                turn = _Held(self._turn)
                if not self._queue:  # taken by the batch that held the turn
                    turn.release()
                    break
                token = STATEMENTS_DONE.set(turn.release if self.depth > 1 else None)
                try:
                    await self._commit(self._next_batch())
                finally:
                    STATEMENTS_DONE.reset(token)
                    turn.release()
        finally:
            self._running -= 1

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


class _Held:
    """One batch's hold on the turn, released once: when its statements are done or when it ends, whichever
    comes first (a late signal of a batch that ended must not release the next batch's turn)."""

    __slots__ = ("_held", "_lock")

    def __init__(self, lock: asyncio.Lock) -> None:
        self._lock, self._held = lock, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()


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
