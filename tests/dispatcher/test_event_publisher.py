"""``EventPublisher`` on one Redis: a buffer's events go out as script calls (``PUBLISH_ALL``). What a listener
must still get: every event, each task's in the order published, payloads byte for byte (odd characters
too), batches past ``_BATCH`` in full, a burst of large results without its subscription dropped, events
in order with ``publish_now``, and ``publish_in_order`` returning only once its events are out."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import tracemalloc
from typing import Any

import pytest
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


def _subscribed(rds: redis.Redis, keys: Keys, *task_ids: str) -> redis.client.PubSub:
    """A subscriber to the tasks' channels, their confirmations read."""
    sub = rds.pubsub()
    sub.subscribe(*(keys.task_events(t) for t in task_ids))
    for _ in task_ids:
        sub.get_message(timeout=1)
    return sub


def _publisher(
    client: Redis, keys: Keys, **options: Any
) -> tuple[EventPublisher, list[asyncio.Future[None]]]:
    """An EventPublisher whose background flushes are kept in the list returned, to be awaited."""
    work: list[asyncio.Future[None]] = []
    return EventPublisher(
        client, keys, lambda coro: work.append(asyncio.ensure_future(coro)), **options
    ), work


def _publish(redis_url: str, keys: Keys, calls: list[tuple[str, str, dict[str, Any]]]) -> int:
    """Publish ``calls`` through one EventPublisher, as the dispatcher's loop does; the script calls made."""

    async def run() -> int:
        client = Redis.from_url(redis_url)
        events, work = _publisher(client, keys)
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
    sub = _subscribed(rds, keys, *tasks)
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
    sub = _subscribed(rds, keys, "t-1")

    async def run() -> None:
        client = Redis.from_url(redis_url)
        events, work = _publisher(client, keys)
        events.publish("retrying", "t-1", attempt=1)
        await events.publish_in_order([("queued", "t-1", {"attempt": 1})], wait=5.0)
        # both out by now: the subscriber's buffer holds them before the flush task is even awaited
        assert [e["event"] for _, e in _drain(sub, 2, timeout=2)] == ["retrying", "queued"]
        while work:
            await work.pop()
        await client.aclose()

    asyncio.run(run())
    sub.close()


def test_a_burst_of_large_results_keeps_the_subscription(
    redis_url: str, key_prefix: str, rds: redis.Redis
) -> None:
    """40 ``finished`` events of 1 MB each, read as fast as one subscriber connection can (as the event
    hub's): all arrive. One script of all 40 put 40 MB in the subscriber's output buffer at once, past
    Redis's 32 MB pubsub limit, and Redis dropped the connection (0 of 40, an outside review)."""
    keys = Keys(prefix=key_prefix)
    tasks = [f"t-{i}" for i in range(40)]
    sub = _subscribed(rds, keys, *tasks)
    got: list[tuple[str, dict[str, Any]]] = []
    errors: list[Exception] = []

    def read() -> None:
        try:
            got.extend(_drain(sub, len(tasks), timeout=30))
        except Exception as exc:  # the connection dropped: the test fails below, naming it
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    result = {"text": "x" * 1_000_000}
    sent = _publish(redis_url, keys, [("finished", t, {"result": result}) for t in tasks])
    reader.join(40)
    sub.close()
    assert not errors
    assert [e["task_id"] for _, e in got] == tasks
    assert all(e["result"] == result for _, e in got)
    assert sent == len(tasks)  # one call each: _BATCH_BYTES holds one such event


def test_an_event_published_first_arrives_first(redis_url: str, key_prefix: str, rds: redis.Redis) -> None:
    """``dispatched`` through the buffer, then the GPU's first ``partial`` (``publish_now``) while the buffer's
    script call is still on its way (held 50 ms here; a busy CI box held it past 2 ms): when ``publish_now``
    returns, a listener has both, in that order (read with the loop held, so no flush goes on meanwhile). A
    linger on the buffer, then a PUBLISH of publish_now's own on another pooled connection, let the partial
    overtake it; a wait for the events before the partial only would return before the partial is out."""
    keys = Keys(prefix=key_prefix)
    sub = _subscribed(rds, keys, "t-1")
    got: list[tuple[str, dict[str, Any]]] = []

    async def run() -> None:
        client = Redis.from_url(redis_url)
        events, work = _publisher(client, keys)
        original = events._publish_all

        async def slow(**kwargs: Any) -> Any:
            await asyncio.sleep(0.05)
            return await original(**kwargs)

        events._publish_all = slow  # type: ignore[method-assign]
        events.publish("dispatched", "t-1", attempt=1)
        await asyncio.sleep(0.002)
        await events.publish_now("partial", "t-1", attempt=1, partial={"text": "he"})
        got.extend(_drain(sub, 2, timeout=2))  # blocking: the loop does nothing more meanwhile
        while work:
            await work.pop()
        await client.aclose()

    asyncio.run(run())
    assert [e["event"] for _, e in got] == ["dispatched", "partial"]
    sub.close()


def test_a_flush_cancelled_before_it_ran_does_not_stop_later_events(
    redis_url: str, key_prefix: str, rds: redis.Redis
) -> None:
    """A stopping loop cancels background work, maybe a flush before its first step (its ``finally`` never
    runs): later events still go out, and ``publish_now`` does not wait out its limit on each."""
    keys = Keys(prefix=key_prefix)
    sub = _subscribed(rds, keys, "t-3")
    waited: list[float] = []

    async def run() -> None:
        client = Redis.from_url(redis_url)
        events, work = _publisher(client, keys)
        events.publish("dispatched", "t-3", attempt=1)
        work.pop().cancel()  # cancelled before it ran
        await asyncio.sleep(0)
        started = time.monotonic()
        await events.publish_now("partial", "t-3", attempt=1, partial={"text": "x"})
        waited.append(time.monotonic() - started)
        while work:
            await work.pop()
        await client.aclose()

    asyncio.run(run())
    assert [e["event"] for _, e in _drain(sub, 2, timeout=2)] == ["dispatched", "partial"]
    assert waited[0] < task_events.NOW_WAIT_SECONDS / 2
    sub.close()


def test_publish_now_that_runs_out_of_time_says_so(
    key_prefix: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis that takes the call and never answers: ``publish_now`` returns after its limit (the callback
    must be answered) and logs that the event may arrive after a later one."""
    monkeypatch.setattr(task_events, "NOW_WAIT_SECONDS", 0.3)
    mute = socket.create_server(("127.0.0.1", 0))
    port = mute.getsockname()[1]

    async def run() -> float:
        client = Redis(host="127.0.0.1", port=port, socket_timeout=30)
        events, work = _publisher(client, Keys(prefix=key_prefix))
        started = time.monotonic()
        await events.publish_now("partial", "t-4", attempt=1, partial={})
        took = time.monotonic() - started
        for w in work:
            w.cancel()
        await asyncio.gather(*work, return_exceptions=True)
        await client.aclose()
        return took

    with caplog.at_level(logging.WARNING, logger="gpuq.events"):
        took = asyncio.run(run())
    mute.close()
    assert 0.3 <= took < 5
    assert any("not out in time" in r.getMessage() and r.task_id == "t-4" for r in caplog.records)  # type: ignore[attr-defined]


def test_publish_now_returns_once_redis_has_it(redis_url: str, key_prefix: str, rds: redis.Redis) -> None:
    """The caller answers the GPU right after ``publish_now``; the GPU's next partial may reach another
    process. So when it returns, the event is already in Redis: a listener gets it without waiting on any
    further work of the publisher's loop."""
    keys = Keys(prefix=key_prefix)
    sub = _subscribed(rds, keys, "t-2")
    got: list[tuple[str, dict[str, Any]]] = []

    async def run() -> None:
        client = Redis.from_url(redis_url)
        events, work = _publisher(client, keys)
        await events.publish_now("partial", "t-2", attempt=1, partial={"text": "x"})
        got.extend(_drain(sub, 1, timeout=2))  # the loop does nothing more meanwhile: blocking read
        while work:
            await work.pop()
        await client.aclose()

    asyncio.run(run())
    assert [e["event"] for _, e in got] == ["partial"]
    sub.close()


def _stalled(
    client: Redis, keys: Keys, bound: int
) -> tuple[EventPublisher, list[asyncio.Future[None]], list[int], asyncio.Event]:
    """A publisher bounded to ``bound`` whose script calls wait for the event returned (Redis stalled), and
    the list its drop hook appends to."""
    hooked: list[int] = []
    events, work = _publisher(client, keys, max_pending_bytes=bound, on_drop=lambda: hooked.append(1))
    original, release = events._publish_all, asyncio.Event()

    async def stalled(**kwargs: Any) -> Any:
        await release.wait()
        return await original(**kwargs)

    events._publish_all = stalled  # type: ignore[method-assign]
    return events, work, hooked, release


def test_a_stalled_redis_does_not_grow_the_buffer_past_its_bound(
    redis_url: str, key_prefix: str, rds: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stalls while results keep coming (a script call on its way, held until released here): the
    events past ``max_pending_bytes`` are dropped, counted (``dropped``, the metric's hook) and said, the
    last ones once the buffer drained; those kept still reach a listener in full and in order once Redis
    answers, and later events go out again as before."""
    keys = Keys(prefix=key_prefix)
    sub = _subscribed(rds, keys, "t-5")
    result = "r" * 1000  # ~1.3 KB per event in the buffer
    bound = 20_000
    out: dict[str, Any] = {}

    async def run() -> None:
        client = Redis.from_url(redis_url)
        events, work, hooked, release = _stalled(client, keys, bound)
        events.publish("finished", "t-5", i=0, result=result)
        await asyncio.sleep(0.05)  # the flush took it and waits on Redis: the buffer is empty again
        queued = [events.publish("finished", "t-5", i=i, result=result) for i in range(1, 100)]
        out["held"], out["cost"] = events._pending_bytes, events._pending_bytes / sum(queued)
        out["queued"], out["dropped"], out["hooked"] = [True, *queued], events.dropped, len(hooked)
        release.set()
        while work:
            await work.pop()
        out["drained"] = events._pending_bytes
        out["after"] = [events.publish("finished", "t-5", i=i, result=result) for i in range(100, 105)]
        while work:
            await work.pop()
        await client.aclose()

    with caplog.at_level(logging.WARNING, logger="gpuq.events"):
        asyncio.run(run())
    kept = [i for i, q in enumerate(out["queued"]) if q]
    assert bound - out["cost"] < out["held"] <= bound  # full, not past it
    assert out["drained"] == 0  # what was counted in is counted out
    assert 10 < len(kept) < 20
    assert kept == list(range(len(kept)))  # the newest were dropped, nothing in between
    assert out["dropped"] == out["hooked"] == 100 - len(kept)
    said = [r.dropped for r in caplog.records if "events dropped" in r.getMessage()]  # type: ignore[attr-defined]
    assert said == [1, out["dropped"] - 1]  # at the first drop, then the rest once drained
    got = _drain(sub, len(kept) + 5, timeout=5)
    assert [e["i"] for _, e in got] == [*kept, 100, 101, 102, 103, 104]
    assert out["after"] == [True] * 5
    assert all(e["result"] == result for _, e in got)
    assert _drain(sub, 1, timeout=0.5) == []  # nothing dropped arrived after all
    sub.close()


def test_small_events_are_bounded_by_what_they_hold(redis_url: str, key_prefix: str) -> None:
    """Heartbeats of a few dozen bytes: each counts what it holds in memory (its payload right-sized, its
    entry), not only its length, so a bound of 1 MiB keeps thousands, not tens of thousands."""

    async def run() -> tuple[int, int]:
        client = Redis.from_url(redis_url)
        events, work, _, release = _stalled(client, Keys(prefix=key_prefix), 1 << 20)
        events.publish("running", "t-7", attempt=1)
        await asyncio.sleep(0.05)
        tracemalloc.start()
        for _ in range(20_000):
            events.publish("running", "t-7", attempt=1)
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        kept = len(events._pending)
        release.set()
        while work:
            await work.pop()
        await client.aclose()
        return kept, held // kept

    kept, per_event = asyncio.run(run())
    assert 2_000 < kept < 6_000
    assert per_event < 600  # no spare room of the encoder's buffer (~4 KiB) kept beside a payload


def test_publish_in_order_waits_for_what_was_kept_before_its_dropped_event(
    redis_url: str, key_prefix: str
) -> None:
    """A full buffer when ``publish_now`` comes: its partial is dropped (said), but it still waits for the
    events before it, or the GPU's next partial, sent to another process, would overtake them. A stalled
    Redis makes it wait its limit, as before the bound."""
    keys = Keys(prefix=key_prefix)

    async def run() -> tuple[bool, float, int]:
        client = Redis.from_url(redis_url)
        events, work, _, release = _stalled(client, keys, 3_000)
        events.publish("running", "t-6", attempt=1)
        await asyncio.sleep(0.05)
        for i in range(10):
            events.publish("running", "t-6", i=i, pad="p" * 500)
        started = time.monotonic()
        ok = await events.publish_in_order([("partial", "t-6", {"partial": "x" * 3000})], wait=0.3)
        took = time.monotonic() - started
        release.set()
        while work:
            await work.pop()
        await client.aclose()
        return ok, took, events.dropped

    ok, took, dropped = asyncio.run(run())
    assert not ok and took >= 0.3
    assert dropped >= 1


def test_a_flush_that_died_with_the_buffer_full_is_replaced(
    redis_url: str, key_prefix: str, rds: redis.Redis
) -> None:
    """The flush dies (cancelled here; an error not Redis's would do the same) while the buffer is full:
    the next event, dropped or not, starts a new one, so what waits goes out and later events flow again,
    instead of every event being dropped until a restart."""
    keys = Keys(prefix=key_prefix)
    sub = _subscribed(rds, keys, "t-8")
    out: dict[str, Any] = {}

    async def run() -> None:
        client = Redis.from_url(redis_url)
        events, work, _, _ = _stalled(client, keys, 5_000)
        original = client.register_script(task_events.PUBLISH_ALL)
        events.publish("running", "t-8", i=0)
        await asyncio.sleep(0.05)
        queued = [events.publish("running", "t-8", i=i, pad="p" * 500) for i in range(1, 30)]
        flush = work.pop()
        flush.cancel()
        await asyncio.gather(flush, return_exceptions=True)
        events._publish_all = original  # type: ignore[method-assign]  # Redis answers again
        out["dropped_then"] = events.publish("running", "t-8", i=30, pad="p" * 500)
        while work:
            await work.pop()
        out["later"] = events.publish("running", "t-8", i=31, pad="p" * 500)
        while work:
            await work.pop()
        out["kept"] = [i for i, q in enumerate(queued, start=1) if q]
        await client.aclose()

    asyncio.run(run())
    assert out["dropped_then"] is False and out["later"] is True
    got = [e["i"] for _, e in _drain(sub, len(out["kept"]) + 1, timeout=5)]
    assert got == [*out["kept"], 31]  # i=0 went down with the flush (logged as lost)
    sub.close()
