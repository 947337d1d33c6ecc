"""The callback client: one pooled keep-alive aiohttp session per simulator process.

Warm from each GPU's first job (``expect``): one process simulates the whole fleet, so without it the first
wave's callbacks (every slot's first job ends at the same moment) each opened a connection, one after the
other in one event loop, and the first callback reached the wire only once all of them had started: 19-35 ms
after its job ended on the efficiency benchmark (16 GPUs x 4 slots), counted in gpuq's slot turnaround. A
fleet of GPU services, each its own process, opens those connections in parallel, and a service up for more
than its first second has them open. ``--cold-callbacks`` keeps the old behaviour (bench/RESULTS.md compares).

A callback is retried with exponential backoff on connection errors, timeouts and 5xx, and never on an
answer below 500: 401/404/409/422 are the dispatcher's final word (SPEC §4) and asking again cannot change it.
"""

from __future__ import annotations

import asyncio
import random

import aiohttp

# Below uvicorn's default keep-alive timeout (5 s): the client drops an idle connection before the server
# does, so a callback is never written into a connection the dispatcher is closing.
KEEPALIVE_SECONDS = 4.0
MAX_BACKOFF_SECONDS = 8.0
#: Warm-ups of GPUs that take their first jobs within this of each other hold their connections together.
_HOLD_SECONDS = 0.05


class CallbackClient:
    def __init__(
        self,
        *,
        tries: int = 8,
        timeout: float = 5.0,
        backoff: float = 0.1,
        deadline: float = 30.0,
        pool_size: int = 512,
        warm: bool = False,
    ) -> None:
        self.tries = tries
        self.timeout = timeout
        self.backoff = backoff
        self.deadline = deadline
        self.pool_size = pool_size
        self.retries = 0  # attempts after the first, all callbacks together
        self.warm = warm  # open each GPU's callback connections at its first job (``expect``)
        self._pool_size = pool_size
        self._warm_held = 0  # connections warm-ups hold now
        self._hold: asyncio.Event | None = None  # set when the warm-ups starting together let go
        self._hold_timer: asyncio.TimerHandle | None = None
        self._warming: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        # Not the GPUs' seeded RNGs: retries depend on timing and must not shift their draws. No secrets here.
        self._jitter = random.Random()  # noqa: S311

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.pool_size, limit_per_host=0, keepalive_timeout=KEEPALIVE_SECONDS
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            cookie_jar=aiohttp.DummyCookieJar(),  # callbacks carry no cookies: skip the jar per request
            skip_auto_headers=("User-Agent",),
        )

    def expect(self, url: str, connections: int) -> None:
        """A GPU took its first job that calls back to ``url``: open ``connections`` (its slots) more
        keep-alive connections to that server now, so that its callbacks find them open (a ``GET`` of the
        ``healthz`` beside the callback's path each). Only GPUs that get jobs warm, so a big fleet that one
        dispatcher barely uses does not fill that dispatcher's connection limit (an outside trial: 400 at
        once against HTTP_MAX_CONNECTIONS=64, and 503s for everyone else). The warm-ups of GPUs starting
        together hold their connections until none has started for ``_HOLD_SECONDS`` (else each would reuse
        the one before's), and all of them together keep at most half the pool. Best effort: a failed one is
        opened by its callback as before."""
        if not self.warm or self._session is None or "://" not in url:
            return
        healthz = url.rsplit("/", 1)[0] + "/healthz"  # behind a path prefix (/gpuq/callback), that prefix's
        n = min(connections, self._pool_size // 2 - self._warm_held)
        if n <= 0:
            return
        self._warm_held += n
        loop = asyncio.get_running_loop()
        if self._hold is None or self._hold.is_set():
            self._hold = asyncio.Event()
        if self._hold_timer is not None:
            self._hold_timer.cancel()
        self._hold_timer = loop.call_later(_HOLD_SECONDS, self._hold.set)
        task = loop.create_task(self._open(healthz, n, self._hold), name="warm callbacks")
        self._warming.add(task)
        task.add_done_callback(self._warming.discard)

    async def _open(self, url: str, n: int, hold: asyncio.Event) -> None:
        session = self._session
        if session is None:
            return

        async def one() -> None:
            async with session.get(url) as response:
                await hold.wait()  # the body unread, the connection stays this warm-up's
                await response.read()  # read in full: the connection goes back to the pool

        try:
            await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
        finally:
            self._warm_held -= n

    async def close(self) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
        for task in list(self._warming):
            task.cancel()
        await asyncio.gather(*self._warming, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, url: str, token: str, body: bytes, *, retry: bool = True) -> int | None:
        """POST ``body`` to ``url``; the HTTP status of the last answer, or None when no answer came."""
        session = self._session
        if session is None:
            raise RuntimeError("CallbackClient.open() was not called")
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.deadline
        delay = self.backoff
        status: int | None = None
        tries = self.tries if retry else 1
        for attempt in range(tries):
            if attempt:
                self.retries += 1
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()  # a fully read answer lets the connection go back to the pool
                    status = response.status
            except aiohttp.InvalidURL:
                return None
            except (aiohttp.ClientError, TimeoutError):
                status = None
            if status is not None and status < 500:
                return status
            if attempt + 1 == tries:
                break
            pause = delay * self._jitter.uniform(0.5, 1.0)
            if loop.time() + pause > give_up_at:
                break
            await asyncio.sleep(pause)
            delay = min(delay * 2, MAX_BACKOFF_SECONDS)
        return status
