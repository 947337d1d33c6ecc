"""The wake-up channel (``Keys.wake``): what a process tells every dispatcher, how a dispatcher hears it.

A wake-up is a shortcut, never the only way work is found (each dispatcher looks on its own every idle poll):
a message lost on a reconnect costs a delay, not a job. The loop (``loop/core.py``) reads through
``WakeChannel``; the CLI, which frees slots and retries tasks from outside any dispatcher, sends with
``wake_sync``. Both live here so that ``queues/`` stays the one room that talks to Redis.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from producer.keys import Keys


class WakeChannel:
    """One subscription to the wake-up channel. ``open`` subscribes, ``next`` gives the next message's data
    (None when none came within ``timeout``), ``close`` lets the connection go. Errors are the caller's: the
    loop resubscribes with a new channel when one breaks."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis, self._keys = redis, keys
        self._pubsub: PubSub | None = None

    async def open(self) -> None:
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(self._keys.wake)

    async def next(self, timeout: float) -> Any | None:
        assert self._pubsub is not None, "open() first"
        message = await self._pubsub.get_message(timeout=timeout)
        return None if message is None else message.get("data")

    async def close(self) -> None:
        if self._pubsub is not None:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]


def wake_sync(client: redis.Redis, keys: Keys, what: str) -> None:
    """Tell every dispatcher to look again now, from a blocking client (the CLI)."""
    client.publish(keys.wake, what)
