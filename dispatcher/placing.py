"""One pass of the dispatch loop: place buffered and newly taken jobs on free slots, refill the hand-off
buffers (``dispatcher/ready.py``), park what neither fits nor may wait in a buffer.

At saturation most slots are refilled by hand-offs (``dispatcher/handoff.py``) and a pass only tops up the
buffers: one Redis call, no database. The free slots are read from the database only when something freed a
slot that no hand-off counted (``Dispatcher.slot_freed``: other dispatchers, operators, housekeeping, an
idle timeout); when a hand-off counted slots it could not fill, the pass uses that count (``room``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from sqlalchemy.exc import IntegrityError

from dispatcher.db.dead_letters import fail_dead_lettered
from dispatcher.db.dispatch import DispatchResult, dispatch, snapshot
from dispatcher.dead_letters import claimed, dead_letter, isolate
from dispatcher.intake import Settlement, Taken
from dispatcher.placement import GpuFree, capacity
from dispatcher.ready import Ready

if TYPE_CHECKING:
    from dispatcher.core import Dispatcher

log = logging.getLogger("gpuq.dispatcher")


class Placing:
    def __init__(self, d: Dispatcher) -> None:
        self.d = d

    async def dispatch_once(self) -> bool:
        d, h = self.d, self.d.handoffs
        if not d.accepting:
            return False
        # Jobs in our processing list that no pass, buffer or hand-off knows of were taken by a pass that did
        # not finish (a store error, or a Redis call retried after its first answer was lost): their
        # placement may have been committed already, so they are looked up before they are placed.
        isolating = (
            d.isolating()
        )  # cleared either way: a failed pass that left nothing has nothing to isolate
        strays = await h.strays() if h.reconcile_due() else []
        if strays and isolating:
            # The pass before raised something no rule foresaw: its jobs one at a time, the culprit
            # dead-lettered (dispatcher/dead_letters.py)
            await isolate(strays, lambda t: self.place_strays([t]), self.settle_refused, d.metrics)
            return True
        room, view = d.take_room(), None
        if room is None and (d.look_wanted() or strays):
            view = await d.db(snapshot)
            room = capacity(view)
        room = room or {}
        ready: list[Ready] = []
        for pool, n in room.items():  # buffered jobs are older than anything still in Redis: they go first
            ready += h.buffer.pop(pool, n)
        left = dict(room)
        for r in ready:
            left[r.pool] -= 1
        deficit = h.buffer.deficit()
        limits = {pool: left.get(pool, 0) + deficit.get(pool, 0) for pool in set(left) | set(deficit)}
        want = min(sum(left.values()) + sum(deficit.values()), d.settings.dispatch_batch_size)
        taken = await d.intake.take(want, limits) if want > 0 else []
        settlement = Settlement(park=_parked(h.buffer.lapsed()))
        if not (strays or ready or taken):
            await d.intake.settle(settlement)
            return False
        started = time.perf_counter()
        items, prepared = d.prepare(strays + taken)
        await self.settle_refused(prepared)
        stray_elements = {t.element for t in strays}
        fresh = [Ready(job, pool, el, check=el in stray_elements) for job, pool, el in items]
        place = [r for r in fresh if r.check] + ready
        keep = []
        for r in fresh:
            if r.check:
                continue
            if left.get(r.pool, 0) > 0:
                left[r.pool] -= 1
                place.append(r)
            else:
                keep.append(r)
        if place:
            keep = await self._place_and_start(place, view, ready, started, settlement) + keep
        settlement.park += _parked(h.buffer.add(keep))
        await d.intake.settle(settlement)
        return True

    async def place_strays(self, strays: list[Taken]) -> None:
        """Jobs found in our processing list that nothing here knew of: looked up before they are placed."""
        d = self.d
        started = time.perf_counter()
        items, prepared = d.prepare(strays)
        await self.settle_refused(prepared)
        place = [Ready(job, pool, el, check=True) for job, pool, el in items]
        settlement = Settlement()
        if place:
            keep = await self._place_and_start(place, None, [], started, settlement)
            settlement.park += _parked(d.handoffs.buffer.add(keep))
        await d.intake.settle(settlement)

    async def settle_refused(self, s: Settlement) -> None:
        """Settle jobs refused before placement (``prepare``, ``isolate``). A refused job whose task waits
        ``queued`` for it (a retry or scheduled task a dispatcher put back in Redis) ends that task
        ``failed`` with the reason (db/dead_letters.py), visible by id. The database first: a crash before
        the Redis settlement leaves the job to be refused again, never a task waiting for nothing."""
        d = self.d
        items = [(c[0], c[1], why) for _, raw, _, why in s.dead if (c := claimed(raw)) is not None]
        if items:
            for task_id in await d.db(fail_dead_lettered, items=items, now=d.now()):
                error = next(f"dead-lettered: {why}" for t, _, why in items if t == task_id)
                d.events.publish("failed", task_id, error=error)
                log.warning(
                    "task failed: its job was dead-lettered",
                    extra={"action": "task_failed", "task_id": task_id, "error": error},
                )
        await d.intake.settle(s)

    async def _place_and_start(
        self,
        place: list[Ready],
        view: list[GpuFree] | None,
        ready: list[Ready],
        started: float,
        settlement: Settlement,
    ) -> list[Ready]:
        """Place ``place``, fire what got a slot; buffered jobs not placed go back to the buffer's front,
        the new ones not placed are returned (to be buffered or parked)."""
        d, h = self.d, self.d.handoffs
        result = await self._place(place, view)
        if result is None:  # raced another dispatcher: look again, and up what the database has
            for r in place:
                r.check = True
            h.buffer.put_back(place)
            d.slot_freed()
            return []
        of = {id(r.job): r for r in place}
        was_buffered = {id(r) for r in ready}
        done = self.started(result, {k: r.element for k, r in of.items()}, started)
        settlement.ack += done.ack
        settlement.dead += done.dead  # new jobs reusing a known task id
        unplaced = [of[id(j)] for j, _ in result.unplaced]
        h.buffer.put_back([r for r in unplaced if id(r) in was_buffered])
        return [r for r in unplaced if id(r) not in was_buffered]

    async def _place(self, place: list[Ready], view: list[GpuFree] | None) -> DispatchResult | None:
        """Record and place jobs in one transaction; None when it raced another dispatcher."""
        d = self.d
        kwargs = {
            "items": [(r.job, r.pool) for r in place],
            "dispatcher_id": d.settings.dispatcher_id,
            "lease_seconds": d.settings.task_timeout_seconds,
            "max_attempts": d.settings.max_attempts,
            "rng": d.rng,
        }
        check = any(r.check for r in place)
        try:
            return await d.db(dispatch, now=d.now(), view=view, check_existing=check, **kwargs)
        except IntegrityError:  # one of them is known already (a copy, a tombstone): look before placing
            try:
                return await d.db(dispatch, now=d.now(), check_existing=True, **kwargs)
            except IntegrityError as exc:  # another dispatcher recorded one of them meanwhile
                log.warning(
                    "placement raced another dispatcher; the next pass finishes these jobs",
                    extra={"action": "dispatch_race", "error": str(exc.orig)},
                )
                return None

    def started(self, result: DispatchResult, element_of: dict[int, str], started: float) -> Settlement:
        """Fire the requests of the jobs placed (and of our own attempts recorded but not sent), publish
        their events; the settlement acknowledges every job the database decided on."""
        d = self.d
        # By identity: two copies of one task in a batch are two elements of the processing list.
        unsent = [p for p in result.mine if not d.requests.sent(p)]
        done = Settlement(
            ack=[element_of[id(p.job)] for p in result.placed + result.mine]
            + [element_of[id(j)] for j, _ in result.dropped]
            + [element_of[id(j)] for j in result.deferred],
        )
        for job, why in result.refused:  # a new job reusing a known task id
            dead_letter(done, d.metrics, element_of[id(job)], job.queue, why, reused=True)
        for job, why in result.invalid:  # a "retry" of a task never recorded, with an id the rules refuse
            dead_letter(done, d.metrics, element_of[id(job)], job.queue, why)
        for job, why in result.dropped:
            log.info(
                "dropped a copy of a known task", extra={"action": "drop", "task_id": job.task_id, "why": why}
            )
        for placed in result.placed + unsent:
            d.requests.fire(placed, started)
            d.events.publish(
                "dispatched",
                placed.job.task_id,
                attempt=placed.attempt,
                gpu_id=placed.gpu_id,
                slot_index=placed.slot_index,
                pool=placed.pool,
            )
        for job in result.deferred:
            d.events.publish("scheduled", job.task_id, run_after=job.not_before)
        return done

    def park(self, jobs: list[Ready]) -> None:
        """Buffered jobs this process will not start (draining): parked, so any dispatcher can."""
        if jobs:
            self.d.handoffs.settle_later(Settlement(park=_parked(jobs)))


def _parked(jobs: list[Ready]) -> list[tuple[str, str, str]]:
    return [(r.element, r.pool, r.job.to_redis()) for r in jobs]
