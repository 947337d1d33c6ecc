"""A lean HTTP/1.1 client for the hot path's one request: a job's POST to a plain ``http://`` GPU URL.

Why: in the efficiency run's profile (2026-12-03, ``bench/RESULTS.md``) aiohttp's POST was the largest single
cost of the dispatcher, 14 % of its CPU. On this machine an aiohttp POST costs ~165 µs of CPU at 32 in flight,
a keep-alive ``asyncio.Protocol`` on httptools (the parser uvicorn already brings) ~45 µs. Everything else
(``https://``, a URL with credentials in it, cancels, probes) stays on aiohttp (``gpu_client.py``).

It does only what a job's POST needs: keep-alive connections per (host, port), a bound on open connections
(``fds.outbound``: waited for, never a failure of the GPU's), an answer read to its end or cut at a cap, the
connect and read timeouts, and its errors sorted the way ``GpuClient`` judges them: not connected
(``ConnectFailed``, ``ConnectTimeout``: the GPU never had the job) or sent without a whole answer
(``NoAnswer``: it may have). It never asks for a compressed answer, so it never has to undo one.
"""

from __future__ import annotations

import asyncio
import collections
import errno
from dataclasses import dataclass

import httptools

from dispatcher.gpus.lean_target import Target, target

#: Parsed targets kept (a fleet has one URL per GPU; the bound only stops a flood of distinct URLs).
_TARGETS_MAX = 4096
#: An answer's status line and headers at most (aiohttp's limits are 8 KiB a field): a GPU streaming one
#: endless header must not grow our memory, as the read timeout only catches silence.
_HEAD_MAX = 64 * 1024
#: A payload this small is written together with its head, in one send.
_JOIN_BELOW = 64 * 1024


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    whole: bool  # False: the answer passed the cap; ``body`` is its first bytes
    location: str | None


class ConnectFailed(Exception):
    """No connection (refused, unreachable, a name that does not resolve, out of file descriptors)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error) or type(error).__name__)
        self.os_error = error


class ConnectTimeout(Exception):
    """No connection within the connect timeout."""


class NoAnswer(Exception):
    """The request went out, but no whole answer came back: the GPU may have the job."""


class _Conn(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, pool: LeanPool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.counted = True  # counts against the pool's limit until closed
        self.idle_since = 0.0
        self.key: tuple[str, int] = ("", 0)
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Reply] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timeout = 0.0
        self._last = 0.0
        self._cap = 0
        self._reset()

    def _reset(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._location: str | None = None
        self._length: int | None = None
        self._chunked = False
        self._headers_done = False
        self._interim = False
        self._fed = 0  # bytes of this answer so far: its head's while that is not over, then framing too

    def request(self, parts: list[bytes], cap: int, timeout: float) -> asyncio.Future[Reply]:
        assert self.transport is not None
        assert self._waiter is None
        self._reset()
        self._cap, self._timeout = cap, timeout
        self._waiter = waiter = self._loop.create_future()
        if len(parts) == 1:
            self.transport.write(parts[0])
        else:
            self.transport.writelines(parts)
        self._last = self._loop.time()
        self._timer = self._loop.call_at(self._last + timeout, self._check)
        return waiter

    def _check(self) -> None:
        """The read timeout: no byte of the answer for ``timeout`` seconds (re-armed lazily, not per read)."""
        self._timer = None
        if self._waiter is None:
            return
        due = self._last + self._timeout
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check)
            return
        self._fail(NoAnswer(f"no answer within {self._timeout:g} s (TimeoutError)"))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes nobody asked for: the server is out of step with us
            self.close()
            return
        self._last = self._loop.time()
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(NoAnswer(f"malformed answer: {exc or type(exc).__name__}"))
            return
        self._fed += len(data)  # after the feed: a 1xx it ended has reset the count
        if not self._headers_done and self._waiter is not None:  # bytes of a head still not ended
            if self._fed > _HEAD_MAX:
                self._fail(NoAnswer(f"the answer's head is over {_HEAD_MAX} bytes"))
        elif self._waiter is not None and self._fed - self._size > 2 * _HEAD_MAX + 8 * self._size:
            # Not the body: chunk framing or trailers, which httptools gathers at a cost growing with the
            # square of one field's size (an endless trailer took 2 s of CPU for 20 MB in a review)
            self._fail(NoAnswer("the answer's framing or trailers are out of all proportion to its body"))

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        if self._waiter is None:
            return
        if self._headers_done and self._length is None and not self._chunked and not self._interim:
            self._finish(whole=True)  # an answer without a length ends where the connection does
        else:
            self._fail(NoAnswer("connection closed before a whole answer" + (f": {exc}" if exc else "")))

    def on_message_begin(self) -> None:
        if self._waiter is None:  # a second answer to one request: what follows it cannot be trusted
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"location":
            self._location = value.decode("latin-1")
        elif lowered == b"content-length":
            try:
                self._length = int(value)
            except ValueError:
                self._length = None  # the parser refuses it
        elif lowered == b"transfer-encoding":
            self._chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # "100 Continue" and the like: the real answer follows
            self._interim = True
            return
        self._headers_done = True
        if self._length is not None and self._length > self._cap:
            self._finish(whole=False)  # not read: the connection is closed instead

    def on_body(self, body: bytes) -> None:
        if self._waiter is None or self._interim:
            return
        self._size += len(body)
        self._chunks.append(body)
        if self._size > self._cap:
            self._finish(whole=False)

    def on_message_complete(self) -> None:
        if self._interim:
            self._reset()
            return
        if self._waiter is not None:
            self._finish(whole=True)

    def _finish(self, *, whole: bool) -> None:
        waiter, self._waiter = self._waiter, None
        self._stop_timer()
        body = b"".join(self._chunks)
        reply = Reply(
            self._parser.get_status_code(), body if whole else body[: self._cap], whole, self._location
        )
        if waiter is not None and not waiter.done():
            waiter.set_result(reply)
        if (
            whole
            and not self.closed
            and self._parser.should_keep_alive()
            and not waiter_cancelled(waiter)
            and 200 <= reply.status < 300  # else maybe early (a 413): the payload's rest could lead the next
            and not self._unsent()
        ):
            self._pool.release(self)
        else:
            self.close()

    def _unsent(self) -> int:
        return 0 if self.transport is None else self.transport.get_write_buffer_size()

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        self._stop_timer()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        if self._waiter is not None:
            self._fail(NoAnswer("connection closed"))
            return
        if self.transport is not None and not self.closed:
            if self._unsent():  # close() would keep the socket (and the payload) until the GPU reads it
                self.transport.abort()
            else:
                self.transport.close()
        self.closed = True
        self._pool.forget(self)


def _closed() -> OSError:
    """The pool was closed (this process stops): not the GPU's failure (``GpuClient``: NOT_SENT)."""
    return OSError(errno.ESHUTDOWN, "the client is closed")


def waiter_cancelled(waiter: asyncio.Future[Reply] | None) -> bool:
    return waiter is not None and waiter.cancelled()


class LeanPool:
    """Keep-alive connections by (host, port), at most ``limit`` open at once (connecting, busy or idle)."""

    def __init__(
        self, *, limit: int, connect_timeout: float, read_timeout: float, keepalive: float = 30.0
    ) -> None:
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive = keepalive
        self.loop = asyncio.get_running_loop()
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._all: set[_Conn] = set()
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._targets: dict[str, Target | None] = {}
        self._closing = False

    def target(self, url: str, headers: dict[str, str]) -> Target | None:
        """``target(url, headers)``, parsed once per URL."""
        try:
            return self._targets[url]
        except KeyError:
            if len(self._targets) >= _TARGETS_MAX:
                self._targets.clear()
            made = self._targets[url] = target(url, headers)
            return made

    async def post(self, to: Target, payload: bytes, cap: int) -> Reply:
        """POST ``payload`` to ``to``; raises ``ConnectFailed``, ``ConnectTimeout`` or ``NoAnswer``."""
        conn = await self._acquire((to.host, to.port))
        head = to.head + b"Content-Length: %d\r\n\r\n" % len(payload)
        parts = [head + payload] if len(payload) < _JOIN_BELOW else [head, payload]
        return await conn.request(parts, cap, self.read_timeout)

    async def _acquire(self, key: tuple[str, int]) -> _Conn:
        while True:
            if self._closing:  # closed while this request waited for room: not sent
                raise ConnectFailed(_closed())
            conn = self._take_idle(key)
            if conn is not None:
                return conn
            if self._open < self.limit or self._close_an_idle():
                break
            # Waiting for a free connection is no failure of the GPU's (as aiohttp's pool limit was not).
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if not waiter.cancelled():  # woken, then cancelled: the turn goes to the next in line
                    self._wake()
                raise
        self._open += 1
        try:
            return await self._connect(key)
        except BaseException:
            self._open -= 1
            self._wake()
            raise

    async def _connect(self, key: tuple[str, int]) -> _Conn:
        conn = _Conn(self)
        conn.key = key
        try:
            await self._open_connection(conn, key)
        except BaseException:
            # Counted by ``_acquire``, which takes the count back: a transport made before the failure (a
            # timeout or a cancel right after the connect) must not take it back a second time.
            conn.counted = False
            if conn.transport is not None:
                conn.transport.close()
            raise
        if self._closing:  # closed while it connected: ``close`` did not see it
            conn.counted = False  # ``_acquire`` takes the count back
            conn.close()
            raise ConnectFailed(_closed())
        self._all.add(conn)
        return conn

    async def _open_connection(self, conn: _Conn, key: tuple[str, int]) -> None:
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self.loop.create_connection(lambda: conn, key[0], key[1])
        except TimeoutError as exc:
            raise ConnectTimeout(
                f"no connection to {key[0]}:{key[1]} within {self.connect_timeout:g} s"
            ) from exc
        except OSError as exc:
            raise ConnectFailed(exc) from exc

    def _take_idle(self, key: tuple[str, int]) -> _Conn | None:
        idle = self._idle.get(key)
        now = self.loop.time()
        while idle:
            conn = idle.pop()
            # ``is_closing``: the GPU closed it (EOF) and ``connection_lost`` has not run yet; a request
            # written there would be dropped unsent and judged UNKNOWN.
            closing = conn.transport is None or conn.transport.is_closing()
            if not conn.closed and not closing and now - conn.idle_since < self.keepalive:
                return conn
            conn.close()
        return None

    def _close_an_idle(self) -> bool:
        """Close the longest idle connection of any host, to make room; False when none is idle."""
        oldest: _Conn | None = None
        for conns in self._idle.values():
            if conns and (oldest is None or conns[0].idle_since < oldest.idle_since):
                oldest = conns[0]
        if oldest is None:
            return False
        self._idle[oldest.key].remove(oldest)
        oldest.close()
        return True

    def release(self, conn: _Conn) -> None:
        """``conn`` answered whole and may be used again."""
        if self._closing:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        self._idle.setdefault(conn.key, []).append(conn)
        self._wake()

    def forget(self, conn: _Conn) -> None:
        """``conn`` is closed: it no longer counts, and a request waiting for room may go."""
        if not conn.counted:
            return
        conn.counted = False
        self._open -= 1
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        self._closing = True
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
        while self._waiters:  # each woken request finds the pool closed
            self._wake()
