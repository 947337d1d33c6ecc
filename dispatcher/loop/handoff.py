"""Slot hand-off: the transaction that ends attempts also starts the next waiting jobs on the freed slots.

Without it, refilling a freed slot took five serial steps (commit the callback, wake the loop, read the free
slots, take from Redis, commit the placement; bench/RESULTS.md). With it, a callback costs one transaction
that ends the attempt and records the next job ``processing`` on the freed slot; right after the COMMIT the
callback is answered and the next request POSTed. The jobs come from the per-pool ``ReadyBuffer``
(``dispatcher/loop/ready.py``), which the dispatch loop refills in the background; acknowledging them in Redis
happens after the POST, batched, off the callback's path.

Failure paths:

- the hand-off part fails (a job known already, any error that is not the store's): the attempts are ended
  again without it, so the callback still succeeds and the slot is freed; the jobs go back to the buffer
  marked to be looked up before they are placed;
- the store fails: the callback gets 503 as before; the jobs go back to the buffer, marked the same way
  (the COMMIT may have happened with its answer lost);
- the process dies after the COMMIT, before the POST: the attempt's lease runs out and the job is retried;
  its copy in the processing list is swept back and dropped as known.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import IntegrityError

from dispatcher.db.attempts import Finish, finish_many
from dispatcher.db.engine import StoreUnavailable
from dispatcher.db.handoff import HandOff, end_and_hand_off
from dispatcher.errors import TRANSIENT
from dispatcher.loop.gpu_requests import GpuRequests
from dispatcher.loop.ready import Ready, ReadyBuffer
from dispatcher.loop.runtime import Runtime
from dispatcher.loop.wakeups import Wakeups
from dispatcher.queues.intake import Settlement, Taken

if TYPE_CHECKING:
    from dispatcher.db.standby import Bound
    from dispatcher.loop.standby_binds import NextJob
    from dispatcher.loop.standbys import Standbys

log = logging.getLogger("gpuq.dispatcher")

#: How often the processing list is compared with what this process knows it holds (a Redis call retried
#: by the client after a lost answer can leave jobs there that no pass knows of).
RECONCILE_SECONDS = 5.0


class HandOffs:
    def __init__(self, rt: Runtime, wake: Wakeups, requests: GpuRequests, size: int) -> None:
        self.rt = rt
        self.wake = wake
        self.requests = requests
        self.buffer = ReadyBuffer(size)
        # Elements of the processing list this process knows of outside the buffer: candidates of a hand-off
        # in flight, and jobs whose settlement (ack, park) has not reached Redis yet.
        self.in_flight: Counter[str] = Counter()
        self._pending = Settlement()
        self._flushing = False
        self.reconcile_at = 0.0  # monotonic; 0 = at the next pass
        self.handed_off = 0  # jobs started by a hand-off (for tests and the log)
        self.standbys: Standbys | None = None  # wired by the builder (core.py) when standby jobs are on

    # -- ending attempts --------------------------------------------------------------------------------

    async def end_many(self, items: list[dict[str, Any]]) -> list[Finish]:
        """GroupCommit's batch: end the attempts, handing freed slots to buffered jobs when there are any
        (candidates: the oldest jobs of the pools these ends free, see ``_freeing``, and of the pools whose
        room the loop left to a hand-off, ``Wakeups.defer``)."""
        rt = self.rt
        extra, mark = self.wake.deferred()
        candidates = self.buffer.pop_each(len(items), self._freeing(items), extra) if rt.accepting else []
        self.in_flight.update(r.element for r in candidates)
        # Standbys sent early on these ends: their slots' next standbys are bound in this same transaction,
        # with or without candidates (``end_and_hand_off``). Bound only in batches with no candidate (as
        # was done), the early standbys of the others waited for a round: once a few slots lacked a
        # standby, every batch had candidates and the chain did not recover (the 100 ms benchmark).
        nexts: list[NextJob] = []
        if self.standbys is not None:
            if rt.accepting:
                nexts = self.standbys.take_next(items, sum(len(r.element) for r in candidates))
            elif any(self.standbys.covers(i["task_id"], i["attempt"]) for i in items):
                self.standbys.kick()  # their slots' next standbys: a round's
        try:
            return await self._end(items, candidates, mark, nexts)
        finally:
            # Placed or given back, they are no longer out: room a pass deferred for their pools goes back
            # to the loop (once no other hand-off holds jobs of the pool).
            self.buffer.release(candidates)
            pools = {r.pool for r in candidates}
            self.wake.resume(p for p in pools if not self.buffer.held_outside_a_pass(p))

    def _freeing(self, items: list[dict[str, Any]]) -> dict[str, int] | None:
        """The slots per pool these ends may free, when this process sent every attempt (None otherwise:
        another dispatcher's, a pull GPU's, one too old to remember). Candidates of other pools would wait
        out the transaction for nothing, and hold back their pool's younger jobs meanwhile."""
        out: Counter[str] = Counter()
        for item in items:
            if self.standbys is not None and self.standbys.covers(item["task_id"], item["attempt"]):
                continue  # its slot goes to the standby already sent to it
            pool = self.requests.pool_of(item["task_id"], item["attempt"])
            if pool is None:
                return None
            out[pool] += 1
        return dict(out)

    async def _end(
        self, items: list[dict[str, Any]], candidates: list[Ready], mark: int, nexts: list[NextJob]
    ) -> list[Finish]:
        rt = self.rt
        started = time.perf_counter()
        reconnects = rt.hot.reconnects
        check = any(r.check for r in candidates)
        try:
            try:
                out: HandOff = await self._hand_off(items, candidates, check=check, nexts=nexts)
            except IntegrityError:
                if check:
                    raise
                # A candidate is known already (cancelled while it waited, a copy): its fresh row's INSERT
                # failed and rolled the transaction back. Run again looking first, as a pass does
                # (placing.py), rather than end the attempts without a hand-off and log it as a failure.
                # Next standbys go again: their statements may run twice (the binding needs a slot with
                # none, the INSERT an unknown id) and the last reports what either run bound. Given back
                # instead, those a first run committed unanswered (the usual way here) were dropped as known
                # and never sent: promoted, their slot idled for a lease (an outside review).
                out = await self._hand_off(items, candidates, check=True, nexts=nexts)
        except StoreUnavailable:
            self._return(candidates, suspect=True)
            self._nexts_done(nexts, [], suspect=True)
            raise
        except Exception:
            self._nexts_done(nexts, [], suspect=True)
            if not candidates:
                raise
            # The hand-off must not fail the callback: end the attempts on their own.
            log.exception("slot hand-off failed; ending the attempts without it", extra={"action": "handoff"})
            self._return(candidates, suspect=True)
            fins = await rt.db_hot(
                finish_many,
                items=items,
                now=rt.now(),
                backoff=rt.backoff,
                lease_seconds=rt.settings.task_timeout_seconds,
            )
            if any(f.freed for f in fins):
                self.wake.slot_freed()
            return fins
        except BaseException:
            # Cancelled (a stop) with the transaction maybe sent: lent as they are, the next standbys held
            # their pool's younger jobs back from every pass (``held_outside_a_pass``) for good.
            self._nexts_done(nexts, [], suspect=True)
            self._return(candidates, suspect=True)
            raise
        self._nexts_done(nexts, out.bound, suspect=rt.hot.reconnects != reconnects)
        self.buffer.demand(out.freed_pools)
        if out.freed_pools:  # its transaction counted every pool's free slots, after the room the loop left
            self.wake.counted(mark)
        # Run again after a lost connection: the first run may have committed (its answer lost) and recorded
        # jobs this run did not place; those given back are looked up before they are placed again.
        used = self._started(out, candidates, started, suspect=rt.hot.reconnects != reconnects)
        if out.free:
            # Slots nobody here could take: the loop fills them, other dispatchers may too.
            self.wake.room(out.free)
        elif used:
            self.wake.refill()
        return out.finishes

    def _nexts_done(self, nexts: list[NextJob], bound: list[Bound], *, suspect: bool) -> None:
        if nexts and self.standbys is not None:
            self.standbys.next_done(nexts, bound, suspect=suspect)

    async def _hand_off(
        self,
        items: list[dict[str, Any]],
        candidates: list[Ready],
        *,
        check: bool,
        nexts: Sequence[NextJob] = (),
    ) -> HandOff:
        rt = self.rt
        return await rt.db_hot(
            end_and_hand_off,
            items=items,
            now=rt.now(),
            backoff=rt.backoff,
            candidates=[(r.job, r.pool) for r in candidates],
            check_existing=check,
            dispatcher_id=rt.settings.dispatcher_id,
            lease_seconds=rt.settings.task_timeout_seconds,
            max_attempts=rt.settings.max_attempts,
            rng=rt.rng,
            fold_bytes=rt.limits.batch_bytes // 2,  # the jobs' data, escaped, stays within a statement
            binds=[n.bind for n in nexts],
        )

    def _started(self, out: HandOff, candidates: list[Ready], started: float, suspect: bool = False) -> int:
        """Fire the requests of the jobs placed; the rest go back to the buffer (``suspect``: marked to be
        looked up first). Returns how many started."""
        if out.result is None:
            self._return(candidates, suspect=suspect)
            return 0
        ready_of = {id(r.job): r for r in candidates}
        settlement = self.requests.start(out.result, {k: r.element for k, r in ready_of.items()}, started)
        decided = {id(j) for j in [p.job for p in out.result.placed + out.result.mine]}
        decided |= {id(j) for j, _ in out.result.dropped + out.result.refused + out.result.invalid} | {
            id(j) for j in out.result.deferred
        }
        self._return([r for r in candidates if id(r.job) not in decided], suspect=suspect)
        self.settle_later(settlement, already_counted=True)
        self.handed_off += len(out.result.placed)
        self.rt.metrics.handoffs.inc(len(out.result.placed))
        if out.result.placed and self.standbys is not None:
            self.standbys.kick()  # busy slots of ours without a standby
        return len(out.result.placed)

    def _return(self, candidates: list[Ready], suspect: bool = False) -> None:
        """Candidates not placed go back to the front of the buffer; ``suspect``: the database may have
        recorded them (a failed or unanswered transaction), so they are looked up before they are placed."""
        for r in candidates:
            r.check = r.check or suspect
        self.in_flight.subtract(r.element for r in candidates)
        self.in_flight += Counter()  # drop zero counts
        self.buffer.put_back(candidates)

    # -- settling in Redis, off the callback's path ---------------------------------------------------------

    def settle_later(self, s: Settlement, already_counted: bool = False) -> None:
        """Queue a settlement; one flush in flight at a time, the next takes whatever queued meanwhile."""
        if not already_counted:
            self.in_flight.update(_elements(s))
        p = self._pending
        p.ack += s.ack
        p.park += s.park
        p.dead += s.dead
        p.restamp += s.restamp
        if not self._flushing and _elements(p):
            self._flushing = True
            self.rt.spawn(self._flush(), "settle-handoffs")

    async def _flush(self) -> None:
        try:
            while _elements(self._pending):
                s, self._pending = self._pending, Settlement()
                try:
                    await self.rt.settle(s)
                except TRANSIENT as exc:  # still in the processing list: the next reconcile finds them
                    log.warning("could not settle jobs", extra={"action": "settle", "error": str(exc)})
                    self.reconcile_at = 0.0
                finally:
                    self.in_flight.subtract(_elements(s))
                    self.in_flight += Counter()
        finally:
            self._flushing = False

    # -- what the processing list holds that nobody knows of ----------------------------------------------

    def reconcile_due(self) -> bool:
        return time.monotonic() >= self.reconcile_at

    async def strays(self) -> list[Taken]:
        """Jobs in the processing list that neither the buffer nor a hand-off nor a pending settlement holds:
        taken by a pass that did not finish. Known before or after the read counts as known (a settlement may
        land while we read)."""
        self.reconcile_at = time.monotonic() + RECONCILE_SECONDS
        before = self._known()
        held = await self.rt.intake.held()
        known = before | self._known()
        out = []
        for t in held:
            if known[t.element] > 0:
                known[t.element] -= 1
            else:
                out.append(t)
        return out

    def _known(self) -> Counter[str]:
        return Counter(self.buffer.elements()) + self.in_flight


def _elements(s: Settlement) -> list[str]:
    parked = [el for el, _, _ in s.park]
    return s.ack + parked + [el for el, _, _, _ in s.dead] + [old for old, _ in s.restamp]
