"""Standby jobs, the owner's side (``db/standby.py``, ``docs/standby.md``): bind buffered jobs to this
process's busy slots, send each the moment its slot's holder ends, take back what will not run.

Why: with a hand-off the next request waits for the COMMIT of the transaction that ends the attempt before
it (15-40 ms from the GPU's callback on the benchmark box). A standby is recorded on the slot before the
holder ends, so on the holder's final callback the owner POSTs it at once, and the callback's transaction
(whatever process runs it) gives the slot to it.

Rules that keep a GPU at its slot count and every job run once:

- only this process sends its standbys, each at most once (``_sent_early``, ``GpuRequests`` keeps the rest);
- sent early only on a verified end of exactly the attempt it waits for (``on_end``); sent late when a look
  at the database (``_look``) finds it promoted by someone else (a callback through another process, a
  lease sweep), or released at once if it was cancelled meanwhile and never sent;
- taken back (``unbind``) only while not sent: on a graceful stop, and when its GPU is no longer eligible
  (drained, unhealthy, fewer slots, another URL) as this process last read it;
- its own callback before its promotion is committed waits here for the holder's transaction
  (``wait_promoted``); another process answers it 503 (retry), not 409.

The standby's element stays in this process's processing list (counted as ours in ``HandOffs.in_flight``)
until the job is sent or taken back: a crash before either leaves a copy that the sweep brings back and the
database drops as known; the bound row is promoted and, never sent, retried after its lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from sqlalchemy.exc import IntegrityError

from dispatcher.db.cancels import release_cancelled
from dispatcher.db.dispatch import Placed
from dispatcher.db.standby import Bound, bind, eligible_slots, states, unbind
from dispatcher.errors import TRANSIENT
from dispatcher.loop.gpu_requests import GpuRequests
from dispatcher.loop.handoff import HandOffs
from dispatcher.loop.ready import BY_STANDBY, Ready
from dispatcher.loop.runtime import Runtime
from dispatcher.loop.wakeups import Wakeups
from dispatcher.queues.intake import Settlement
from dispatcher.states import TaskState

log = logging.getLogger("gpuq.dispatcher")

#: How often, at most, the owner looks in the database for standbys promoted by another process, and for
#: GPUs no longer eligible. A callback to this process sends its standby at once; this bounds the rest.
LOOK_SECONDS = 0.05
GPU_LOOK_SECONDS = 1.0
#: How long a standby's own callback waits here for its promotion (the holder's transaction) to commit.
PROMOTION_WAIT_SECONDS = 5.0


@dataclass(slots=True)
class Standby:
    ready: Ready
    bound: Bound
    promoted: asyncio.Event = field(default_factory=asyncio.Event)

    def placed(self) -> Placed:
        b = self.bound
        return Placed(b.job, b.pool, b.gpu_id, b.slot_index, b.url, 1)


class Standbys:
    def __init__(self, rt: Runtime, wake: Wakeups, handoffs: HandOffs, requests: GpuRequests) -> None:
        self.rt = rt
        self.wake = wake
        self.handoffs = handoffs
        self.requests = requests
        self.enabled = rt.settings.standby_jobs and rt.settings.handoff_buffer > 0
        self._by_holder: dict[tuple[str, int], Standby] = {}  # not sent yet
        self._by_task: dict[str, Standby] = {}  # not sent yet
        self._early: dict[str, Standby] = {}  # sent on the holder's end, whose transaction is not done
        self._early_holders: set[tuple[str, int]] = set()
        self._targets = True  # a bind may find a busy slot of ours without a standby
        self._kick = asyncio.Event()
        self._looked = 0.0
        self._gpus_looked = 0.0
        self.sent = 0  # standbys sent (tests, the log)

    def __len__(self) -> int:
        return len(self._by_task)

    def kick(self) -> None:
        """Something changed (jobs buffered, jobs started here, a slot's standby used): bind again soon."""
        if self.enabled:
            self._targets = True
            self._kick.set()

    def holds(self, task_id: str) -> bool:
        """Is this task one of our standbys not sent yet? (Only this module may send it.)"""
        return task_id in self._by_task

    def covers(self, task_id: str, attempt: int) -> bool:
        """Is a standby already on its way to this attempt's slot? (A hand-off then has no slot to fill.)"""
        return (task_id, attempt) in self._early_holders

    # -- the holder's end ---------------------------------------------------------------------------------

    def on_end(self, task_id: str, attempt: int) -> Standby | None:
        """Attempt ``attempt`` of ``task_id`` is ending here (a verified callback, the GPU's answer, a lease
        sweep): send the standby waiting for its slot now, before the transaction that ends it. Returned, to
        be passed to ``ended`` when that transaction is over."""
        s = self._by_holder.pop((task_id, attempt), None)
        if s is None:
            return None
        del self._by_task[s.bound.job.task_id]
        self._early[s.bound.job.task_id] = s
        self._early_holders.add((task_id, attempt))
        self._send(s)
        self.handoffs.buffer.demand([s.bound.pool])  # the pool's slots are turning over here: keep it fed
        self.kick()
        return s

    def ended(self, s: Standby) -> None:
        """The holder's transaction is over (committed or failed): the standby's own callback may go on."""
        self._early.pop(s.bound.job.task_id, None)
        self._early_holders.discard((s.bound.holder, s.bound.holder_attempt))
        s.promoted.set()

    async def wait_promoted(self, task_id: str) -> None:
        """A callback (or answer) for a standby sent early: wait until its holder's end is committed, so it
        finds the attempt current. Bounded: a store failure leaves the row ``standby``, answered 503."""
        s = self._early.get(task_id)
        if s is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(s.promoted.wait(), PROMOTION_WAIT_SECONDS)

    def _send(self, s: Standby) -> None:
        started = time.perf_counter()
        placed = s.placed()
        self.requests.fire(placed, started)
        self.rt.events.publish(
            "dispatched",
            placed.job.task_id,
            attempt=1,
            gpu_id=placed.gpu_id,
            slot_index=placed.slot_index,
            pool=placed.pool,
        )
        self.handoffs.settle_later(Settlement(ack=[s.ready.element]), already_counted=True)
        self.sent += 1
        self.rt.metrics.handoffs.inc()

    # -- the background work ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Bind, look, take back; until the process stops (then ``release_all``)."""
        while not self.rt.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), LOOK_SECONDS)
            self._kick.clear()
            try:
                await self.step()
            except IntegrityError as exc:  # a copy of a job bound by another dispatcher first: a race
                log.warning(
                    "a standby's job was recorded elsewhere meanwhile; it is looked up, placed the usual way",
                    extra={"action": "standby", "error": str(exc.orig)},
                )
            except TRANSIENT as exc:
                log.warning("standby work failed; retrying", extra={"action": "standby", "error": str(exc)})
                await asyncio.sleep(0.2)
            except Exception:
                # Anything no rule foresaw: a failed bind's jobs went back to the buffer, to be looked up,
                # and are never bound again; the process goes on (this task dying would stop it).
                log.exception(
                    "standby work failed; its jobs are placed the usual way", extra={"action": "standby"}
                )
                await asyncio.sleep(0.2)

    async def step(self) -> None:
        """One round: send or release standbys promoted elsewhere, take back those whose GPU left, bind
        buffered jobs to busy slots. Tests call it directly."""
        if not self.enabled:
            return
        now = time.monotonic()
        if self._by_task and now - self._looked >= LOOK_SECONDS:
            self._looked = now
            await self._look()
        if self._by_task and now - self._gpus_looked >= GPU_LOOK_SECONDS:
            self._gpus_looked = now
            await self._check_gpus()
        if self.rt.accepting:
            await self._bind()

    async def _bind(self) -> None:
        buffer = self.handoffs.buffer
        candidates: list[Ready] = []
        if not self._targets:
            return
        for pool in buffer.pools():
            # Not while a pass or a hand-off holds the pool's oldest jobs: binding younger ones would start
            # them first if those came back.
            if not buffer.lent(pool):
                candidates += buffer.pop(pool, buffer.count(pool), BY_STANDBY)
        if not candidates:
            return
        try:
            await self._bind_these(candidates)
        finally:
            # The room a pass left to this pool while its oldest jobs were out goes back to the loop.
            pools = {r.pool for r in candidates}
            self.wake.resume(p for p in pools if not buffer.held_outside_a_pass(p))

    async def _bind_these(self, candidates: list[Ready]) -> None:
        buffer = self.handoffs.buffer
        # Out of the buffer and not yet decided: ours all the same (the processing list's reconcile must not
        # take them for strays while the transaction runs).
        self.handoffs.in_flight.update(r.element for r in candidates)
        fresh = [r for r in candidates if not r.check and r.job.attempt == 0 and r.job.not_before is None]
        others = [r for r in candidates if r not in fresh]
        rt = self.rt
        bound: list[Bound] = []
        known: set[str] = set()
        try:
            if fresh:
                res = await rt.db(
                    bind,
                    candidates=[(r.job, r.pool) for r in fresh],
                    dispatcher_id=rt.settings.dispatcher_id,
                    max_attempts=rt.settings.max_attempts,
                    now=rt.now(),
                )
                bound, known = res.bound, {j.task_id for j in res.known}
        except BaseException:
            # Not known whether it committed: looked up before they are placed (a bound row is then known,
            # and its slot's standby runs after its lease, never twice).
            self._uncount(candidates)
            buffer.put_back(self._suspect(candidates))
            raise
        by_id = {id(r.job): r for r in fresh}
        taken = set()
        for b in bound:
            r = by_id[id(b.job)]
            taken.add(id(r))
            s = Standby(r, b)
            self._by_holder[(b.holder, b.holder_attempt)] = s
            self._by_task[b.job.task_id] = s
        for r in fresh:
            if r.job.task_id in known:
                r.check = True
        back = [r for r in fresh if id(r) not in taken] + others
        self._uncount(back)
        buffer.release([r for r in fresh if id(r) in taken])
        buffer.put_back(back)
        if len(bound) < len(fresh):  # no busy slot of ours left without a standby: wait for a change
            self._targets = False
        if bound:
            self.wake.refill()  # the buffer has room again

    def _uncount(self, items: list[Ready]) -> None:
        h = self.handoffs
        h.in_flight.subtract(r.element for r in items)
        h.in_flight += type(h.in_flight)()  # drop zero counts

    def _suspect(self, items: list[Ready]) -> list[Ready]:
        for r in items:
            r.check = True
        return items

    async def _look(self) -> None:
        """Standbys promoted by another process (or by this one's lease sweep, a confirmed cancel): send
        them; a cancelled one never sent gives its slot back at once (the GPU never had it)."""
        ids = list(self._by_task)
        seen = await self.rt.db(states, task_ids=ids)
        for task_id in ids:
            state, attempt = seen.get(task_id, (None, 0))
            if state == TaskState.STANDBY.value or task_id not in self._by_task:
                continue
            s = self._forget(task_id)
            if state == TaskState.PROCESSING.value and attempt == 1:
                self._send(s)
            elif state in (None, TaskState.QUEUED.value):  # not recorded after all: placed the usual way
                self._back_to_buffer([s])
            else:  # cancelled, or the database has taken it over (its lease ran out: retried from there)
                await self._release_unsent(s, state)

    async def _release_unsent(self, s: Standby, state: str | None) -> None:
        if state == TaskState.CANCELLED.value:
            await self.rt.db(
                release_cancelled,
                task_id=s.bound.job.task_id,
                attempt=1,
                now=self.rt.now(),
                lease_seconds=self.rt.settings.task_timeout_seconds,
            )
            self.wake.slot_freed()
            # its binding may still be there (not promoted): clear it, the row stays cancelled
            await self.rt.db(
                unbind,
                task_ids=[s.bound.job.task_id],
                dispatcher_id=self.rt.settings.dispatcher_id,
                now=self.rt.now(),
            )
        self.handoffs.settle_later(Settlement(ack=[s.ready.element]), already_counted=True)

    def _forget(self, task_id: str) -> Standby:
        s = self._by_task.pop(task_id)
        self._by_holder.pop((s.bound.holder, s.bound.holder_attempt), None)
        return s

    async def _check_gpus(self) -> None:
        """Take back standbys whose GPU is no longer eligible (drained, unhealthy, shrunk, moved): a drained
        GPU must get no new job, even one recorded before the drain."""
        ours = list(self._by_task.values())
        where = [(s.bound.gpu_id, s.bound.slot_index, s.bound.url) for s in ours]
        ok = await self.rt.db(eligible_slots, slots_of=where)
        gone = [s for s in ours if (s.bound.gpu_id, s.bound.slot_index) not in ok]
        if gone:
            await self._take_back(gone)

    async def release_all(self) -> None:
        """A graceful stop: take back every standby not sent, so its job waits in Redis for any dispatcher."""
        if self._by_task:
            await self._take_back(list(self._by_task.values()))

    async def _take_back(self, items: list[Standby]) -> None:
        for s in items:  # first: from here on none of them can be sent early
            self._forget(s.bound.job.task_id)
        rt = self.rt
        try:
            after = await rt.db(
                unbind,
                task_ids=[s.bound.job.task_id for s in items],
                dispatcher_id=rt.settings.dispatcher_id,
                now=rt.now(),
            )
        except BaseException:
            # Not known whether it committed: each is bound or queued; kept as ours in the processing list,
            # looked up before it is placed. A bound one never sent runs after its slot's lease.
            self._back_to_buffer(items)
            raise
        back = []
        for s in items:
            state = after.get(s.bound.job.task_id)
            if state in (None, TaskState.QUEUED.value):
                back.append(s)
            elif state == TaskState.PROCESSING.value:
                self._send(s)  # promoted before we took it back: it is ours to send
            else:  # cancelled, or the database has taken it over
                await self._release_unsent(s, state)
        self._back_to_buffer(back)

    def _back_to_buffer(self, items: list[Standby]) -> None:
        for s in items:
            s.ready.check = True  # its row is queued (or may still be bound): look before placing
        self._uncount([s.ready for s in items])
        self.handoffs.buffer.put_back([s.ready for s in items])
        if items:
            self.wake.look_now()
