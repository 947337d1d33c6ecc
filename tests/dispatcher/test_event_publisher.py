"""``EventPublisher`` on one Redis: a buffer's events go out as one script call (``PUBLISH_ALL``), after a short
linger. What a listener must still get: every event, each task's in the order published, payloads byte for
byte (odd characters too), batches past ``_BATCH`` in full, and ``publish_in_order`` returning only once its
events are out."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import redis
from redis.asyncio import Redis

from dispatcher.queues import task_events
from dispatcher.queues.task_events import EventPublisher
from producer.keys import Keys


def _drain(sub: redis.client.PubSub, want: int, timeout: float = 10.0) -> list[tuple[str, dict[str, Any]]]:
    """(channel, event) of the next ``want`` messages, in the order received."""
    got: list[tuple[str, dict[str, Any]]] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        message = sub.get_message(timeout=0.5)
        if message and message["type"] == "message":
            got.append((message["channel"].decode(), json.loads(message["data"])))
    return got


def _publish(redis_url: str, keys: Keys, calls: list[tuple[str, str, dict[str, Any]]]) -> int:
    """Publish ``calls`` through one EventPublisher, as the dispatcher's loop does; the script calls made."""

    async def run() -> int:
        client = Redis.from_url(redis_url)
        work: list[asyncio.Future[None]] = []
        events = EventPublisher(client, keys, lambda coro: work.append(asyncio.ensure_future(coro)))
        sent = 0
        original = events._publish_all

        async def counted(**kwargs: Any) -> Any:
            nonlocal sent
            sent += 1
            return await original(**kwargs)

        events._publish_all = counted  # type: ignore[method-assign]
        for name, task_id, fields in calls:
            events.publish(name, task_id, **fields)
        while work:
            await work.pop()
        await client.aclose()
        return sent

    return asyncio.run(run())


def test_every_event_arrives_in_order_per_task(redis_url: str, key_prefix: str, rds: redis.Redis) -> None:
    """1,200 events of 3 tasks, published in one burst: more than two batches of ``_BATCH``, all delivered,
    each task's in its order; the burst shares a few script calls instead of one command per event."""
    keys = Keys(prefix=key_prefix)
    tasks = ["t-a", "t-b", "t-c"]
    sub = rds.pubsub()
    sub.subscribe(*(keys.task_events(t) for t in tasks))
    for _ in tasks:
        sub.get_message(timeout=1)
    calls = [
        ("heartbeat", tasks[i % 3], {"seq": i, "note": 'ünïcødé \u2028 "quoted"\n'}) for i in range(1200)
    ]
    sent = _publish(redis_url, keys, calls)
    got = _drain(sub, 1200)
    sub.close()
    assert len(got) == 1200
    assert sent == -(-1200 // task_events._BATCH)  # 3 calls: the linger gathered the whole burst
    for t in tasks:
        seqs = [e["seq"] for channel, e in got if channel == keys.task_events(t)]
        assert seqs == [i for i in range(1200) if tasks[i % 3] == t]
    assert all(e["note"] == 'ünïcødé \u2028 "quoted"\n' and e["task_id"] in tasks for _, e in got)


def test_publish_in_order_returns_once_its_events_are_out(
    redis_url: str, key_prefix: str, rds: redis.Redis
) -> None:
    """``publish_in_order`` waits for its events and every event queued before them, linger included."""
    keys = Keys(prefix=key_prefix)
    sub = rds.pubsub()
    sub.subscribe(keys.task_events("t-1"))
    sub.get_message(timeout=1)

    async def run() -> None:
        client = Redis.from_url(redis_url)
        work: list[asyncio.Future[None]] = []
        events = EventPublisher(client, keys, lambda coro: work.append(asyncio.ensure_future(coro)))
        events.publish("retrying", "t-1", attempt=1)
        await events.publish_in_order([("queued", "t-1", {"attempt": 1})], wait=5.0)
        # both out by now: the subscriber's buffer holds them before the flush task is even awaited
        assert [e["event"] for _, e in _drain(sub, 2, timeout=2)] == ["retrying", "queued"]
        while work:
            await work.pop()
        await client.aclose()

    asyncio.run(run())
    sub.close()
