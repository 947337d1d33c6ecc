"""One live process per DISPATCHER_ID (``Presence.claim`` and the heartbeat), against the real Redis.

Found by an outside attack: two dispatchers started from one ``.env`` with ``DISPATCHER_ID=worker`` both ran,
took each other's jobs for their own, and the simulated GPUs counted fifth jobs and jobs run twice.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis

from dispatcher.queues.intake import Intake
from dispatcher.queues.presence import DuplicateDispatcher, client_name
from producer.keys import Keys


def _intake(rds: Redis, prefix: str, instance: str) -> Intake:
    return Intake(rds, Keys(prefix), "worker", [f"{prefix}q"], instance=instance)


def test_a_second_process_with_a_live_id_is_refused(redis_url: str, key_prefix: str) -> None:
    async def scenario() -> None:
        rds = Redis.from_url(redis_url)
        # the first one's connections are named as a dispatcher's are (dispatcher/__main__.py)
        named = Redis.from_url(redis_url, client_name=client_name("beat", "worker", "aaaa"))
        first, second = _intake(named, key_prefix, "aaaa"), _intake(rds, key_prefix, "bbbb")
        await first.claim()
        await first.heartbeat()

        async def beating() -> None:  # the first one lives: its heartbeat goes on
            while True:
                await first.heartbeat()
                await asyncio.sleep(0.05)

        beat = asyncio.ensure_future(beating())
        try:
            with pytest.raises(DuplicateDispatcher, match="DISPATCHER_ID=worker"):
                await second.claim(poll=0.1)
        finally:
            beat.cancel()
        # the first still holds its key: refusing the second changed nothing
        assert await rds.get(Keys(key_prefix).alive("worker")) == b"aaaa"
        await named.aclose()
        await rds.aclose()

    asyncio.run(scenario())


def test_a_restart_after_a_kill_takes_the_id_over_at_once(redis_url: str, key_prefix: str) -> None:
    # A process killed -9 leaves its heartbeat key for up to its TTL, but no connection to Redis.
    async def scenario() -> None:
        rds = Redis.from_url(redis_url)
        dead, heir = _intake(rds, key_prefix, "dead0"), _intake(rds, key_prefix, "heir0")
        await dead.claim()
        started = time.monotonic()
        await heir.claim(poll=0.1)
        assert time.monotonic() - started < 1.0  # not the key's TTL (10 s)
        assert await rds.get(Keys(key_prefix).alive("worker")) == b"heir0"
        # the dead one's retire (a late graceful stop) does not delete the heir's key
        await dead.retire()
        assert await rds.get(Keys(key_prefix).alive("worker")) == b"heir0"
        await rds.aclose()

    asyncio.run(scenario())


def test_a_lingering_connection_without_heartbeat_is_waited_out(redis_url: str, key_prefix: str) -> None:
    # Its connection still open (a host gone without closing it, say) but its heartbeat not refreshed: the
    # key is waited out, not taken at once, and not refused.
    async def scenario() -> None:
        rds = Redis.from_url(redis_url)
        ghost_client = Redis.from_url(redis_url, client_name=client_name("beat", "worker", "ghost0"))
        await ghost_client.ping()  # connected, named as the ghost's heartbeat client
        key = Keys(key_prefix).alive("worker")
        await rds.set(key, "ghost0", px=600)
        heir = _intake(rds, key_prefix, "heir1")
        started = time.monotonic()
        await heir.claim(poll=0.1)
        waited = time.monotonic() - started
        assert 0.3 < waited < 5
        assert await rds.get(key) == b"heir1"
        await ghost_client.aclose()
        await rds.aclose()

    asyncio.run(scenario())


def test_a_heartbeat_that_finds_its_key_taken_stops_the_process(redis_url: str, key_prefix: str) -> None:
    async def scenario() -> None:
        rds = Redis.from_url(redis_url)
        old, new = _intake(rds, key_prefix, "old000"), _intake(rds, key_prefix, "new000")
        await old.claim()
        await rds.set(Keys(key_prefix).alive("worker"), "new000", ex=10)  # taken over while `old` stalled
        with pytest.raises(DuplicateDispatcher, match="taken by another process"):
            await old.heartbeat()
        await new.heartbeat()  # the new one goes on
        await rds.aclose()

    asyncio.run(scenario())
