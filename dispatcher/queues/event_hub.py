"""One Redis subscription per process for every ``GET /tasks/{id}/events`` stream and ``POST /v1/embeddings``
wait, with the events fanned out in memory.

Before, each listener held a pub/sub connection of the pool the dispatch loop and the heartbeat shared: 99
open streams stopped dispatching for 20 s and let the heartbeat key expire, and 110 concurrent embeddings
requests got 60 immediate 503s. Now listeners cost a queue each, the hub one connection of its own, and
beyond ``EVENT_LISTENERS_MAX`` a new listener is refused (``HubFull``: the routes answer 429 + Retry-After).

Events stay best-effort as before: when the subscription is lost every listener is told (``next`` returns
None, as after a quiet spell), and the routes read the task's state from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from producer.keys import Keys

log = logging.getLogger("gpuq.events")

#: Events buffered per listener; a listener that falls further behind is told it lost some (``next`` None).
_QUEUE = 256
#: How long a new listener waits for Redis to confirm its subscription before going on anyway.
_CONFIRM_SECONDS = 5.0
#: Seconds a refused listener is told to wait (Retry-After).
RETRY_AFTER_SECONDS = 5


class HubFull(Exception):
    """EVENT_LISTENERS_MAX listeners are open in this process."""


class Listener:
    """One stream's or request's view of its task's channel."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=_QUEUE)

    def _put(self, event: dict[str, Any] | None) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:  # make room for the "you lost events" mark; the database tells the rest
            self._queue.get_nowait()
            self._queue.put_nowait(None)

    async def next(self, timeout: float) -> dict[str, Any] | None:
        """The next event, or None after ``timeout`` seconds of silence or when events may have been lost."""
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None


class EventHub:
    def __init__(self, redis: Redis, keys: Keys, limit: int) -> None:
        self.redis = redis
        self.keys = keys
        self.limit = limit
        self._channels: dict[bytes, set[Listener]] = {}
        self._confirmed: dict[bytes, asyncio.Event] = {}
        self._lock = asyncio.Lock()  # (un)subscribe commands go out in the order they are decided
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._chores: set[asyncio.Task[None]] = set()
        self.listeners = 0

    async def start(self) -> None:
        """Subscribe to an anchor channel (the connection exists from then on) and start reading."""
        self._pubsub = self.redis.pubsub()
        await self._pubsub.subscribe(self.keys.task_events("\x00hub"))
        self._reader = asyncio.create_task(self._read(), name="event-hub")

    async def stop(self) -> None:
        for task in [t for t in (self._reader, *self._chores) if t is not None]:
            task.cancel()
        await asyncio.gather(*(t for t in (self._reader, *self._chores) if t), return_exceptions=True)
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()

    @contextlib.asynccontextmanager
    async def listen(self, task_id: str) -> AsyncIterator[Listener]:
        """Listen to one task's channel; the subscription is confirmed before this yields, so an event
        published after it (a state read after it) cannot slip by. Raises HubFull at the limit."""
        if self.listeners >= self.limit:
            raise HubFull(f"{self.limit} event listeners are open (EVENT_LISTENERS_MAX)")
        if self._pubsub is None:
            raise RedisError("the event hub is not started")
        channel = self.keys.task_events(task_id).encode()
        listener = Listener()
        members = self._channels.get(channel)
        fresh = members is None
        if members is None:
            members = self._channels[channel] = set()
            self._confirmed[channel] = asyncio.Event()
        members.add(listener)
        confirmed = self._confirmed[channel]
        self.listeners += 1
        try:
            if fresh:
                async with self._lock:
                    await self._pubsub.subscribe(channel)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(confirmed.wait(), _CONFIRM_SECONDS)
            yield listener
        finally:
            self.listeners -= 1
            members.discard(listener)
            if not members and self._channels.get(channel) is members:
                del self._channels[channel]
                self._confirmed.pop(channel, None)
                task = asyncio.create_task(self._unsubscribe(channel), name="event-hub-unsubscribe")
                self._chores.add(task)
                task.add_done_callback(self._chores.discard)

    async def _unsubscribe(self, channel: bytes) -> None:
        async with self._lock:
            if channel in self._channels:  # a listener came back meanwhile: stay subscribed
                return
            try:
                await self._pubsub.unsubscribe(channel)
            except (RedisError, OSError) as exc:
                log.warning("could not unsubscribe", extra={"action": "event_hub", "error": str(exc)})

    async def _read(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=5.0)
            except (RedisError, OSError) as exc:
                log.warning(
                    "event subscription lost; resubscribing", extra={"action": "event_hub", "error": str(exc)}
                )
                for members in self._channels.values():
                    for listener in members:
                        listener._put(None)
                await asyncio.sleep(0.5)
                continue
            if message is None:
                continue
            kind, channel = message["type"], message["channel"]
            if kind == "message":
                listening = self._channels.get(channel)
                if not listening:
                    continue
                try:
                    event = orjson.loads(message["data"])
                except orjson.JSONDecodeError:
                    continue
                for listener in listening:
                    listener._put(event)
            elif kind == "subscribe" and channel in self._confirmed:
                self._confirmed[channel].set()
