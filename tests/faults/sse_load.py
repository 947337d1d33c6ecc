"""Many open ``GET /tasks/{id}/events`` streams and a sampler of the dispatcher's heartbeat key, for the
tests that check what clients can cost the dispatch loop (tests/faults/test_edge_streams.py).

The streams are raw asyncio connections in a thread of their own (an httpx client per stream would cost the
test process more than the dispatcher); each reads its answer's status line and keeps draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import threading
from collections import Counter
from dataclasses import dataclass, field

import redis


def raise_own_fd_limit(needed: int) -> None:
    """The test process holds one socket per stream: make room, or skip is the caller's business."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))


@dataclass
class Streams:
    """``count`` event streams of ``path`` kept open until ``close``; ``statuses`` counts their answers."""

    port: int
    path: str
    token: str
    count: int
    statuses: Counter[int] = field(default_factory=Counter)
    opened: threading.Event = field(default_factory=threading.Event)
    _stop: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    def open(self) -> Streams:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(60)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        answered = 0

        async def one() -> None:
            nonlocal answered
            writer = None
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(
                    f"GET {self.path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {self.token}\r\n"
                    "Accept: text/event-stream\r\n\r\n".encode()
                )
                line = await reader.readline()
                self.statuses[int(line.split()[1]) if line else 0] += 1
                answered += 1
                if answered == self.count:
                    self.opened.set()
                while not self._stop.is_set() and await reader.read(65536):
                    pass
            except OSError:
                self.statuses[-1] += 1
                answered += 1
                if answered == self.count:
                    self.opened.set()
            finally:
                if writer is not None:
                    writer.close()

        tasks = []
        for _ in range(self.count):
            tasks.append(asyncio.create_task(one()))
            await asyncio.sleep(0)  # let each connect start; the backlog takes the rest
        await self._stop.wait()
        for t in tasks:
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)


class HeartbeatSampler:
    """Reads the dispatcher's heartbeat key's TTL every ``every`` seconds in a thread; ``missing`` counts
    the samples that found no key (another dispatcher would then sweep this one's jobs)."""

    def __init__(self, url: str, key: str, every: float = 0.1) -> None:
        self.rds = redis.Redis.from_url(url)
        self.key = key
        self.every = every
        self.samples = 0
        self.missing = 0
        self.lowest_ms: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HeartbeatSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.rds.close()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            ttl = int(self.rds.pttl(self.key))
            self.samples += 1
            if ttl < 0:
                self.missing += 1
            elif self.lowest_ms is None or ttl < self.lowest_ms:
                self.lowest_ms = ttl
