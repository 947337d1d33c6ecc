"""What every part of the dispatcher shares: settings, stores, clock, clients, metrics, owned tasks.

``Runtime`` is built once per dispatcher process (``Runtime.build``) and handed to each part — the loop
(``core.py``), the GPU requests, hand-offs, housekeeping, cancels, pull agents — so no part holds the
``Dispatcher`` itself. What a part needs from the loop is narrow: ending an attempt or giving a cancelled
attempt's slot back (``AttemptEnds`` in ``attempt_ends.py``, which the parts take as it is: it is the one
implementation, and a Protocol here only wrote its signature again) and ``SlotSignals`` here (a slot was
freed, implemented in ``wakeups.py``).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

from redis.asyncio import Redis
from sqlalchemy import Engine

from dispatcher.db.agents import ensure_token
from dispatcher.db.attempts import Backoff
from dispatcher.db.clock import clock_offset
from dispatcher.db.engine import init_schema, max_packet, transaction, utcnow
from dispatcher.db.gpus import list_gpus, register_new
from dispatcher.db.hot import HotThread
from dispatcher.db.identity import database_identity
from dispatcher.db.unsent import holdings
from dispatcher.db.watch import DbWatch
from dispatcher.gpus.gpu_client import GpuClient
from dispatcher.limits import Limits
from dispatcher.loop.recovery import recover
from dispatcher.metrics import Metrics
from dispatcher.preflight import slots_mismatch
from dispatcher.queues.intake import Intake, Settlement
from dispatcher.queues.presence import JOURNAL_MARK_TTL_SECONDS
from dispatcher.queues.task_events import EventPublisher
from dispatcher.sent_journal import Life, SentJournal, boot_id, kept_a_journal, realm
from dispatcher.settings import DispatcherSettings
from producer.keys import Keys

log = logging.getLogger("gpuq.dispatcher")
T = TypeVar("T")

#: A change of the clock offset worth a line in the log.
_CLOCK_NOTICE = timedelta(milliseconds=500)


class SlotSignals(Protocol):
    """What the parts that free slots (or find work) tell the loop."""

    def slot_freed(self) -> None: ...


@dataclass(eq=False)
class Runtime:
    """The dependencies and the little shared state of one dispatcher process; see the module docstring."""

    settings: DispatcherSettings
    engine: Engine
    redis: Redis  # the dispatch loop's client
    beat_redis: Redis  # the heartbeat's (its own pool: a busy loop never delays it past the key's TTL)
    keys: Keys
    intake: Intake
    gpu: GpuClient
    publisher_redis: Redis  # task events' (callbacks cause them: their own pool too)
    hot: HotThread  # the group commit's transactions (callbacks, hand-offs): own thread and connection
    backoff: Backoff
    metrics: Metrics = field(default_factory=Metrics)
    rng: random.Random = field(default_factory=random.Random)  # tie-breaking
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    accepting: bool = True  # False once draining or stopping: no new job is started
    limits: Limits = field(default_factory=Limits.default)  # until open() has read the packet size
    clock_offset: timedelta = timedelta(0)  # the database's clock minus ours (see db/clock.py)
    #: What is wrong but does not stop this process (found at start; ``/readyz`` lists it).
    warnings: dict[str, str] = field(default_factory=dict)
    fatal: BaseException | None = None
    # When a callback last found a store failing (monotonic; 0: never), and which: /readyz says not ready
    # for a while after it. Its own ``SELECT 1`` runs on a pooled connection that may still work while the
    # callbacks' cannot get one (the database's max_connections reached: an outside attack saw /readyz
    # answer 200 while every callback here got 503).
    store_failed: tuple[float, str] = (0.0, "")
    on_fatal: Callable[[], None] | None = None
    inflight: set[asyncio.Task[None]] = field(default_factory=set)  # owned background work
    side: set[asyncio.Task[None]] = field(default_factory=set)  # tasks that must not end while running
    events: EventPublisher = field(init=False)
    #: What this process POSTed, on local disk (sent_journal.py); disabled until ``open``.
    journal: SentJournal = field(default_factory=lambda: SentJournal(None, None))
    #: Every database call in flight: a database that hangs is said (db/watch.py).
    db_watch: DbWatch = field(default_factory=DbWatch)

    def __post_init__(self) -> None:
        self.events = EventPublisher(
            self.publisher_redis,
            self.keys,
            lambda coro: self.spawn(coro, "publish-events"),
            on_drop=self.metrics.events_dropped.inc,
        )

    @classmethod
    def build(
        cls,
        settings: DispatcherSettings,
        engine: Engine,
        redis: Redis,
        *,
        beat: Redis | None = None,
        publisher: Redis | None = None,
    ) -> Runtime:
        """``redis`` serves the dispatch loop; ``beat`` (the heartbeat) and ``publisher`` (task events, which
        callbacks cause) get clients of their own when given, so none of them waits for the others' pool."""
        keys = Keys(settings.redis_key_prefix)
        intake = Intake(
            redis,
            keys,
            settings.dispatcher_id,
            settings.all_queues,
            settings.weights,
            routes=settings.routes,
            wait_replicas=settings.redis_wait_replicas,
            wait_timeout_seconds=settings.redis_wait_timeout_seconds,
            instance=settings.instance,
        )
        gpu = GpuClient(
            bearer_token=settings.bearer_token.get_secret_value(),
            connect_timeout=settings.gpu_connect_timeout_seconds,
            request_timeout=settings.gpu_request_timeout_seconds,
            max_answer_bytes=settings.gpu_answer_max_bytes,
        )
        life = None
        if settings.sent_journal and (boot := boot_id()) is not None:
            where = realm(engine.url.render_as_string(hide_password=True), settings.redis_dsn(), keys.prefix)
            life = Life(settings.dispatcher_id, settings.instance, boot, where)
        return cls(
            journal=SentJournal(Path(settings.state_dir) if life else None, life),
            settings=settings,
            engine=engine,
            redis=redis,
            beat_redis=beat or redis,
            keys=keys,
            intake=intake,
            gpu=gpu,
            publisher_redis=publisher or redis,
            hot=HotThread(engine, workers=settings.commit_pipeline),
            backoff=Backoff(settings.retry_backoff_seconds, settings.retry_backoff_max_seconds),
        )

    # -- plumbing -------------------------------------------------------------------------------------

    async def _start_journal(self) -> None:
        """Before anything is placed under our id: our journal opened (so that a later life knows this one
        kept one), what dead lives on this machine recorded and never sent given back (recovery.py), then
        everything our id still holds written down as sent (sent by an earlier life, or not known), and only
        then the mark naming our journal the id's (without a journal, a mark that names none: no earlier file
        of the id is trusted again). Marked before the read, a life killed between the two (an outside trial:
        15 of 16 slots idle for the lease) left the mark on a journal that took the dead one's never-sent
        standbys for sent."""
        j, me = self.journal, self.settings.dispatcher_id
        opened = j.open()
        before = await self.beat_redis.get(self.keys.journal(me))
        if opened:
            j.rotate_due = lambda: self.spawn(
                j.rotate(lambda: self.db(holdings, dispatcher_id=me)), "journal"
            )
            j.on_fail = lambda: self.spawn(self._mark_journal(f"off:{self.settings.instance}"), "journal")
        previous = before.decode() if isinstance(before, bytes) else before
        taken = self.intake.took_over
        if j.enabled and taken is not None and taken != previous and not kept_a_journal(j, me, taken):
            # The process of our id that died last is not the one the mark names, and kept no journal here:
            # a version of gpuq without the journal ran in between (a rollback), or it ran on another
            # machine, so no journal here knows what it sent. (One that kept a journal here died before it
            # named it: the mark still names the journal that knows.)
            log.warning(
                "this DISPATCHER_ID's last process kept no journal of sent requests (its journal off, or a"
                " gpuq without it): nothing is given back; its unsent jobs wait for their leases",
                extra={"action": "recovery", "previous": taken, "marked": previous},
            )
            previous = None
        if j.enabled:
            await self.intake.heartbeat()  # a long recovery must not outlast our key's TTL
            await recover(self, j, starting=True, previous=previous)
        held = await self.db(holdings, dispatcher_id=me)  # what recovery left: sent, or not known
        j.carry(held)
        j.inherited = held
        # Without a journal, or the carry could not be written
        await self._mark_journal(self.settings.instance if j.enabled else f"off:{self.settings.instance}")

    async def _mark_journal(self, mark: str) -> None:
        self.intake.journal_mark = mark
        await self.beat_redis.set(
            self.keys.journal(self.settings.dispatcher_id), mark, ex=JOURNAL_MARK_TTL_SECONDS
        )

    def now(self) -> datetime:
        """Naive UTC on the database's clock: leases written here and judged by other processes agree."""
        return utcnow() + self.clock_offset

    async def sync_clock(self) -> None:
        offset = await self.db(clock_offset)
        if abs(offset - self.clock_offset) > _CLOCK_NOTICE:
            log.warning(
                "this machine's clock differs from the database's; leases use the database's",
                extra={"action": "clock", "offset_seconds": round(offset.total_seconds(), 3)},
            )
        self.clock_offset = offset

    async def db(self, fn: Callable[..., T], /, **kwargs: Any) -> T:
        """``fn`` in one transaction, in a worker thread; each commit is counted (``gpuq_db_commits``: the
        benchmark's commits per job)."""
        with self.db_watch.call():
            out = await asyncio.to_thread(transaction, self.engine, fn, **kwargs)
        self.metrics.db_commits.inc()
        return out

    async def db_hot(self, fn: Callable[..., T], /, **kwargs: Any) -> T:
        """``fn`` in one transaction on the hot path's own database thread (``dispatcher/db/hot.py``)."""
        with self.db_watch.call():
            out = await self.hot.run(fn, **kwargs)
        self.metrics.db_commits.inc()
        return out

    async def settle(self, s: Settlement) -> None:
        """``Intake.settle``, counting the jobs it returns unstarted (``gpuq_jobs_returned``): an operator
        sees jobs a buffer took and gave back, which the queue depth alone shows only as a flicker. Counted
        once the whole settlement applied: one that fails part way (a cluster settles queue by queue) is
        not counted, though some of its jobs may have moved (the next reconcile finds the rest)."""
        await self.intake.settle(s)
        for *_, pool in s.back:
            self.metrics.returned.labels(pool or "", "queue").inc()
        for _, pool, _ in s.park:
            self.metrics.returned.labels(pool, "parked").inc()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str, *, side: bool = False) -> None:
        """Start owned background work: kept in a set until done; a side task that dies is fatal."""
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self.own(task, side=side)

    def own(self, task: asyncio.Task[None], *, side: bool = False) -> None:
        (self.side if side else self.inflight).add(task)
        task.add_done_callback(self._side_done if side else self.inflight.discard)

    def _side_done(self, task: asyncio.Task[None]) -> None:
        self.side.discard(task)
        if task.cancelled() or self.stopping.is_set():
            return
        self.fatal = task.exception() or RuntimeError(f"{task.get_name()} ended")
        log.critical(
            "a dispatcher task died; stopping",
            extra={"action": "fatal", "task": task.get_name()},
            exc_info=self.fatal,
        )
        self.stopping.set()
        if self.on_fatal is not None:
            self.on_fatal()

    # -- start ----------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Schema, clock, size limits, GPUs (registered, pull tokens issued), GPU client, heartbeat, and the
        jobs of dispatchers that died swept back."""
        await asyncio.to_thread(init_schema, self.engine)
        self.hot.start()
        await self.sync_clock()
        self.intake.database = await self.db(database_identity)  # published with the heartbeat
        s = self.settings
        self.limits = Limits.for_packet(
            await self.db(max_packet), max_job_bytes=s.max_job_bytes, max_result_bytes=s.max_result_bytes
        )
        # Lowered to what the database's max_allowed_packet takes (see limits.py).
        log.info("size limits", extra={"action": "limits", **asdict(self.limits)})
        now = self.now()
        for ep in s.endpoints:  # python -m dispatcher checked them already (preflight.py)
            known = await self.db(
                register_new, gpu_id=ep.gpu_id, url=ep.url, pool=ep.pool, slot_count=s.slots_per_gpu, now=now
            )
            if known is not None:
                raise RuntimeError(
                    f"GPU_ENDPOINTS: GPU {ep.gpu_id} is registered with {known.url} in pool {known.pool}"
                )
            if ep.pull and (token := await self.db(ensure_token, gpu_id=ep.gpu_id, now=now)) is not None:
                # Shown once, here, by the one dispatcher that issued it (the database keeps its hash).
                log.warning(
                    f"pull GPU {ep.gpu_id} registered; its agent token (shown once): {token}",
                    extra={"action": "agent_token", "gpu_id": ep.gpu_id},
                )
        if s.endpoints:
            registered = {g.gpu_id: g.slots for g in await self.db(list_gpus)}
            if mismatch := slots_mismatch(s, registered):
                self.warnings["slots_per_gpu"] = mismatch
                log.warning(mismatch, extra={"action": "config", "slots_per_gpu": s.slots_per_gpu})
        await self.gpu.start()
        await self.intake.claim(self.beat_redis)  # refuses to run beside a live twin of this DISPATCHER_ID
        await self._start_journal()
        await self.intake.heartbeat()
        await self.intake.sweep_dead()
        await self.hot.opened()  # connecting since ``hot.start`` above: before the first callback, not in it
