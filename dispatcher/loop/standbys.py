"""Standby jobs, the owner's side (``db/standby.py``; design, hazards, tests: ``docs/standby.md``): send each
standby when its slot's holder ends, look for those promoted elsewhere, take back what will not run.

Why: a hand-off's next request waits for the COMMIT that ends the attempt before it. A standby is recorded on
the slot before its holder ends: the owner POSTs it on the holder's final callback, whose transaction (any
process's) gives it the slot and binds the slot's next standby (``take_next``). Only this process sends its
standbys, each at most once (each leaves ``_by_task`` before it is sent; ``GpuRequests.start`` never sends one
of ours); taken back only while not sent. Its element stays in this process's processing list
(``HandOffs.in_flight``) until it is sent or taken back: after a crash the sweep's copy is dropped as known.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import IntegrityError

from dispatcher.db.standby import Bound, drop_cancelled, eligible_slots, states, taken_back, unbind
from dispatcher.errors import TRANSIENT
from dispatcher.loop.gpu_requests import GpuRequests
from dispatcher.loop.handoff import HandOffs
from dispatcher.loop.runtime import Runtime
from dispatcher.loop.standby_binds import Binder, NextJob, Standby, note, uncount
from dispatcher.loop.standby_ends import DeferredEnds, End
from dispatcher.loop.wakeups import Wakeups
from dispatcher.queues.intake import Settlement
from dispatcher.states import Outcome, TaskState

if TYPE_CHECKING:
    from dispatcher.loop.attempt_ends import AttemptEnds

log = logging.getLogger("gpuq.dispatcher")

#: How often, at most, the owner looks in the database for standbys promoted by another process, and for
#: GPUs no longer eligible. A callback to this process sends its standby at once; this bounds the rest.
LOOK_SECONDS = 0.05
#: A GPU drained, moved or shrunk by an operator (another process) gets no standby sent after this long; one
#: this process takes out of rotation, at once.
GPU_LOOK_SECONDS = 0.25
#: One round (look, bind) at most this often: each costs a transaction; spaced, each binds more at once. Not
#: more: at 20 ms, 29-49 % of 40-100 ms jobs were refilled the slow way, at more CPU (bench/RESULTS.md).
ROUND_SECONDS = 0.005
#: How long a standby's own callback waits here for its promotion (the holder's transaction) to commit.
PROMOTION_WAIT_SECONDS = 5.0
#: A standby overtaken by more younger standbys of its pool than this, or than the pool has standbys here,
#: whichever is more (its slot's job runs long), is taken back and bound again elsewhere: with the buffer and
#: one standby per slot, the bound on how far a job can fall behind younger ones (README "Standby jobs").
OVERTAKE_LIMIT = 2
#: A pass with free slots and nothing for them takes back standbys bound longer ago than this (behind long
#: jobs); younger ones look idle only for a moment at saturation (taken back: a fifth more CPU per job).
IDLE_TAKE_BACK_SECONDS = 1.0


class Standbys:
    def __init__(
        self, rt: Runtime, wake: Wakeups, handoffs: HandOffs, requests: GpuRequests, ends: AttemptEnds
    ) -> None:
        self.rt = rt
        self.wake = wake
        self.handoffs = handoffs
        self.requests = requests
        self.ends = ends
        self.enabled = rt.settings.standby_jobs and rt.settings.handoff_buffer > 0
        self._by_holder: dict[tuple[str, int], Standby] = {}  # not sent yet
        self._by_task: dict[str, Standby] = {}  # not sent yet
        self._early: dict[str, Standby] = {}  # sent on the holder's end, whose transaction is not done
        self._early_holders: set[tuple[str, int]] = set()
        #: Standbys out of ``_by_task`` whose fate ``_settle`` is deciding (it reads the database first):
        #: still ours to send, so no cancel may overtake them (``holds``).
        self._settling: set[str] = set()
        self.binder = Binder(rt, wake, handoffs)
        self._kick = asyncio.Event()
        self._looked = 0.0
        self._gpus_looked = 0.0
        self._ineligible: set[str] = set()  # GPUs last seen out of rotation (or changed): nothing sent early
        self._overtaken: set[str] = set()  # standbys to take back: younger ones overtook them too often
        self._deferred = DeferredEnds(rt)
        self.sent = 0  # standbys sent (tests, the log)

    def __len__(self) -> int:
        return len(self._by_task)

    def kick(self) -> None:
        """A busy slot of ours may lack a standby (a job started here, a chain broken): bind again soon."""
        if self.enabled:
            self.binder.targets = True
            self._kick.set()

    def holds(self, task_id: str) -> bool:
        """Is this task one of our standbys not sent yet? (Only this module may send it; its GPU cancel
        waits: ``CancelSender``.)"""
        return task_id in self._by_task or task_id in self._settling

    def covers(self, task_id: str, attempt: int) -> bool:
        """Is a standby already on its way to this attempt's slot? (A hand-off then has no slot to fill.)"""
        return (task_id, attempt) in self._early_holders

    # -- the holder's end ---------------------------------------------------------------------------------

    def on_end(self, task_id: str, attempt: int) -> Standby | None:
        """This attempt ends here (a verified callback, the GPU's answer): send its slot's standby now, before
        the transaction that ends it; returned, for ``ended`` when that transaction is over."""
        s = self._by_holder.get((task_id, attempt))
        if s is None or s.bound.gpu_id in self._ineligible:  # the look takes it back (or refunds it)
            return None
        self._forget(s.bound.job.task_id)
        self._early[s.bound.job.task_id] = s
        self._early_holders.add((task_id, attempt))
        self._send(s)
        self.handoffs.buffer.demand([s.bound.pool])  # the pool's slots are turning over here: keep it fed
        return s  # its slot's next standby: bound by the group commit (``take_next``), else a round's

    def take_next(self, items: list[dict[str, Any]], taken: int = 0) -> list[NextJob]:
        """Jobs to bind next on slots a batch of these ends gives our early standbys (``taken``: bytes)."""
        ending = {(item["task_id"], item["attempt"]) for item in items}
        early = [s for s in self._early.values() if (s.bound.holder, s.bound.holder_attempt) in ending]
        nexts = self.binder.take_next(early, items, taken) if early else []
        if len(nexts) < len(early):
            self.kick()  # slots that will have no standby: a round binds them
        return nexts

    def next_done(self, nexts: list[NextJob], bound: list[Bound], *, suspect: bool) -> None:
        self.binder.next_done(nexts, bound, self._record, suspect=suspect)
        if len(bound) < len(nexts):
            self.kick()

    def jobs_waiting(self) -> None:
        """Jobs came into the buffer: a round, if a busy slot of ours may lack a standby (``kick``)."""
        if self.enabled and self.binder.targets:
            self._kick.set()

    def ended(self, s: Standby) -> None:
        """The holder's transaction is over (committed or not): the standby's own reports may go on."""
        self._early.pop(s.bound.job.task_id, None)
        self._early_holders.discard((s.bound.holder, s.bound.holder_attempt))
        s.promoted.set()

    async def wait_promoted(self, task_id: str) -> None:
        """A standby sent early reports: wait for its holder's end to commit (bounded: then 503)."""
        if (s := self._early.get(task_id)) is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(s.promoted.wait(), PROMOTION_WAIT_SECONDS)

    def gpu_down(self, gpu_id: str) -> None:
        """This process took ``gpu_id`` out of rotation: nothing more is sent there; look at once."""
        if self.enabled:
            self._ineligible.add(gpu_id)
            self._gpus_looked = 0.0
            self._kick.set()

    def room_idle(self, idle: dict[str, int], *, any_age: bool = False) -> None:
        """Free slots a pass had nothing for: standbys bound long ago (behind long jobs) go there, or of any
        age when no word announced those slots (``Wakeups.passed``; docs/standby.md "Rounds are paced")."""
        if not self.enabled:
            return
        long_ago = time.monotonic() - (0.0 if any_age else IDLE_TAKE_BACK_SECONDS)
        for pool, n in idle.items():
            ours = [s for s in self._by_task.values() if s.bound.pool == pool and s.since <= long_ago]
            self._overtaken |= {s.bound.job.task_id for s in sorted(ours, key=lambda s: s.seq)[:n]}
        if self._overtaken:
            self._kick.set()

    def defer_end(self, task_id: str, again: End) -> None:
        """An end of a standby's attempt before its promotion: ``again`` once a look finds it promoted."""
        if self.enabled:
            self._deferred.add(task_id, again)
            self._kick.set()

    def _send(self, s: Standby) -> None:
        started = time.perf_counter()
        same = [o for o in self._by_task.values() if o.bound.pool == s.bound.pool]
        limit = max(OVERTAKE_LIMIT, len(same))
        for other in same:  # older standbys of the pool still waiting: overtaken
            if other.seq < s.seq:
                other.overtaken += 1
                if other.overtaken > limit:
                    self._overtaken.add(other.bound.job.task_id)
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
            started = time.monotonic()
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
            rest = ROUND_SECONDS - (time.monotonic() - started)
            if rest > 0:
                await asyncio.sleep(rest)

    async def step(self) -> None:
        """One round: send or release standbys promoted elsewhere, take back those whose GPU left, bind
        buffered jobs to busy slots. Tests call it directly."""
        if not self.enabled:
            return
        now = time.monotonic()
        if self._by_task and now - self._gpus_looked >= GPU_LOOK_SECONDS:  # first: the look sends
            self._gpus_looked = now
            await self._check_gpus()
        if self._by_task and (unprimed := self.handoffs.buffer.unprimed(now)):  # ready.py: to their queue
            self._overtaken |= {
                t for t, s in self._by_task.items() if s.since >= unprimed.get(s.bound.pool, float("inf"))
            }
        if self._overtaken:
            late = [self._by_task[t] for t in self._overtaken if t in self._by_task]
            self._overtaken.clear()
            self.binder.avoid |= {(s.bound.holder, s.bound.holder_attempt) for s in late}
            await self._take_back(late)
        if self._by_task and now - self._looked >= LOOK_SECONDS:
            self._looked = now
            await self._look()
        if self._deferred:
            await self._deferred.apply()
        if self.rt.accepting:
            await self.binder.round(self._record)

    def _record(self, s: Standby) -> None:
        self._by_holder[(s.bound.holder, s.bound.holder_attempt)] = s
        self._by_task[s.bound.job.task_id] = s

    async def _look(self) -> None:
        """Standbys promoted by another process (or by this one's lease sweep, a confirmed cancel): sent if
        their GPU is still eligible, else given back; a cancelled one never sent frees its slot at once (the
        GPU never had it)."""
        ids = list(self._by_task)
        seen = await self.rt.db(states, task_ids=ids)
        changed = [
            self._by_task[t]
            for t in ids
            if t in self._by_task and seen.get(t, (None, 0))[0] != TaskState.STANDBY.value
        ]
        for s in changed:
            self._forget(s.bound.job.task_id)
        await self._settle(
            changed, {t: seen.get(t, (None, 0)) for t in (s.bound.job.task_id for s in changed)}
        )

    async def _settle(self, items: list[Standby], after: Mapping[str, tuple[str | None, int]]) -> None:
        """Standbys whose row is no longer ``standby`` (or taken back): each sent, refunded, released,
        acknowledged or given back to the buffer. What a store error leaves undone: a job taken back goes to
        the buffer, any other is held again for the next look (buffered, a promoted one would be sent by a
        pass's "mine" path without a look at its GPU)."""
        left, back = list(items), []
        settling = {s.bound.job.task_id for s in items}
        self._settling |= settling
        try:
            promoted = [s for s in left if after.get(s.bound.job.task_id) == (TaskState.PROCESSING.value, 1)]
            ok = await self._eligible(promoted)
            while left:
                s = left[0]
                state, _ = after.get(s.bound.job.task_id, (None, 0))
                if s in promoted and (s.bound.gpu_id, s.bound.slot_index) in ok:
                    self._send(s)
                    self.kick()  # its slot now lacks a standby
                elif s in promoted:
                    await self._refund(s)
                elif taken_back(after, s.bound.job.task_id):  # placed the usual way
                    back.append(s)
                elif state == TaskState.CANCELLED.value:
                    await self._drop_cancelled(s)
                else:  # the database took it over (its lease ran out: retried from there)
                    note("standby job taken over by the database", [s], state=state)
                    self._ack(s)
                left.pop(0)
        finally:
            self._settling -= settling
            back += [s for s in left if taken_back(after, s.bound.job.task_id)]
            for s in left:
                if not taken_back(after, s.bound.job.task_id):
                    self._record(s)
            self._back_to_buffer(sorted(back, key=lambda s: s.seq))  # in their order: oldest first

    async def _eligible(self, items: list[Standby]) -> set[tuple[str, int]]:
        if not items:
            return set()
        where = [(s.bound.gpu_id, s.bound.slot_index, s.bound.url) for s in items]
        return await self.rt.db(eligible_slots, slots_of=where)

    async def _refund(self, s: Standby) -> None:
        """Promoted on a GPU that left rotation (or changed) before we sent it: never sent, so it waits
        again without using an attempt, and its slot is freed. A standby bound behind it on that GPU must not
        go out early on this end either."""
        self._ineligible.add(s.bound.gpu_id)
        note(
            "standby job promoted on a GPU out of rotation: not sent, it waits again", [s], gpu=s.bound.gpu_id
        )
        await self.ends.end_attempt(
            s.bound.job.task_id,
            1,
            Outcome.GPU_REFUSED,
            error=f"GPU {s.bound.gpu_id} left rotation before this standby job was sent to it",
        )
        self._ack(s)  # only once the database has it back: a failed end is settled again by the next look

    async def _drop_cancelled(self, s: Standby) -> None:
        rt = self.rt
        freed = await rt.db(
            drop_cancelled,
            task_id=s.bound.job.task_id,
            dispatcher_id=rt.settings.dispatcher_id,
            now=rt.now(),
            lease_seconds=rt.settings.task_timeout_seconds,
        )
        if freed:
            self.wake.slot_freed()
        self._ack(s)

    def _ack(self, s: Standby) -> None:
        self.handoffs.settle_later(Settlement(ack=[s.ready.element]), already_counted=True)

    def _forget(self, task_id: str) -> Standby | None:
        if (s := self._by_task.pop(task_id, None)) is not None:
            self._by_holder.pop((s.bound.holder, s.bound.holder_attempt), None)
        return s

    async def _check_gpus(self) -> None:
        """Take back standbys whose GPU is no longer eligible (drained, unhealthy, shrunk, moved): a drained
        GPU must get no new job, even one recorded before the drain."""
        ours = list(self._by_task.values())
        before = set(self._ineligible)
        ok = await self._eligible(ours)
        gone = [s for s in ours if (s.bound.gpu_id, s.bound.slot_index) not in ok]
        # What ``gpu_down`` added while we read stays: the read may be older than that.
        self._ineligible = {s.bound.gpu_id for s in gone} | (self._ineligible - before)
        # A callback may have sent one of them while we read: only those still here are taken back.
        gone = [s for s in gone if self._by_task.get(s.bound.job.task_id) is s]
        if gone:
            await self._take_back(gone)

    async def release_all(self) -> None:
        """A graceful stop: take back every standby not sent, so its job waits in Redis for any dispatcher."""
        if self._by_task:
            await self._take_back(list(self._by_task.values()))

    async def _take_back(self, items: list[Standby]) -> None:
        for s in items:  # first: from here on none of them can be sent early
            self._forget(s.bound.job.task_id)
        if not items:
            return
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
        note("standby jobs taken back", items)  # promoted first: sent (or refunded); else to the buffer
        await self._settle(items, after)
        self.kick()  # their slots lack a standby again

    def _back_to_buffer(self, items: list[Standby]) -> None:
        if not items:
            return
        for s in items:
            s.ready.check = True  # its row is queued (or may still be bound): look before placing
        uncount(self.handoffs, [s.ready for s in items])
        self.handoffs.buffer.put_back([s.ready for s in items])
        self.wake.look_now()
