"""The hot path's database threads: each owns one connection and runs the group commit's transactions
(callbacks ending attempts and handing their slots off) one after the other.

Why not ``asyncio.to_thread`` per transaction: each call went through the default executor's queue, then a
pool checkout, then the transaction; and the executor's threads are shared with every other store call
(housekeeping, reads, the loop's passes), so a callback's batch could queue behind them. Here the work item
goes straight to a thread that is blocked on its queue, runs on a connection it already holds (no checkout,
no reset, no ping), and the answer comes back with one ``call_soon_threadsafe``.

Why more than one thread (``workers``, the group commit's ``COMMIT_PIPELINE``): with one, the callbacks that
arrive while a batch runs wait for its last round trip and its COMMIT (an fsync per commit with
``innodb_flush_log_at_trx_commit=1``) before their own batch can start; that wait was most of a slot's
turnaround (bench/RESULTS.md). With two, the next batch runs its statements while the previous one's last
round trip runs (``STATEMENTS_DONE`` tells the group commit when that goes out: as the pipeline carrying the
COMMIT is sent, or before SQLAlchemy's own COMMIT). Measured on the 2-core benchmark box it did not win
(bench/RESULTS.md), so the default is one; it is there for a database whose round trips dominate a batch.
The cue goes before the committing query is sent, so the next batch may start before the previous one's
claims reached the database: if both want one free slot, the older batch's claim waits for the newer one's
COMMIT and then finds it taken (its job goes back to the buffer). The cue is given once per transaction: a
batch rerun after a lost connection runs beside the next one.
Two batches never end the same attempt twice (a task's row lock orders them; the second finds it over) and
never put two jobs on one slot (each claim is the conditional ``UPDATE … WHERE task_id IS NULL``); a
deadlock between them is rolled back by the database and the loser run again, as any transaction here.
SQLite (embedded mode) has one writer at a time, so it gets one thread.

A lost connection (``KILL``, a restart, a network cut) is handled as ``transaction`` does: the connection is
thrown away, a new one opened, the batch run again (every store function is safe to rerun after a
rollback); when the store stays down the caller gets ``StoreUnavailable`` (its callbacks answer 503, the
GPU retries). A thread never dies of a transaction's error: whatever the function raises goes to its
caller. If the threads are gone anyway (closed), work runs through ``asyncio.to_thread`` instead.

An async driver (asyncmy under SQLAlchemy's asyncio engine) was measured against this thread: see
bench/RESULTS.md, 2026-11-30 "Hot-path database thread".
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from dispatcher.db.engine import retry_after, transaction
from dispatcher.db.pipeline import LAST_TRIP, MAY_COMMIT, hot_engine, round_trips

log = logging.getLogger("gpuq.db")
T = TypeVar("T")

_Done = Callable[[], None] | None
_Work = tuple[Callable[..., Any], dict[str, Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop, _Done]

#: Set by the caller (the group commit) around ``HotThread.run``: called on the caller's loop once the
#: transaction's statements are done and its COMMIT is being sent, so the next batch can start meanwhile.
STATEMENTS_DONE: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "statements_done", default=None
)


class HotThread:
    def __init__(
        self, engine: Engine, *, attempts: int = 6, name: str = "gpuq-db-hot", workers: int = 1
    ) -> None:
        self.engine = engine
        self.attempts = attempts
        # SQLite takes one writer at a time (BEGIN IMMEDIATE): a second thread would only wait for the lock.
        self.workers = 1 if engine.dialect.name == "sqlite" else max(1, workers)
        # The threads' own connections: on MySQL/MariaDB they take several statements per round trip
        # (``db/pipeline.py``), which the pool's connections do not.
        self.own_engine = hot_engine(engine, pool_size=self.workers)
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._main, name=name if i == 0 else f"{name}-{i}", daemon=True)
            for i in range(self.workers)
        ]
        self._closed = False
        self._lock = threading.Lock()
        self._tried = 0  # threads that have tried their first connect
        self._opened = threading.Event()  # set once all of them have
        self.reconnects = 0  # connections opened again after one was lost (tests, logs)
        # Transactions committed and the round trips they took, COMMIT included (issue 12; bench, tests).
        self.transactions = 0
        self.round_trips = 0
        self.last_round_trips = 0

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    async def opened(self, timeout: float = 15.0) -> None:
        """Wait until every thread has tried to open its connection (``start`` has them begin at once).

        Why at start: a thread's first connection also runs SQLAlchemy's first-connect set-up of the hot
        engine (server version, sql_mode, character set: several round trips and ~25 ms of Python). Made
        by the first callback's batch, it ran with the GIL beside the loop while a fleet that started
        together called back all at once: the first wave's transaction took ~60 ms (bench/RESULTS.md).
        A connect that fails here is only logged; the first transaction connects, as after a lost one."""
        await asyncio.to_thread(self._opened.wait, timeout)

    async def run(self, fn: Callable[..., T], /, **kwargs: Any) -> T:
        """``fn(conn, **kwargs)`` in one transaction on one of the threads' connections."""
        if self._closed or not any(t.is_alive() for t in self._threads):
            return await asyncio.to_thread(transaction, self.engine, fn, **kwargs)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, kwargs, future, loop, STATEMENTS_DONE.get()))
        return await future

    async def close(self) -> None:
        """Finish the work queued, then close the connections and end the threads."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            if thread.is_alive():
                await asyncio.to_thread(thread.join)
        if self.own_engine is not self.engine:
            self.own_engine.dispose()

    # -- the threads --------------------------------------------------------------------------------------

    def _main(self) -> None:
        held = _Held()
        self._open_early(held)
        try:
            while (work := self._queue.get()) is not None:
                fn, kwargs, future, loop, done = work
                try:
                    outcome: Any = self._transaction(held, fn, kwargs, loop, done)
                    ok = True
                except BaseException as exc:  # handed to the caller, whatever it is
                    outcome, ok = exc, False
                try:
                    loop.call_soon_threadsafe(_settle, future, outcome, ok)
                except RuntimeError:  # the caller's loop is closed: nobody waits for this any more
                    continue
        finally:
            self._drop(held)

    def _open_early(self, held: _Held) -> None:
        """This thread's connection before any work comes (see ``opened``)."""
        try:
            held.conn = self.own_engine.connect()
        except Exception as exc:  # the store is down at start: the first transaction tries again
            log.warning(
                "the hot database thread could not connect at start; it will at its first transaction",
                extra={"action": "db_hot_connect", "error": f"{type(exc).__name__}: {exc}"[:300]},
            )
        finally:
            with self._lock:
                self._tried += 1
                if self._tried == self.workers:
                    self._opened.set()

    def _transaction(
        self,
        held: _Held,
        fn: Callable[..., T],
        kwargs: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
        done: Callable[[], None] | None,
    ) -> T:
        delay = 0.005
        # Once per transaction: a rerun after a lost connection does not cue again.
        signal = _Signal(loop, done)
        for attempt in range(1, self.attempts + 1):
            try:
                if held.conn is None:
                    held.conn = self.own_engine.connect()
                conn = held.conn
                before = round_trips(conn)
                with conn.begin():
                    conn.info[MAY_COMMIT] = True  # its last pipeline may send the COMMIT (nothing follows fn)
                    conn.info[LAST_TRIP] = signal  # that pipeline signals as it goes out
                    try:
                        out = fn(conn, **kwargs)
                    finally:
                        if not conn.invalidated:
                            conn.info.pop(MAY_COMMIT, None)
                            conn.info.pop(LAST_TRIP, None)
                    signal()  # the COMMIT goes out as the block ends (when no pipeline sent it)
                with self._lock:
                    self.transactions += 1
                    self.last_round_trips = round_trips(conn) - before
                    self.round_trips += self.last_round_trips
                return out
            except DBAPIError as exc:
                if exc.connection_invalidated or held.conn is None or held.conn.invalidated:
                    self._drop(held, lost=True)
                delay = retry_after(exc, attempt, self.attempts, delay)
        raise AssertionError("unreachable")

    def _drop(self, held: _Held, *, lost: bool = False) -> None:
        """Close a thread's connection (``lost``: after an error that left it unusable; else at the end)."""
        conn, held.conn = held.conn, None
        if conn is None:
            return
        if lost:
            with self._lock:
                self.reconnects += 1
        try:
            conn.close()
        except Exception:  # a dead connection may fail to close; it is gone either way
            log.debug("closing a lost connection failed", extra={"action": "db_drop"})


class _Signal:
    """``STATEMENTS_DONE``'s callback, called on the caller's loop at most once: when the transaction's last
    round trip goes out (its COMMIT with it, or after it)."""

    __slots__ = ("_done", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, done: Callable[[], None] | None) -> None:
        self._loop, self._done = loop, done

    def __call__(self) -> None:
        done, self._done = self._done, None
        if done is not None:
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed
                self._loop.call_soon_threadsafe(done)


class _Held:
    """One thread's connection (None until it connected, and after one was lost)."""

    __slots__ = ("conn",)

    def __init__(self) -> None:
        self.conn: Connection | None = None


def _settle(future: asyncio.Future[Any], outcome: Any, ok: bool) -> None:
    if future.done():  # the caller went away (cancelled); the transaction ran all the same
        return
    if ok:
        future.set_result(outcome)
    else:
        future.set_exception(outcome)
