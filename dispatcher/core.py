"""The dispatcher: the loop that matches waiting jobs with free slots, and what happens to an attempt.

It holds the logic and touches no store directly: Redis through ``Intake``, the database through the store
functions (run in worker threads, PyMySQL being blocking; the group commit's on a thread of its own,
``db/hot.py``), GPUs through ``GpuClient``. The loop waits on
"a slot was freed OR a job arrived OR stop" and never polls faster than ``IDLE_POLL_SECONDS`` when idle.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any, TypeVar

from redis.asyncio import Redis
from sqlalchemy import Engine

from dispatcher.agents import AgentHub
from dispatcher.cancels import WAKE_CANCEL, CancelSender
from dispatcher.db.agents import ensure_token
from dispatcher.db.attempts import Backoff, Finish, extend_lease
from dispatcher.db.cancels import release_cancelled
from dispatcher.db.clock import clock_offset
from dispatcher.db.dispatch import held_by
from dispatcher.db.engine import init_schema, max_packet, transaction, utcnow
from dispatcher.db.gpus import list_gpus, register_new
from dispatcher.db.hot import HotThread
from dispatcher.dead_letters import prepare
from dispatcher.errors import TRANSIENT
from dispatcher.events import EventPublisher
from dispatcher.gpu_client import GpuClient
from dispatcher.gpu_requests import GpuRequests
from dispatcher.group_commit import GroupCommit
from dispatcher.handoff import HandOffs
from dispatcher.housekeeping import Housekeeping
from dispatcher.intake import Intake, Settlement, Taken
from dispatcher.limits import Limits, encode_result
from dispatcher.metrics import Metrics
from dispatcher.placing import Placing
from dispatcher.preflight import slots_mismatch
from dispatcher.renewals import Renewals
from dispatcher.settings import DispatcherSettings
from dispatcher.states import Outcome, TaskState
from producer.job import Job
from producer.keys import Keys

log = logging.getLogger("gpuq.dispatcher")
T = TypeVar("T")

#: A change of the clock offset worth a line in the log.
_CLOCK_NOTICE = timedelta(milliseconds=500)


class Dispatcher:
    def __init__(
        self,
        settings: DispatcherSettings,
        engine: Engine,
        redis: Redis,
        *,
        beat: Redis | None = None,
        publisher: Redis | None = None,
    ) -> None:
        """``redis`` serves the dispatch loop; ``beat`` (the heartbeat) and ``publisher`` (task events, which
        callbacks cause) get clients of their own when given, so none of them waits for the others' pool."""
        self.settings = settings
        self.engine = engine
        self.redis = redis
        self.beat_redis = beat or redis
        self.keys = Keys(settings.redis_key_prefix)
        self.intake = Intake(
            redis,
            self.keys,
            settings.dispatcher_id,
            settings.all_queues,
            settings.weights,
            routes=settings.routes,
            wait_replicas=settings.redis_wait_replicas,
            wait_timeout_seconds=settings.redis_wait_timeout_seconds,
        )
        self.gpu = GpuClient(
            bearer_token=settings.bearer_token.get_secret_value(),
            connect_timeout=settings.gpu_connect_timeout_seconds,
            request_timeout=settings.gpu_request_timeout_seconds,
            max_answer_bytes=settings.gpu_answer_max_bytes,
        )
        self.backoff = Backoff(settings.retry_backoff_seconds, settings.retry_backoff_max_seconds)
        self.metrics = Metrics()
        self.rng = random.Random()  # noqa: S311 - tie-breaking
        self.stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._side: set[asyncio.Task[None]] = set()
        self.requests = GpuRequests(self)
        self.cancels = CancelSender(self)
        self.renewals = Renewals(min(settings.task_timeout_seconds / 3, 5.0))
        self.agents = AgentHub(self)
        self._publish_pending = False  # a wake-up to publish once the one in flight is out
        self._publishing = False
        self.events = EventPublisher(
            publisher or redis, self.keys, lambda coro: self.spawn(coro, "publish-events")
        )
        # The group commit's transactions (callbacks, hand-offs) on a thread and connection of their own.
        self.hot = HotThread(engine)
        self.handoffs = HandOffs(self, settings.handoff_buffer)
        self.placing = Placing(self)
        self.finisher = GroupCommit(self.handoffs.end_many, lambda coro: self.spawn(coro, "finish-batches"))
        self._look = True  # free slots may exist that nobody counted: the next pass reads them
        self._room: dict[str, int] | None = None  # free slots per pool a hand-off left over (fresh count)
        self.limits = Limits.default()  # until start() has read the database's packet size
        self._isolate = False  # a pass raised something unforeseen: try its jobs one at a time
        self.accepting = True
        self._loop: asyncio.Task[None] | None = None
        self.clock_offset = timedelta(0)  # the database's clock minus ours (see db/clock.py)
        self.fatal: BaseException | None = None
        #: What is wrong but does not stop this process (found at start; ``/readyz`` lists it).
        self.warnings: dict[str, str] = {}
        self.on_fatal: Callable[[], None] | None = None

    # -- plumbing -------------------------------------------------------------------------------------

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
        out = await asyncio.to_thread(transaction, self.engine, fn, **kwargs)
        self.metrics.db_commits.inc()
        return out

    async def db_hot(self, fn: Callable[..., T], /, **kwargs: Any) -> T:
        """``fn`` in one transaction on the hot path's own database thread (``dispatcher/db/hot.py``)."""
        out = await self.hot.run(fn, **kwargs)
        self.metrics.db_commits.inc()
        return out

    def spawn(self, coro: Any, name: str, *, side: bool = False) -> None:
        """Start owned background work: kept in a set until done; a side task that dies is fatal."""
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        (self._side if side else self._inflight).add(task)
        task.add_done_callback(self._side_done if side else self._inflight.discard)

    @property
    def inflight(self) -> set[asyncio.Task[None]]:
        """Owned background work still running (requests, hand-off settlements, publishing)."""
        return self._inflight

    def _side_done(self, task: asyncio.Task[None]) -> None:
        self._side.discard(task)
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

    def slot_freed(self) -> None:
        """Wake this loop to look for free slots now, and every other dispatcher through Redis. A burst of
        freed slots costs one PUBLISH in flight plus one after it, not one per slot."""
        self._look = True
        self._wake.set()
        self._publish_pending = True
        if not self._publishing:
            self._publishing = True
            self.spawn(self._publish(), "publish-wake")

    def room(self, free: dict[str, int]) -> None:
        """A hand-off left ``free`` slots per pool (counted in its transaction) with no buffered job for
        them: the loop fills them without reading them again, and other dispatchers are woken (they may
        serve other queues). A look someone else asked for meanwhile (a slot freed by another dispatcher
        after this hand-off's count) stays asked for: clearing it lost that wake-up until the idle poll."""
        look = self._look
        self._room = free
        self.slot_freed()
        self._look = look

    def cancel_wanted(self) -> None:
        """A task was cancelled (here or, through the ``cancel`` wake-up, anywhere): send the cancels this
        process owes, and check the next partial of every attempt against the database."""
        self.renewals.forget()
        self.cancels.kick()

    def refill(self) -> None:
        """Buffered jobs were used: wake the loop to take more (no slot is free: nobody else to wake)."""
        self._wake.set()

    async def _publish(self) -> None:
        try:
            while self._publish_pending:
                self._publish_pending = False
                await self.intake.wake_others("slot")
        except TRANSIENT as exc:
            log.warning("could not publish wake-up", extra={"action": "wake", "error": str(exc)})
        finally:
            self._publishing = False

    # -- life cycle -----------------------------------------------------------------------------------

    async def start(self, *, background: bool = True) -> None:
        """Schema, clock, GPUs, heartbeat; then the loop, the wake-up listener and housekeeping, unless
        ``background`` is False (``dispatcher/testing.py`` drives the passes itself)."""
        await asyncio.to_thread(init_schema, self.engine)
        self.hot.start()
        await self.sync_clock()
        s = self.settings
        self.limits = Limits.for_packet(
            await self.db(max_packet), max_job_bytes=s.max_job_bytes, max_result_bytes=s.max_result_bytes
        )
        self.finisher.max_bytes = self.limits.batch_bytes
        # Lowered to what the database's max_allowed_packet takes (see limits.py).
        log.info("size limits", extra={"action": "limits", **asdict(self.limits)})
        now = self.now()
        for ep in self.settings.endpoints:  # python -m dispatcher checked them already (preflight.py)
            known = await self.db(
                register_new,
                gpu_id=ep.gpu_id,
                url=ep.url,
                pool=ep.pool,
                slot_count=self.settings.slots_per_gpu,
                now=now,
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
        if self.settings.endpoints:
            registered = {g.gpu_id: g.slots for g in await self.db(list_gpus)}
            if mismatch := slots_mismatch(self.settings, registered):
                self.warnings["slots_per_gpu"] = mismatch
                log.warning(
                    mismatch, extra={"action": "config", "slots_per_gpu": self.settings.slots_per_gpu}
                )
        await self.gpu.start()
        await self.intake.heartbeat()
        await self.intake.sweep_dead()
        if not background:
            return
        self._loop = asyncio.create_task(self._run(), name="dispatch-loop")
        self._side.add(self._loop)
        self._loop.add_done_callback(self._side_done)
        self.spawn(self._listen(), "wake-listener", side=True)
        self.spawn(Housekeeping(self).run(), "housekeeping", side=True)
        self.spawn(self.cancels.run(), "cancel-sender", side=True)
        self.spawn(self.agents.run(), "agent-sweep", side=True)
        log.info(
            "dispatcher started",
            extra={
                "action": "start",
                "dispatcher_id": self.settings.dispatcher_id,
                "queues": self.settings.all_queues,
                "gpus": len(self.settings.endpoints),
            },
        )

    async def drain(self, grace: float) -> None:
        """Stop taking jobs and give the attempts this process started up to ``grace`` seconds to call back,
        while the HTTP server still takes callbacks. Runs before the server stops listening."""
        self.accepting = False
        self._wake.set()
        self.placing.park(self.handoffs.buffer.drain())
        deadline = time.monotonic() + grace
        log.info("draining", extra={"action": "drain", "grace_seconds": grace})
        while time.monotonic() < deadline:
            # A hand-off or pass that took its jobs before the drain began gives back the ones it did not
            # place into the buffer: park those too, or they would wait there until the process stops.
            self.placing.park(self.handoffs.buffer.drain())
            try:
                if (
                    not self._inflight
                    and await self.db(held_by, dispatcher_id=self.settings.dispatcher_id) == 0
                ):
                    return
            except TRANSIENT:
                pass
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Stop taking jobs, let requests in flight finish within the grace period, hand back held jobs.

        The dispatch loop is let finish its pass, not cancelled: cancelling the await of a placement
        transaction would not stop the transaction (it runs in a thread), so it could commit attempts whose
        requests are then never sent, holding their slots until the lease runs out."""
        self.accepting = False
        self.stopping.set()
        self._wake.set()
        if self._loop is not None:
            await asyncio.wait({self._loop}, timeout=max(self.settings.shutdown_grace_seconds, 5.0))
        for task in list(self._side):
            task.cancel()
        await asyncio.gather(*self._side, return_exceptions=True)
        if self._inflight:
            _, pending = await asyncio.wait(set(self._inflight), timeout=self.settings.shutdown_grace_seconds)
            for task in pending:  # their outcome is unknown: the lease will settle them
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        try:
            back = await self.intake.hand_back()
            await self.intake.retire()
            log.info("dispatcher stopped", extra={"action": "stop", "handed_back": back})
        except TRANSIENT as exc:
            log.error(
                "could not hand back jobs; another dispatcher will sweep them",
                extra={"action": "stop", "error": str(exc)},
            )
        await self.gpu.close()
        await self.hot.close()

    # -- the loop -------------------------------------------------------------------------------------

    async def _run(self) -> None:
        pause = 0.05
        while not self.stopping.is_set():
            self._wake.clear()  # before looking, so a wake-up that comes while we look is not lost
            try:
                busy = await self.dispatch_once()
                pause = 0.05
            except TRANSIENT as exc:
                # Whatever this pass took stays in our processing list; the next pass finishes it.
                log.warning("store unavailable; retrying", extra={"action": "loop_error", "error": str(exc)})
                self.handoffs.reconcile_at = 0.0
                self._look = True
                await self._wait(pause)
                pause = min(pause * 2, 2.0)
                continue
            except Exception:
                # Not the stores: something in the jobs this pass took that no rule foresaw. They stay in
                # our processing list; the next pass tries them one at a time and dead-letters the culprit,
                # so one job can neither stop the loop nor come back to it after every restart.
                log.exception("dispatch pass failed; isolating its jobs", extra={"action": "loop_error"})
                self._isolate = True
                self.handoffs.reconcile_at = 0.0  # its jobs are strays now: the next pass finds them
                self._look = True
                await self._wait(pause)
                pause = min(pause * 2, 2.0)
                continue
            if not busy:
                await self._wait(self.settings.idle_poll_seconds)

    async def _wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            self._look = True  # nothing woke us: look anyway (a wake-up may have been lost)

    async def dispatch_once(self) -> bool:
        """One pass of the loop (see ``Placing.dispatch_once``); False when there was nothing to do."""
        return await self.placing.dispatch_once()

    def take_room(self) -> dict[str, int] | None:
        """The free slots a hand-off counted and left to the loop, once."""
        room, self._room = self._room, None
        return room

    def look_wanted(self) -> bool:
        """Whether a slot may have been freed that nobody counted (then the pass reads them), once."""
        look, self._look = self._look, False
        return look

    def prepare(self, taken: list[Taken]) -> tuple[list[tuple[Job, str, str]], Settlement]:
        return prepare(
            taken, max_bytes=self.limits.job_bytes, pool_for=self.settings.pool_for, metrics=self.metrics
        )

    def isolating(self) -> bool:
        """Whether the last pass failed in a way no rule foresaw (its jobs are tried one by one), once."""
        isolate, self._isolate = self._isolate, False
        return isolate

    # -- attempts -------------------------------------------------------------------------------------

    async def end_attempt(
        self,
        task_id: str,
        attempt: int,
        outcome: Outcome,
        *,
        result: Any = None,
        error: str | None = None,
        reported: str | None = None,
    ) -> Finish:
        """End an attempt; concurrent calls are committed together (see GroupCommit). A result the database
        cannot take (see limits.py) fails the attempt with the reason instead."""
        encoded, problem = encode_result(result, self.limits.result_bytes)
        if problem is not None:
            log.warning(
                "result refused", extra={"action": "result_refused", "task_id": task_id, "error": problem}
            )
            outcome, result, error = Outcome.FAILED, None, problem
        item = {
            "task_id": task_id,
            "attempt": attempt,
            "outcome": outcome,
            "result": encoded,
            "error": error,
            "reported": reported,
        }
        fin = await self.finisher.submit(item)
        if fin.code == "applied":
            self.renewals.forget(task_id)
            self.metrics.attempts.labels(outcome.value).inc()
            self.events.publish(
                fin.state or outcome.value,
                task_id,
                attempt=attempt,
                outcome=outcome.value,
                result=result,
                error=error,
            )
            if fin.state == "failed":  # final: `gpuq task retry --state failed` brings such tasks back
                log.warning(
                    "task failed",
                    extra={
                        "action": "task_failed",
                        "task_id": task_id,
                        "attempt": attempt,
                        "outcome": outcome.value,
                        "error": error,
                    },
                )
            log.debug(
                "attempt ended",
                extra={
                    "action": "attempt_end",
                    "task_id": task_id,
                    "attempt": attempt,
                    "outcome": outcome.value,
                    "state": fin.state,
                },
            )
        elif fin.code == "stale" and fin.state == TaskState.CANCELLED:
            # A final report (or the lease) for a cancelled attempt: the GPU no longer runs it.
            await self.confirm_stop(task_id, attempt, why=f"attempt ended: {outcome.value}")
        return fin

    async def confirm_stop(self, task_id: str, attempt: int, *, why: str) -> bool:
        """The GPU no longer runs this cancelled attempt: give its slot back (see dispatcher/cancels.py).
        No hand-off here: the freed slot is refilled by the loop, which slot_freed wakes."""
        freed = await self.db(release_cancelled, task_id=task_id, attempt=attempt)
        if freed:
            log.info(
                "cancel confirmed; slot freed",
                extra={"action": "cancel_confirmed", "task_id": task_id, "attempt": attempt, "why": why},
            )
            self.slot_freed()
        return freed

    async def heartbeat(
        self, task_id: str, attempt: int, progress: dict[str, Any] | None = None, partial: Any = None
    ) -> Finish:
        """A ``running`` callback: extend the lease; pass its progress and its ``partial`` (output so far)
        on to the task's event subscribers, in the order they came, without storing them. A partial whose
        attempt's lease this process extended lately costs no transaction (see renewals.py)."""
        if partial is not None and self.renewals.fresh(task_id, attempt):
            fin = Finish("applied", TaskState.PROCESSING.value)
        else:
            fin = await self.db(
                extend_lease,
                task_id=task_id,
                attempt=attempt,
                lease_seconds=self.settings.task_timeout_seconds,
                now=self.now(),
            )
            if fin.code == "applied":
                self.renewals.extended(task_id, attempt)
        if fin.code == "applied":
            self.events.publish("heartbeat", task_id, attempt=attempt, progress=progress or {})
            if partial is not None:  # before the answer: the GPU's next partial may reach another process
                await self.events.publish_now("partial", task_id, attempt=attempt, partial=partial)
        return fin

    async def _listen(self) -> None:
        """Wake-ups from other processes (a slot freed there, a job enqueued by a producer)."""
        while not self.stopping.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.keys.wake)
                while not self.stopping.is_set():
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and self.agents.on_message(message.get("data")):
                        continue  # jobs placed on a pull GPU: its polls here look, the loop need not
                    if message is not None:
                        self._look = True  # a slot freed elsewhere, or a job pushed: look
                        self._wake.set()
                        if message.get("data") in (WAKE_CANCEL, WAKE_CANCEL.encode()):
                            self.cancel_wanted()
            except TRANSIENT as exc:
                log.warning(
                    "wake-up channel lost; resubscribing", extra={"action": "wake", "error": str(exc)}
                )
                self._look = True  # we may have missed something
                self._wake.set()
                await asyncio.sleep(0.5)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
