"""The hot path's database thread: one thread that owns one connection and runs the group commit's
transactions (callbacks ending attempts and handing their slots off) one after the other.

Why not ``asyncio.to_thread`` per transaction: each call went through the default executor's queue, then a
pool checkout, then the transaction; and the executor's threads are shared with every other store call
(housekeeping, reads, the loop's passes), so a callback's batch could queue behind them. Here the work item
goes straight to a thread that is blocked on its queue, runs on a connection it already holds (no checkout,
no reset, no ping), and the answer comes back with one ``call_soon_threadsafe``. The group commit keeps at
most one batch in flight, so one thread is all it needs; SQLite uses the same thread (embedded mode).

A lost connection (``KILL``, a restart, a network cut) is handled as ``transaction`` does: the connection is
thrown away, a new one opened, the batch run again (every store function is safe to rerun after a
rollback); when the store stays down the caller gets ``StoreUnavailable`` (its callbacks answer 503, the
GPU retries). The thread itself never dies of a transaction's error: whatever the function raises goes to
its caller. If the thread is gone anyway (closed), work runs through ``asyncio.to_thread`` instead.

An async driver (asyncmy under SQLAlchemy's asyncio engine) was measured against this thread: see
bench/RESULTS.md, 2026-11-30 "Hot-path database thread".
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from dispatcher.db.engine import StoreUnavailable, retryable, transaction

log = logging.getLogger("gpuq.db")
T = TypeVar("T")

_Work = tuple[Callable[..., Any], dict[str, Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class HotThread:
    def __init__(self, engine: Engine, *, attempts: int = 6, name: str = "gpuq-db-hot") -> None:
        self.engine = engine
        self.attempts = attempts
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._conn: Connection | None = None
        self._closed = False
        self.reconnects = 0  # connections opened again after one was lost (tests, logs)

    def start(self) -> None:
        self._thread.start()

    async def run(self, fn: Callable[..., T], /, **kwargs: Any) -> T:
        """``fn(conn, **kwargs)`` in one transaction on the thread's connection."""
        if self._closed or not self._thread.is_alive():
            return await asyncio.to_thread(transaction, self.engine, fn, **kwargs)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, kwargs, future, loop))
        return await future

    async def close(self) -> None:
        """Finish the work queued, then close the connection and end the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)

    # -- the thread ---------------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            while (work := self._queue.get()) is not None:
                fn, kwargs, future, loop = work
                try:
                    outcome: Any = self._transaction(fn, kwargs)
                    ok = True
                except BaseException as exc:  # handed to the caller, whatever it is
                    outcome, ok = exc, False
                try:
                    loop.call_soon_threadsafe(_settle, future, outcome, ok)
                except RuntimeError:  # the caller's loop is closed: nobody waits for this any more
                    continue
        finally:
            self._drop()

    def _transaction(self, fn: Callable[..., T], kwargs: dict[str, Any]) -> T:
        delay = 0.005
        for attempt in range(1, self.attempts + 1):
            try:
                if self._conn is None:
                    self._conn = self.engine.connect()
                with self._conn.begin():
                    return fn(self._conn, **kwargs)
            except DBAPIError as exc:
                if exc.connection_invalidated or self._conn is None or self._conn.invalidated:
                    self._drop(lost=True)
                if not retryable(exc) or attempt == self.attempts:
                    if isinstance(exc, OperationalError):
                        raise StoreUnavailable(str(exc.orig)) from exc
                    raise
                log.debug("retrying transaction", extra={"action": "db_retry", "error": str(exc.orig)})
                time.sleep(delay * (1 + random.random()))  # noqa: S311 - jitter, not crypto
                delay = min(delay * 3, 1.0)
        raise AssertionError("unreachable")

    def _drop(self, *, lost: bool = False) -> None:
        """Close the connection (``lost``: after an error that left it unusable; else at the end)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self.reconnects += lost
        try:
            conn.close()
        except Exception:  # a dead connection may fail to close; it is gone either way
            log.debug("closing a lost connection failed", extra={"action": "db_drop"})


def _settle(future: asyncio.Future[Any], outcome: Any, ok: bool) -> None:
    if future.done():  # the caller went away (cancelled); the transaction ran all the same
        return
    if ok:
        future.set_result(outcome)
    else:
        future.set_exception(outcome)
