"""Pull GPUs (SPEC §9), the dispatcher's side: agents' long polls, waking them, silent agents.

Placement does not change: a job lands on a pull GPU's slot only when that GPU is among the least-loaded
with a free slot (``dispatch``, the hand-off), and its slot is claimed in the database like any other.
Instead of a POST, the placing dispatcher wakes the GPU's long polls: its own directly, every other
dispatcher's through the wake channel (``agent:<gpu_id>``), since the agent may be polling any of them.
A waiting poll also looks again every ``RECHECK_SECONDS`` (a wake-up lost with a Redis hiccup costs that
much latency, not the job). What a poll hands out was placed by whichever dispatcher: the database holds
it (``db/agents.py``).

Silent agents: each dispatcher looks every ``SWEEP_SECONDS`` for pull GPUs whose agent has not polled for
``AGENT_STALE_SECONDS``; such a GPU leaves rotation (``healthy`` false) until its agent polls again. Jobs
placed on it that its agent never fetched go back to wait without using an attempt; the ones it fetched
are settled by their leases (its agent may still be running them and call back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from dispatcher.db.agents import Poll, poll_many
from dispatcher.db.agents_gone import agent_left, silence, take_back_unfetched, unfetch
from dispatcher.db.dispatch import Placed
from dispatcher.errors import TRANSIENT, TooMany
from dispatcher.gpus.pull import hash_agent_token
from dispatcher.gpus.tokens import make_token
from dispatcher.loop.attempt_ends import AttemptEnds
from dispatcher.loop.runtime import Runtime, SlotSignals
from dispatcher.states import Outcome

log = logging.getLogger("gpuq.agents")

#: A waiting long poll looks in the database at least this often, woken or not.
RECHECK_SECONDS = 2.0
#: How often each dispatcher looks for silent agents.
SWEEP_SECONDS = 1.0
#: The longest long poll (SPEC §9).
MAX_WAIT_SECONDS = 30.0
#: What the wake channel carries for "jobs were placed on this pull GPU".
WAKE_PREFIX = "agent:"
#: Long polls one GPU may hold waiting in one process. An agent needs one or a few; without a bound one
#: valid token could hold every connection the process has (HTTP_MAX_CONNECTIONS) and starve callbacks.
MAX_POLLS_PER_GPU = 16


class AgentHub:
    """A part of the Dispatcher: the long polls waiting in this process, by GPU."""

    def __init__(self, rt: Runtime, ends: AttemptEnds, signals: SlotSignals) -> None:
        self.rt = rt
        self.ends = ends
        self.signals = signals
        self._waiting: dict[str, set[asyncio.Event]] = {}
        self._admitted: dict[str, int] = {}  # polls per GPU past the MAX_POLLS_PER_GPU check, waiting
        self._to_wake: set[str] = set()  # GPUs whose polls elsewhere should look (one PUBLISH each)
        self._publishing = False
        self._looks: list[tuple[dict[str, Any], asyncio.Future[Poll]]] = []
        self._looking = False

    # -- placement side -------------------------------------------------------------------------------

    def placed(self, p: Placed) -> None:
        """A job was placed on pull GPU ``p.gpu_id`` (by the loop or a hand-off): wake its polls here and
        in every other dispatcher. A burst of placements costs one PUBLISH per GPU in flight."""
        self.rt.metrics.dispatched.labels(p.pool).inc()
        self.wake(p.gpu_id)
        self._to_wake.add(p.gpu_id)
        if not self._publishing:
            self._publishing = True
            self.rt.spawn(self._publish(), "publish-agent-wake")

    async def _publish(self) -> None:
        try:
            while self._to_wake:
                gpus, self._to_wake = self._to_wake, set()
                for gpu_id in gpus:
                    await self.rt.intake.wake_others(WAKE_PREFIX + gpu_id)
        except TRANSIENT as exc:  # the polls look again within RECHECK_SECONDS
            log.warning("could not wake agents", extra={"action": "agent_wake", "error": str(exc)})
        finally:
            self._publishing = False

    def wake(self, gpu_id: str) -> None:
        """Wake this process's polls of ``gpu_id`` (a placement here, or a wake-up from another process)."""
        for event in self._waiting.get(gpu_id, ()):
            event.set()

    def on_message(self, data: Any) -> bool:
        """Handle a wake channel message if it is an agent's; True when it was."""
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
        if not text.startswith(WAKE_PREFIX):
            return False
        self.wake(text[len(WAKE_PREFIX) :])
        return True

    # -- the agent's long poll ------------------------------------------------------------------------

    async def poll(
        self,
        gpu_id: str,
        token: str,
        *,
        max_jobs: int,
        wait: float,
        gone: Callable[[], Awaitable[bool]],
    ) -> tuple[Poll, list[dict[str, Any]]]:
        """Wait up to ``wait`` seconds for jobs on ``gpu_id``'s slots; returns the last look and the job
        bodies (empty: none came). ``gone`` says whether the agent hung up: then nothing more is taken, so
        no job is handed to a connection nobody reads."""
        rt = self.rt
        token_hash = hash_agent_token(token)
        deadline = time.monotonic() + wait
        event = asyncio.Event()
        self._waiting.setdefault(gpu_id, set()).add(event)
        first = True
        admitted = False
        seen_until = rt.now() + timedelta(seconds=wait)
        try:
            while True:
                event.clear()  # before looking: a wake-up that comes while we look is kept
                look = await self._look(
                    gpu_id=gpu_id,
                    token_hash=token_hash,
                    max_jobs=max_jobs,
                    lease_seconds=rt.settings.task_timeout_seconds,
                    seen_until=seen_until if first else None,
                    seen_slack=timedelta(seconds=rt.settings.agent_stale_seconds / 4),
                )
                if look.status != "ok":
                    return look, []
                gpu_id = self._rekey(event, gpu_id, look.gpu_id, admitted)
                if look.back:
                    log.info(
                        "agent polling; GPU back in rotation",
                        extra={"action": "agent_back", "gpu_id": gpu_id},
                    )
                if look.back or look.released:
                    self.signals.slot_freed()
                first = False
                if look.jobs and await gone():  # hung up while the look took them: nobody has them
                    jobs = [(j.task_id, j.attempt) for j in look.jobs]
                    await rt.db(unfetch, jobs=jobs)
                    log.info(
                        "agent hung up before its jobs were handed over; they wait for its next poll",
                        extra={"action": "agent_unfetch", "gpu_id": gpu_id, "jobs": len(jobs)},
                    )
                    return look, []
                left = deadline - time.monotonic()
                # A draining dispatcher ends its polls (within RECHECK_SECONDS): the agents poll again,
                # through the load balancer, at one that is not stopping.
                if look.jobs or left <= 0 or max_jobs == 0 or not rt.accepting:
                    return look, [self.body(j.task_id, j.type, j.data, j.attempt) for j in look.jobs]
                if not admitted:  # counted only once the token is known good: 429 says nothing to others
                    admitted = self._admit(gpu_id)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(left, RECHECK_SECONDS))
                if await gone():
                    await rt.db(agent_left, gpu_id=gpu_id, seen_until=seen_until, now=rt.now())
                    return look, []
        finally:
            if admitted:
                self._leave(gpu_id)
            waiting = self._waiting.get(gpu_id)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._waiting[gpu_id]

    def _rekey(self, event: asyncio.Event, old: str, new: str | None, admitted: bool) -> str:
        """The GPU's registered id (``new``); a poll waiting under another spelling of it (``old``, its
        path's) is moved there."""
        if new is None or new == old:
            return old
        waiting = self._waiting.get(old)
        if waiting is not None:
            waiting.discard(event)
            if not waiting:
                del self._waiting[old]
        self._waiting.setdefault(new, set()).add(event)
        if admitted:
            self._leave(old)
            self._admitted[new] = self._admitted.get(new, 0) + 1
        return new

    def _admit(self, gpu_id: str) -> bool:
        """Count one more poll waiting for ``gpu_id``, or refuse it (429) past ``MAX_POLLS_PER_GPU``."""
        n = self._admitted.get(gpu_id, 0)
        if n >= MAX_POLLS_PER_GPU:
            raise TooMany(f"GPU {gpu_id} already has {n} long polls waiting here", retry_after=1)
        self._admitted[gpu_id] = n + 1
        return True

    def _leave(self, gpu_id: str) -> None:
        self._admitted[gpu_id] -= 1
        if not self._admitted[gpu_id]:
            del self._admitted[gpu_id]

    async def _look(self, **look: Any) -> Poll:
        """One look in the database, batched with the other polls' looks that come meanwhile: under load
        every freed slot wakes a poll, and a transaction each would queue them for worker threads."""
        future: asyncio.Future[Poll] = asyncio.get_running_loop().create_future()
        self._looks.append((look, future))
        if not self._looking:
            self._looking = True
            self.rt.spawn(self._run_looks(), "agent-looks")
        return await future

    async def _run_looks(self) -> None:
        try:
            while self._looks:
                batch, self._looks = self._looks, []
                try:
                    now = self.rt.now()
                    results = await self.rt.db(poll_many, looks=[look | {"now": now} for look, _ in batch])
                except Exception as exc:  # each poll answers for itself (503 for a store that is down)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._looking = False

    def body(self, task_id: str, type_: str, data: Any, attempt: int) -> dict[str, Any]:
        """Exactly what a pushed GPU receives (``GpuRequests.fire``)."""
        s = self.rt.settings
        return {
            "task_id": task_id,
            "type": type_,
            "data": data,
            "attempt": attempt,
            "callback_url": s.public_callback_url,
            "callback_token": make_token(s.secret, task_id, attempt),
        }

    # -- silent agents ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """A side task: every SWEEP_SECONDS, silent agents' GPUs out, their unfetched jobs back."""
        while not self.rt.stopping.is_set():
            try:
                await self.sweep()
            except TRANSIENT as exc:
                log.warning(
                    "could not look for silent agents", extra={"action": "agent_sweep", "error": str(exc)}
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.rt.stopping.wait(), SWEEP_SECONDS)

    async def sweep(self) -> None:
        rt = self.rt
        gone = await rt.db(silence, now=rt.now(), stale_seconds=rt.settings.agent_stale_seconds)
        for gpu_id in gone:
            log.warning(
                "pull GPU out of rotation: its agent stopped polling",
                extra={
                    "action": "agent_silent",
                    "gpu_id": gpu_id,
                    "stale_seconds": rt.settings.agent_stale_seconds,
                },
            )
        for task_id, attempt, gpu_id in await rt.db(take_back_unfetched):
            await self.ends.end_attempt(
                task_id,
                attempt,
                Outcome.GPU_REFUSED,
                error=f"pull GPU {gpu_id}: its agent fell silent before fetching the job",
            )
