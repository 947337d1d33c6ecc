"""A dispatcher inside the caller's event loop, against the real stores: for tests that must be exact.

``in_process`` builds and starts a ``Dispatcher`` without its background tasks (``background=False``):
no loop, no wake-up listener, no housekeeping. The test then plays every part in the order it chooses:
``await d.dispatch_once()`` is one pass of the loop, ``await d.end_attempt(...)`` is a callback (hand-off
included), ``await settle(d)`` waits until every request, hand-off and Redis settlement it started is done,
and ``run_until_idle`` is the loop in burst mode. With ``background=True`` it is the daemon minus HTTP.

    async with in_process(settings) as d:
        await d.dispatch_once()
        await settle(d)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from dispatcher.core import Dispatcher
from dispatcher.db.engine import make_engine
from dispatcher.settings import DispatcherSettings
from producer.connect import async_client, initialized


@asynccontextmanager
async def in_process(settings: DispatcherSettings, *, background: bool = False) -> AsyncIterator[Dispatcher]:
    engine = make_engine(settings.db_url(), pool_size=4)
    redis = async_client(settings.redis_dsn(), cluster=settings.redis_cluster)
    d = Dispatcher(settings, engine, await initialized(redis))
    try:
        await d.start(background=background)
        yield d
    finally:
        await d.stop()
        await redis.aclose()
        engine.dispose()


async def settle(d: Dispatcher) -> None:
    """Until the background work this dispatcher started (requests and their answers, hand-off
    settlements, event publishing) is done, including what that work started in turn."""
    while d.inflight:
        await asyncio.wait(set(d.inflight))


async def run_until_idle(d: Dispatcher, *, passes: int = 10_000) -> int:
    """The loop in burst mode: passes until one finds nothing to do and nothing is in flight; returns how
    many passes did something. Ends of attempts still come from the test (or the GPUs' callbacks)."""
    for busy in range(passes):
        d.slot_freed()  # each pass looks at the free slots, as the loop's idle timeout would
        did = await d.dispatch_once()
        await settle(d)
        if not did:
            return busy
    raise RuntimeError(f"still busy after {passes} passes")
