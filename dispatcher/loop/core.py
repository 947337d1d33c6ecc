"""The dispatcher: the loop that matches waiting jobs with free slots.

It holds the logic and touches no store directly: Redis through ``Intake``, the database through the store
functions (run in worker threads, PyMySQL being blocking; the group commit's on a thread of its own,
``db/hot.py``), GPUs through ``GpuClient`` — all of them in the ``Runtime`` (``runtime.py``), built once
and handed to each part. The ``Dispatcher`` builds the parts (the wiring below), runs the loop and the
side tasks, and stops them; no part holds it. The loop waits on "a slot was freed OR a job arrived OR
stop" (``wakeups.py``) and never polls faster than ``IDLE_POLL_SECONDS`` when idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime

from redis.asyncio import Redis
from sqlalchemy import Engine

from dispatcher.db.dispatch import held_by
from dispatcher.errors import TRANSIENT
from dispatcher.gpus.same_service import shown_url
from dispatcher.loop.agents import AgentHub
from dispatcher.loop.attempt_ends import AttemptEnds
from dispatcher.loop.cancels import WAKE_CANCEL, CancelSender
from dispatcher.loop.gpu_requests import GpuRequests
from dispatcher.loop.handoff import HandOffs
from dispatcher.loop.housekeeping import Housekeeping
from dispatcher.loop.placing import Placing
from dispatcher.loop.runtime import Runtime
from dispatcher.loop.standbys import Standbys
from dispatcher.loop.wakeups import Wakeups
from dispatcher.queues.presence import DuplicateDispatcher
from dispatcher.queues.wakes import WakeChannel
from dispatcher.settings import DispatcherSettings

log = logging.getLogger("gpuq.dispatcher")

#: Past a buffer's lapse when the idle loop looks again: its clock must have passed it (``ReadyBuffer``).
LAPSE_SLACK_SECONDS = 0.01


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
        """Builds the ``Runtime`` and the parts, each given only what it uses. ``redis`` serves the
        dispatch loop; ``beat`` (the heartbeat) and ``publisher`` (task events) get clients of their own
        when given, so none of them waits for the others' pool."""
        self.rt = rt = Runtime.build(settings, engine, redis, beat=beat, publisher=publisher)
        self.wake = Wakeups(rt)
        self.ends = AttemptEnds(rt, self.wake)
        self.agents = AgentHub(rt, self.ends, self.wake)
        self.requests = GpuRequests(rt, self.ends, self.agents)
        self.cancels = CancelSender(rt, self.requests, self.ends)
        self.handoffs = HandOffs(rt, self.wake, self.requests, settings.handoff_buffer)
        self.ends.hand_off_with(self.handoffs.end_many)
        self.standbys = Standbys(rt, self.wake, self.handoffs, self.requests, self.ends)
        if self.standbys.enabled:
            self.ends.standbys = self.handoffs.standbys = self.standbys
            self.requests.standby_of_ours = self.standbys.holds
            self.requests.gpu_down = self.standbys.gpu_down
        self.placing = Placing(rt, self.wake, self.handoffs, self.requests)
        self.housekeeping = Housekeeping(rt, self.ends, self.wake, self.handoffs.buffer.sized)
        self._loop: asyncio.Task[None] | None = None
        # What the HTTP side (routes, callbacks, the agents' API) and tests use, by the names they know.
        self.settings, self.engine, self.redis, self.keys = settings, engine, redis, rt.keys
        self.intake, self.metrics, self.events, self.backoff = rt.intake, rt.metrics, rt.events, rt.backoff
        self.warnings, self.inflight = rt.warnings, rt.inflight
        self.db, self.db_hot = rt.db, rt.db_hot
        self.slot_freed, self.room, self.take_room = self.wake.slot_freed, self.wake.room, self.wake.take_room
        self.look_wanted = self.wake.look_wanted

    # -- plumbing -------------------------------------------------------------------------------------

    def now(self) -> datetime:
        """Naive UTC on the database's clock (see ``Runtime.now``)."""
        return self.rt.now()

    @property
    def fatal(self) -> BaseException | None:
        """What stopped this process, if something did (``/livez``, the exit code)."""
        return self.rt.fatal

    @property
    def accepting(self) -> bool:
        return self.rt.accepting

    def cancel_wanted(self) -> None:
        """A task was cancelled (here or, through the ``cancel`` wake-up, anywhere): send the cancels this
        process owes, and check the next partial of every attempt against the database."""
        self.ends.renewals.forget()
        self.cancels.kick()

    # -- life cycle -----------------------------------------------------------------------------------

    async def start(self, *, background: bool = True) -> None:
        """Schema, clock, GPUs, heartbeat (``Runtime.open``); then the loop, the wake-up listener and
        housekeeping, unless ``background`` is False (``dispatcher/testing.py`` drives the passes itself)."""
        rt = self.rt
        await rt.open()
        self.ends.finisher.max_bytes = rt.limits.batch_bytes
        if not background:
            return
        self._loop = asyncio.create_task(self._run(), name="dispatch-loop")
        rt.own(self._loop, side=True)
        rt.spawn(self._listen(), "wake-listener", side=True)
        rt.spawn(self.housekeeping.run(), "housekeeping", side=True)
        rt.spawn(self.cancels.run(), "cancel-sender", side=True)
        rt.spawn(self.agents.run(), "agent-sweep", side=True)
        if self.standbys.enabled:
            rt.spawn(self.standbys.run(), "standbys", side=True)
        rt.spawn(self._check_endpoints(), "endpoint-check")
        log.info(
            "dispatcher started",
            extra={
                "action": "start",
                "dispatcher_id": self.settings.dispatcher_id,
                "queues": self.settings.all_queues,
                "gpus": len(self.settings.endpoints),
            },
        )

    async def _check_endpoints(self) -> None:
        """Look once at each pushed GPU of GPU_ENDPOINTS, as the probes of a GPU out of rotation do, and say
        which do not answer like a GPU service: a wrong host, port or path is otherwise learnt only from the
        first jobs it fails (SPEC §4 takes it out of rotation then). Only a log line: nothing changes."""
        gate = asyncio.Semaphore(16)

        async def check(gpu_id: str, url: str) -> None:
            async with gate:
                try:
                    ok, detail = await self.rt.gpu.probe(url)
                except Exception:  # the client closed by a stop meanwhile: nothing to say any more
                    return
            if not ok:
                shown = shown_url(url)
                log.warning(
                    f"GPU {gpu_id} of GPU_ENDPOINTS does not answer like a GPU service at {shown} ({detail});"
                    " check its URL: jobs sent there are refused and wait for another GPU (no attempt used),"
                    " and it leaves rotation after a few such answers",
                    extra={"action": "gpu_check", "gpu_id": gpu_id, "url": shown, "detail": detail},
                )

        await asyncio.gather(*(check(ep.gpu_id, ep.url) for ep in self.settings.endpoints if not ep.pull))

    async def drain(self, grace: float) -> None:
        """Stop taking jobs and give the attempts this process started up to ``grace`` seconds to call back,
        while the HTTP server still takes callbacks. Runs before the server stops listening."""
        self.rt.accepting = False
        self.wake.event.set()
        await self._take_back_standbys()
        self.placing.park(self.handoffs.buffer.drain())
        deadline = time.monotonic() + grace
        log.info("draining", extra={"action": "drain", "grace_seconds": grace})
        while time.monotonic() < deadline:
            # A hand-off or pass that took its jobs before the drain began gives back the ones it did not
            # place into the buffer: park those too, or they would wait there until the process stops.
            self.placing.park(self.handoffs.buffer.drain())
            if len(self.standbys):  # bound by a group commit that began before the drain
                await self._take_back_standbys()
            try:
                if (
                    not self.rt.inflight
                    and await self.rt.db(held_by, dispatcher_id=self.settings.dispatcher_id) == 0
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
        rt = self.rt
        rt.accepting = False
        rt.stopping.set()
        self.wake.event.set()
        if self._loop is not None:
            await asyncio.wait({self._loop}, timeout=max(self.settings.shutdown_grace_seconds, 5.0))
        for task in list(rt.side):
            task.cancel()
        await asyncio.gather(*rt.side, return_exceptions=True)
        await self._take_back_standbys()
        if rt.inflight:
            _, pending = await asyncio.wait(set(rt.inflight), timeout=self.settings.shutdown_grace_seconds)
            for task in pending:  # their outcome is unknown: the lease will settle them
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if len(self.standbys):  # bound by a group commit that was still running at the take-back above
            await self._take_back_standbys()
        if isinstance(rt.fatal, DuplicateDispatcher):
            # Our processing lists are named by the id, so they are the other process's too: what we took and
            # did not place stays there, for it to find (its reconcile looks up what nobody there knows of).
            log.error(
                "stopped: this DISPATCHER_ID belongs to another process now; jobs left to it",
                extra={"action": "stop"},
            )
            await rt.gpu.close()
            await rt.hot.close()
            rt.journal.close()
            return
        try:
            back = await rt.intake.hand_back()
            await rt.intake.retire()
            log.info("dispatcher stopped", extra={"action": "stop", "handed_back": back})
        except TRANSIENT as exc:
            log.error(
                "could not hand back jobs; another dispatcher will sweep them",
                extra={"action": "stop", "error": str(exc)},
            )
        await rt.gpu.close()
        await rt.hot.close()
        rt.journal.close()  # its lock dropped: the next process here reads it (recovery.py)

    async def _take_back_standbys(self) -> None:
        """Standbys not sent go back to waiting (their jobs to the buffer, then Redis), so any dispatcher
        runs them: left bound, each would wait for its slot's lease after this process is gone."""
        try:
            await self.standbys.release_all()
        except TRANSIENT as exc:
            log.error(
                "could not take back standby jobs; each runs after its slot's lease",
                extra={"action": "stop", "error": str(exc)},
            )
        self.placing.park(self.handoffs.buffer.drain())

    # -- the loop -------------------------------------------------------------------------------------

    async def _run(self) -> None:
        pause = 0.05
        wake = self.wake
        while not self.rt.stopping.is_set():
            wake.event.clear()  # before looking, so a wake-up that comes while we look is not lost
            try:
                busy = await self.dispatch_once()
                pause = 0.05
            except TRANSIENT as exc:
                # Whatever this pass took stays in our processing list; the next pass finishes it.
                log.warning("store unavailable; retrying", extra={"action": "loop_error", "error": str(exc)})
                self.handoffs.reconcile_at = 0.0
                wake.look = True
                await self._wait(pause)
                pause = min(pause * 2, 2.0)
                continue
            except Exception:
                # Not the stores: something in the jobs this pass took that no rule foresaw. They stay in
                # our processing list; the next pass tries them one at a time and dead-letters the culprit,
                # so one job can neither stop the loop nor come back to it after every restart.
                log.exception("dispatch pass failed; isolating its jobs", extra={"action": "loop_error"})
                wake.isolate = True
                self.handoffs.reconcile_at = 0.0  # its jobs are strays now: the next pass finds them
                wake.look = True
                await self._wait(pause)
                pause = min(pause * 2, 2.0)
                continue
            if not busy:
                lapse = self.handoffs.buffer.next_lapse()  # buffered jobs go back to Redis on time
                idle = self.settings.idle_poll_seconds
                await self._wait(idle if lapse is None else min(idle, lapse + LAPSE_SLACK_SECONDS))

    async def _wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.wake.event.wait(), timeout)
        except TimeoutError:
            self.wake.look_unannounced()  # nothing woke us: look anyway (a wake-up may have been lost)

    async def dispatch_once(self) -> bool:
        """One pass of the loop (see ``Placing.dispatch_once``); False when there was nothing to do."""
        return await self.placing.dispatch_once()

    async def _listen(self) -> None:
        """Wake-ups from other processes (a slot freed there, a job enqueued by a producer)."""
        while not self.rt.stopping.is_set():
            channel = WakeChannel(self.redis, self.keys)
            try:
                await channel.open()
                while not self.rt.stopping.is_set():
                    message = await channel.next(timeout=1.0)
                    if message is not None and self.agents.on_message(message):
                        continue  # jobs placed on a pull GPU: its polls here look, the loop need not
                    if message in (b"job", "job"):
                        self.wake.job_pushed()  # take it; look for free slots only if some may be idle
                    elif message is not None:
                        self.wake.look_now()  # a slot freed elsewhere (or a cancel, a lost wake-up): look
                        if message in (WAKE_CANCEL, WAKE_CANCEL.encode()):
                            self.cancel_wanted()
            except TRANSIENT as exc:
                log.warning(
                    "wake-up channel lost; resubscribing", extra={"action": "wake", "error": str(exc)}
                )
                self.wake.look_now()  # we may have missed something
                await asyncio.sleep(0.5)
            except RuntimeError as exc:
                # A Redis node killed mid-reconnect (a cluster failover): redis-py's reconnect wrote to a
                # transport uvloop had closed, "the handler is closed", a RuntimeError, not a RedisError.
                # Wake-ups are a shortcut (the loop looks on its own every idle poll): losing the channel
                # must not stop the dispatcher, whose side tasks are fatal when they die.
                log.warning(
                    "wake-up channel broken; resubscribing",
                    extra={"action": "wake", "error": f"{type(exc).__name__}: {exc}"},
                )
                self.wake.look_now()
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(*TRANSIENT, RuntimeError):
                    await channel.close()
