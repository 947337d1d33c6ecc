"""``Dispatcher.room`` (a hand-off counted free slots it could not fill) must not swallow a look at the free
slots that something else asked for meanwhile (a slot freed by another dispatcher, an operator): it cleared
the flag, so those slots waited for the idle poll."""

from __future__ import annotations

import asyncio
from pathlib import Path

from redis.asyncio import Redis

from dispatcher.db.engine import make_engine
from dispatcher.loop.core import Dispatcher
from dispatcher.settings import DispatcherSettings
from tests.dispatcher.harness import BEARER, SECRET


def test_room_keeps_a_look_asked_for_by_someone_else(tmp_path: Path, redis_url: str, key_prefix: str) -> None:
    settings = DispatcherSettings(
        database_url=f"sqlite:///{tmp_path / 'room.db'}",
        redis_url=redis_url,
        redis_key_prefix=key_prefix,
        task_queues="q",
        callback_secret=SECRET,
        bearer_token=BEARER,
    )

    async def main() -> None:
        redis = Redis.from_url(redis_url)
        engine = make_engine(settings.db_url(), pool_size=1)
        d = Dispatcher(settings, engine, redis)
        try:
            assert d.look_wanted()  # a new dispatcher looks once
            # GIVEN a hand-off's room: the loop fills it without reading the free slots again
            d.room({"a": 2})
            assert d.take_room() == {"a": 2} and not d.look_wanted()
            # WHEN another dispatcher frees a slot (its wake-up) and then a hand-off here counts room
            d.slot_freed()
            d.room({"b": 1})
            # THEN the pass gets the room and still looks at the free slots
            assert d.take_room() == {"b": 1}
            assert d.look_wanted()
            while d.inflight:
                await asyncio.wait(set(d.inflight))
        finally:
            await redis.aclose()
            engine.dispose()

    asyncio.run(main())
