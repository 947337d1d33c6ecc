"""What slow or numerous clients can cost the dispatcher process: bounded.

Found: 300 connections sending a byte every 5 s stayed open indefinitely; at 1,100 (open-file limit 1,024)
``/healthz`` failed, a heartbeat was dropped and GPU requests failed with "Too many open files", taking a
healthy GPU out of rotation. So:

- ``GuardedHttp`` (uvicorn's httptools protocol): a request's headers and body must arrive within
  REQUEST_READ_TIMEOUT_SECONDS of its first byte (of the connection, for the first request), else 408 and
  the connection is closed, except that a body still arriving at MIN_BODY_BYTES_PER_SECOND or faster gets
  another such spell (a legitimate GPU posting a large result over a slow link took longer than the deadline
  and every retry of its callback was cut off the same way); past HTTP_MAX_CONNECTIONS open connections a
  new one is answered 503 and closed at once. A response being streamed (event streams) is not a read: no
  deadline applies to it.
- ``raise_open_files``: the soft RLIMIT_NOFILE is raised to the hard limit at start, and the connection cap
  lowered to what the limit leaves after GPU requests, Redis and the database (``dispatcher/fds.py``).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from dispatcher import fds
from dispatcher.errors import Unavailable, from_status, raw_http

log = logging.getLogger("gpuq.http")

#: A request body arriving at least this fast is not cut off by the read deadline (Apache's mod_reqtimeout
#: uses 500 bytes/s): a slowloris trickle is far below it, a slow link far above.
MIN_BODY_BYTES_PER_SECOND = 1024

#: Every request body may hold this much in memory whatever else is held (a callback, a poll, an API call).
FREE_BODY_BYTES = 64 * 1024
#: Bytes past each body's first FREE_BODY_BYTES held at once by all requests together. Unauthenticated
#: callbacks trickling 8 MiB bodies on 150 connections took the process from 257 MB to 1.25 GB (an outside
#: attack; HTTP_MAX_CONNECTIONS of them would be ~32 GiB): past this, a body is answered 503 (a GPU retries
#: its callback), and small bodies, such as most callbacks, are never held back.
BODY_BUDGET_BYTES = 256 * 1024 * 1024


class BodyBudget:
    """The bytes of request bodies held past their first FREE_BODY_BYTES, process-wide (one event loop)."""

    def __init__(self, total: int = BODY_BUDGET_BYTES) -> None:
        self.total = total
        self.held = 0
        self.refused = 0  # bodies refused for it, for the log and tests

    def grow(self, before: int, after: int) -> bool:
        """A body grew from ``before`` to ``after`` bytes: take what it holds past the free part, or False
        (nothing taken) when that would pass the budget."""
        more = max(0, after - FREE_BODY_BYTES) - max(0, before - FREE_BODY_BYTES)
        if self.held + more > self.total:
            self.refused += 1
            if self.refused % 100 == 1:
                log.warning(
                    "too many large request bodies in memory; refusing",
                    extra={"action": "body_budget", "held": self.held, "refused": self.refused},
                )
            return False
        self.held += more
        return True

    def release(self, size: int) -> None:
        """A body of ``size`` bytes is no longer held."""
        self.held -= max(0, size - FREE_BODY_BYTES)


#: One budget for the GPUs' callbacks, one for everything else: API requests hold their bodies while they wait
#: (``/v1/embeddings`` up to 30 s), and those filled a shared budget until a GPU's result got 503 after 503
#: and was lost (an outside review). Forged callbacks can still fill the callbacks' own.
BODIES = BodyBudget()
CALLBACK_BODIES = BodyBudget()
BUSY = Unavailable(
    "too many large request bodies in flight; try again",
    headers={"Retry-After": "1", "Connection": "close"},  # the rest of the body is not read
)

_408 = raw_http(from_status(408, "the request was not received in time (slow)"), "Request Timeout")
_503 = raw_http(
    Unavailable("too many open connections; try again", headers={"Retry-After": "1"}), "Service Unavailable"
)


def raise_open_files(wanted_connections: int) -> int:
    """Raise the soft open-file limit to the hard one; returns the connection cap it leaves room for."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning(
                "could not raise the open-file limit", extra={"action": "fd_limit", "error": str(exc)}
            )
    room = fds.inbound(soft)  # what GPU requests and the stores leave (dispatcher/fds.py)
    if room < wanted_connections:
        log.warning(
            "open-file limit too low for HTTP_MAX_CONNECTIONS; serving fewer connections",
            extra={"action": "fd_limit", "nofile": soft, "wanted": wanted_connections, "connections": room},
        )
    return min(wanted_connections, room)


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's protocol with a read deadline per request and a cap on open connections. The limits are
    class attributes, set once at start (``configure``), as uvicorn builds one protocol per connection."""

    read_timeout: float = 10.0
    max_connections: int = 4096
    timed_out = 0  # requests closed for slowness, for the log and tests
    refused = 0  # connections closed at once for the cap

    @classmethod
    def configure(cls, *, read_timeout: float, max_connections: int) -> type[GuardedHttp]:
        return type("GuardedHttp", (cls,), {"read_timeout": read_timeout, "max_connections": max_connections})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._in_body = False  # the current request's headers are in: its body is arriving
        self._received = 0  # bytes received since the deadline was armed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            type(self).refused += 1
            if type(self).refused % 100 == 1:
                log.warning(
                    "too many open connections; refusing",
                    extra={"action": "http_refused", "limit": self.max_connections, "refused": self.refused},
                )
            transport.write(_503)
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_body = False
        self._arm()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._in_body = True

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is None:
            self._received = 0
            self._deadline = self.loop.call_later(self.read_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._in_body and self._received >= self.read_timeout * MIN_BODY_BYTES_PER_SECOND:
            self._arm()  # a large body on a slow link, still coming: another spell
            return
        type(self).timed_out += 1
        log.info(
            "request not received in time; closing",
            extra={"action": "http_408", "client": self.client, "seconds": self.read_timeout},
        )
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_408)
        self.transport.close()
