"""The wake-up listener survives a broken connection of any kind (found on a Redis Cluster failover).

redis-py's reconnect to a node killed meanwhile wrote to a transport uvloop had closed and raised
``RuntimeError: ... the handler is closed``, not a RedisError: the listener, a side task, died, and a side
task that dies stops the dispatcher. Wake-ups are a shortcut (the loop looks on its own), so the listener
resubscribes and the dispatcher goes on.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from dispatcher.settings import DispatcherSettings
from dispatcher.testing import in_process
from tests.dispatcher.harness import BEARER, SECRET


class BrokenOnce:
    """A pubsub whose first read fails as uvloop's closed transport does, then carries one wake-up."""

    made = 0

    def __init__(self) -> None:
        BrokenOnce.made += 1
        self.first = BrokenOnce.made == 1
        self.delivered = False

    async def subscribe(self, *channels: Any) -> None:
        return None

    async def get_message(self, timeout: float = 0) -> dict[str, Any] | None:
        if self.first:
            raise RuntimeError(
                "unable to perform operation on <TCPTransport closed=True>; the handler is closed"
            )
        if not self.delivered:
            self.delivered = True
            return {"type": "message", "data": b"look"}
        await asyncio.sleep(0.01)
        return None

    async def aclose(self) -> None:
        return None


def test_a_broken_wake_channel_is_resubscribed_not_fatal(
    database_url: str, redis_url: str, key_prefix: str
) -> None:
    settings = DispatcherSettings(
        database_url=database_url,
        redis_url=redis_url,
        redis_key_prefix=key_prefix,
        task_queues=f"q-{uuid.uuid4().hex[:6]}",
        gpu_endpoints="",
        callback_secret=SECRET,
        bearer_token=BEARER,
        dispatcher_id=f"t-{uuid.uuid4().hex[:6]}",
    )

    async def main() -> None:
        async with in_process(settings) as d:
            d.redis.pubsub = lambda **_: BrokenOnce()  # type: ignore[method-assign]
            listener = asyncio.create_task(d._listen())
            # THEN it resubscribes (a second pubsub) and reads the wake-up carried there
            for _ in range(500):
                if BrokenOnce.made >= 2:
                    break
                await asyncio.sleep(0.01)
            assert BrokenOnce.made >= 2, "the listener did not resubscribe"
            assert not listener.done(), listener.exception() if listener.done() else None
            d.rt.stopping.set()
            await asyncio.wait_for(listener, 10)
            assert d.rt.fatal is None

    asyncio.run(main())
