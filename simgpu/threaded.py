"""An asyncio service on its own event loop in a background thread, for tests and embedding.

The pattern of httpx's ``serve_in_thread``: the test thread starts it, talks to it over real HTTP, and calls
into its loop with ``run``/``call`` (never touching its state directly: the loop thread owns it).
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed (cheaper per request), asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class ThreadedService(ABC):
    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @abstractmethod
    async def _startup(self) -> None: ...

    @abstractmethod
    async def _shutdown(self) -> None: ...

    def start(self, timeout: float = 10.0) -> Self:
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__} is already started")
        self._ready.clear()
        self._thread = threading.Thread(target=self._main, name=type(self).__name__, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"{type(self).__name__} did not start within {timeout} s")
        if self._error is not None:
            error, self._error = self._error, None
            self._thread.join(timeout)
            self._thread = self._loop = self._stop_event = None
            raise error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None or loop is None or stop_event is None:
            return
        loop.call_soon_threadsafe(stop_event.set)
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"{type(self).__name__} did not stop within {timeout} s")
        self._thread = self._loop = self._stop_event = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run ``coro`` on the service's loop and wait for its result."""
        if self._loop is None:
            coro.close()
            raise RuntimeError(f"{type(self).__name__} is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Call ``fn`` on the service's loop, where it may read and change the service's state."""

        async def call() -> T:
            return fn()

        return self.run(call(), timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _main(self) -> None:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        try:
            await self._startup()
        except Exception as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop_event.wait()
        try:
            await self._shutdown()
        except Exception as exc:  # raised again by stop(), in the thread that asked
            self._error = exc
