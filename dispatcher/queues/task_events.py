"""A task's state changes on its Redis channel (``Keys.task_events``), for ``GET /tasks/{id}/events`` and
``POST /v1/embeddings`` (which listen through queues/event_hub.py), whichever dispatcher process the
GPU's callbacks reach.

Publishing sits on the hot path (one event per dispatch and per callback), so it never waits for Redis and
never reads the database: events go into a buffer, and one background flush at a time sends the buffer in
script calls of ``PUBLISH_ALL`` (a pipeline of PUBLISHes on a cluster). Events are best-effort (an event
lost while Redis is away is not replayed): a listener reads the task's state from the database first, and
again when the stream has been quiet. The buffer is bounded (``MAX_PENDING_BYTES``): past it, while Redis
does not take them, new events are dropped, counted and said, not kept until the process runs out of memory.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import orjson
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import RedisClusterException, RedisError

from producer.connect import is_cluster
from producer.keys import Keys

log = logging.getLogger("gpuq.events")

#: Events sent in one call at most.
_BATCH = 500
#: Bytes of payload sent in one call at most (an event larger goes alone). One script runs all its
#: PUBLISHes before Redis writes to any subscriber, so a call's messages pile up in a subscriber's output
#: buffer at once, and past its limit (``client-output-buffer-limit pubsub``, 32 MB by default) Redis drops
#: that subscriber: every stream of a dispatcher's event hub. ``finished`` carries results up to 8 MiB; a
#: review lost a burst of 40 x 1 MB that way. Between calls Redis flushes.
_BATCH_BYTES = 1 << 20
#: A batch's PUBLISHes as one script call (ARGV: channel, payload, channel, payload, ...). redis-py packs
#: and parses each command of a pipeline on the event loop, ~20 us a command on a 2-core VM: 20 events
#: cost 0.49 ms pipelined, 0.14 ms as this script; events were ~8 % of the dispatcher's CPU. The script
#: runs its PUBLISHes in order, atomically, as the pipeline did.
PUBLISH_ALL = """
for i = 1, #ARGV, 2 do
    redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
return #ARGV / 2
"""
#: On a Redis Cluster (no pipelined PUBLISH): events sent at once at most.
_CLUSTER_CONCURRENCY = 32
#: ``publish_now`` waits this long at most for its event and those before it to be out: past the dispatcher's
#: Redis socket timeout (10 s), so a Redis that hangs ends the flush first, its events logged as lost. A
#: callback's answer waits on it, as it waited on its own PUBLISH before.
NOW_WAIT_SECONDS = 12.0
#: Memory of the events waiting for Redis, at most. A Redis that hangs holds each script call for the client's
#: socket timeout (10 s) while callbacks keep coming, each ``finished`` with its result (up to 8 MiB): the
#: buffer grew without end (a dispatcher killed for its memory stops every GPU it feeds). Past the bound new
#: events are dropped (best-effort, as above), counted in ``dropped`` and said at most every
#: ``DROP_LOG_SECONDS`` and once more when the buffer has drained.
MAX_PENDING_BYTES = 128 << 20
DROP_LOG_SECONDS = 10.0
#: What an entry costs beside its payload and channel name (its tuple, the objects' headers, the list's slot),
#: counted so that a flood of small heartbeats is bounded as much as a few large results are.
_ENTRY_BYTES = 160
#: Event names that end a task's stream.
FINAL_EVENTS = frozenset({"finished", "failed", "cancelled"})


def event(name: str, task_id: str, **fields: Any) -> dict[str, Any]:
    return {"event": name, "task_id": task_id, "at": datetime.now(UTC).isoformat(), **fields}


def encode(value: Any) -> bytes:
    """JSON of an event (or of a GPU's partial output, to measure it): orjson, or json for what orjson
    refuses (an integer past 64 bits, a lone surrogate), so any value a callback parsed to can be sent."""
    try:
        return orjson.dumps(value, default=str)
    except TypeError:
        return json.dumps(value, default=str).encode()


class EventPublisher:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        *,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        on_drop: Callable[[], None] | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self._spawn = spawn
        self._publish_all = redis.register_script(PUBLISH_ALL)
        self._pending: deque[tuple[str, bytes]] = deque()
        self._pending_bytes = 0  # what _pending holds (``_cost``)
        self.max_pending_bytes = max_pending_bytes
        self._on_drop = on_drop  # the metric's counter
        self.dropped = 0  # events refused for the bound, ever
        self._unsaid = 0  # of those, not logged yet
        self._said_at = -DROP_LOG_SECONDS
        self._flushing = False
        self._flusher: Coroutine[Any, Any, None] | None = None  # the flush under way, if any
        self._queued = 0  # events ever put in _pending
        self._sent = 0  # of those, delivered or lost
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()  # (events queued before, done)

    def publish(self, name: str, task_id: str, **fields: Any) -> bool:
        """Queue one event; returns at once: False when it was dropped (the buffer is full)."""
        # Copied: orjson's bytes keep the spare room of its buffer (~4 KiB under a small event, measured),
        # which a full buffer of heartbeats multiplied twentyfold past the bound.
        payload = bytes(memoryview(encode(event(name, task_id, **fields))))
        channel = self.keys.task_events(task_id)
        cost = _cost(channel, payload)
        queued = not self._pending or self._pending_bytes + cost <= self.max_pending_bytes
        if queued:
            self._pending.append((channel, payload))
            self._pending_bytes += cost
            self._queued += 1
        else:
            self._drop(name, task_id)
        # Dropped or not: a flush that died (cancelled, or of an error not Redis's) leaves a full buffer that
        # only a new one drains. A flush cancelled before its first step (a stopping loop) never ran its
        # ``finally``: it is closed.
        if self._pending and (
            not self._flushing
            or (self._flusher is not None and inspect.getcoroutinestate(self._flusher) == inspect.CORO_CLOSED)
        ):
            self._flushing = True
            self._flusher = self._flush()
            self._spawn(self._flusher)
        return queued

    def _drop(self, name: str, task_id: str) -> None:
        self.dropped += 1
        self._unsaid += 1
        if self._on_drop is not None:
            self._on_drop()
        if time.monotonic() - self._said_at >= DROP_LOG_SECONDS:
            self._say_dropped(event=name, task_id=task_id)

    def _say_dropped(self, **fields: Any) -> None:
        """Log the drops not said yet (``dropped``: since the previous such line)."""
        log.warning(
            "task events dropped: Redis is not taking them and the buffer is full",
            extra={
                "action": "events",
                "dropped": self._unsaid,
                "waiting_bytes": self._pending_bytes,
                **fields,
            },
        )
        self._said_at, self._unsaid = time.monotonic(), 0

    async def publish_now(self, name: str, task_id: str, **fields: Any) -> None:
        """Publish one event and return once Redis has it (or it was given up on, or after
        ``NOW_WAIT_SECONDS``). For partial output: the GPU sends its next partial after our answer, maybe to
        another dispatcher process, whose PUBLISH must come after ours. It goes behind the buffer, not
        beside it: a PUBLISH of its own on another pooled connection overtook a ``dispatched`` still in the
        buffer's first script call (a fresh-clone CI run)."""
        if not await self.publish_in_order([(name, task_id, fields)], wait=NOW_WAIT_SECONDS):
            log.warning(
                "task event not out in time: a later one sent by another process may arrive first",
                extra={"action": "events", "event": name, "task_id": task_id, "waited_s": NOW_WAIT_SECONDS},
            )

    async def publish_in_order(self, items: list[tuple[str, str, dict[str, Any]]], *, wait: float) -> bool:
        """Queue (name, task id, fields) events behind every event published before, and return once they
        reached Redis, or were given up on (best-effort, as ever), or after ``wait`` seconds: for events that
        must precede what other processes publish next (``Housekeeping.requeue_due``: its "queued" after
        this process's "retrying", before another's "dispatched"). Sent apart from the buffer, "queued"
        overtook a "retrying" still in it (an outside review). False: ``wait`` passed first. An event dropped
        for the bound (said) is not waited for, but those before it still are: the caller's next message
        must not overtake them."""
        if not items:
            return True
        for name, task_id, fields in items:
            self.publish(name, task_id, **fields)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self._queued, done))
        try:
            await asyncio.wait_for(asyncio.shield(done), wait)
        except TimeoutError:
            return False
        return True

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch = self._take_batch()
                try:
                    await self._deliver(batch)
                finally:
                    self._sent += len(batch)
                    self._release(self._sent)
            if self._unsaid:  # drained: the last drops are said now, not at the next drop
                self._say_dropped()
        finally:
            self._flushing = False

    def _take_batch(self) -> list[tuple[str, bytes]]:
        """The buffer's first events, within ``_BATCH`` and ``_BATCH_BYTES`` (one at least). Taken from the
        left of a deque: slicing a list per batch made draining a full buffer of heartbeats (~800,000
        entries) quadratic: 1.3-4.6 s of the event loop (a review; 0.15 s now)."""
        size, n = 0, 0
        for _, payload in itertools.islice(self._pending, _BATCH):
            size += len(payload)
            if n and size > _BATCH_BYTES:
                break
            n += 1
        batch = [self._pending.popleft() for _ in range(n)]
        self._pending_bytes -= sum(_cost(channel, payload) for channel, payload in batch)
        return batch

    def _release(self, sent: int) -> None:
        """Wake the ``publish_in_order`` callers whose events are all out (sent or lost)."""
        while self._waiters and self._waiters[0][0] <= sent:
            _, done = self._waiters.popleft()
            if not done.done():
                done.set_result(None)

    async def _deliver(self, batch: list[tuple[str, bytes]]) -> None:
        """``_send``, with what was lost logged: events are best-effort, a Redis error is no caller's."""
        try:
            lost, error = await self._send(batch)
        except (RedisError, RedisClusterException, OSError) as exc:
            lost, error = len(batch), str(exc)
        except asyncio.CancelledError:  # the loop stops: said, as any loss is
            log.warning(
                "task events not published",
                extra={"action": "events", "lost": len(batch), "error": "cancelled"},
            )
            raise
        if lost:
            log.warning("task events not published", extra={"action": "events", "lost": lost, "error": error})

    async def _send(self, batch: list[tuple[str, bytes]]) -> tuple[int, str]:
        """Send ``batch``: how many were lost, and one reason. A cluster's pipeline refuses PUBLISH (redis-py:
        "blocked when running redis in cluster mode"; every event was lost that way), so there each goes on
        its own, by ``_CLUSTER_CONCURRENCY`` workers taking one task's chain after another: a PUBLISH on any
        node reaches the subscribers of every node. One task's long chain (a GPU posting partials over
        several connections at once) holds one worker, not every task after it (in groups of 32, as before,
        each group waited for the longest chain of the one before)."""
        if not is_cluster(self.redis):
            await self._publish_all(args=[v for pair in batch for v in pair])
            return 0, ""
        by_channel: dict[str, list[bytes]] = {}
        for channel, payload in batch:
            by_channel.setdefault(channel, []).append(payload)
        chains = iter(by_channel.items())

        async def worker() -> tuple[int, str]:
            lost, error = 0, ""
            for channel, payloads in chains:  # one iterator for every worker: each chain is taken once
                n, failure = await self._in_order(channel, payloads)
                lost, error = lost + n, failure or error
            return lost, error

        workers = min(_CLUSTER_CONCURRENCY, len(by_channel))
        results = await asyncio.gather(*(worker() for _ in range(workers)))
        return sum(n for n, _ in results), next((e for _, e in results if e), "")

    async def _in_order(self, channel: str, payloads: list[bytes]) -> tuple[int, str]:
        """One task's events one after another (concurrent, ``finished`` could overtake ``dispatched`` and
        end a listener's stream early): how many were lost, and why."""
        for i, payload in enumerate(payloads):
            try:
                await self.redis.publish(channel, payload)
            except (RedisError, RedisClusterException, OSError) as exc:
                return len(payloads) - i, str(exc)
        return 0, ""


def _cost(channel: str, payload: bytes) -> int:
    """What an entry of the buffer holds in memory, near enough (``_ENTRY_BYTES``)."""
    return len(payload) + len(channel) + _ENTRY_BYTES


def publish_sync(client: SyncRedis, keys: Keys, name: str, task_id: str, **fields: Any) -> None:
    """Publish one event at once from a blocking client (the CLI: ``gpuq task cancel``)."""
    client.publish(keys.task_events(task_id), encode(event(name, task_id, **fields)))
