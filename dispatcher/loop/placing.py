"""One pass of the dispatch loop: place buffered and newly taken jobs on free slots, refill the hand-off
buffers (``dispatcher/loop/ready.py``), park what neither fits nor may wait in a buffer.

At saturation most slots are refilled by hand-offs (``handoff.py``) and a pass only tops up the
buffers: one Redis call, no database. The free slots are read from the database only when something freed a
slot that no hand-off counted (``Wakeups.slot_freed``: other dispatchers, operators, housekeeping, an
idle timeout); when a hand-off counted slots it could not fill, the pass uses that count (``room``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from sqlalchemy.exc import IntegrityError

from dispatcher.db.dead_letters import fail_dead_lettered
from dispatcher.db.dispatch import DispatchResult, dispatch
from dispatcher.db.snapshot import snapshot
from dispatcher.loop.gpu_requests import GpuRequests
from dispatcher.loop.handoff import HandOffs
from dispatcher.loop.placement import GpuFree, capacity
from dispatcher.loop.ready import Ready
from dispatcher.loop.runtime import Runtime
from dispatcher.loop.wakeups import Wakeups
from dispatcher.queues.dead_letters import claimed, isolate, prepare
from dispatcher.queues.intake import Settlement, Taken
from producer.job import Job

log = logging.getLogger("gpuq.dispatcher")

#: Duplicate-key failures in a row after which a job's placement is treated as failing, not racing.
RACES_BEFORE_ISOLATING = 3
_RACES_KEPT = 10_000  # bound on the counts of jobs that never came back (dead-lettered, taken elsewhere)


class Placing:
    def __init__(self, rt: Runtime, wake: Wakeups, handoffs: HandOffs, requests: GpuRequests) -> None:
        self.rt = rt
        self.wake = wake
        self.handoffs = handoffs
        self.requests = requests
        # (task id, attempt) -> placements in a row that ended in a duplicate key even after looking the
        # jobs up: a race ends after one or two, a standing conflict never does. Not the processing-list
        # element: a job parked and taken again comes back as another element.
        self._races: Counter[tuple[str, int]] = Counter()
        # This pass counted against its room a job that took no slot (a copy dropped, a known task, a
        # scheduled job, one our lost commit placed already, a raced claim): ``left`` may call a free slot
        # taken, so the pass may not tell a job pushed next that nothing is free (``Wakeups.passed``).
        self._room_unused = False

    def prepare(self, taken: list[Taken]) -> tuple[list[tuple[Job, str, str]], Settlement]:
        """Jobs as taken from Redis, checked (``dead_letters.prepare``): what may be placed, and the
        settlement of what may not."""
        rt = self.rt
        return prepare(
            taken, max_bytes=rt.limits.job_bytes, pool_for=rt.settings.pool_for, metrics=rt.metrics
        )

    async def dispatch_once(self) -> bool:
        rt, h, wake = self.rt, self.handoffs, self.wake
        if not rt.accepting:
            return False
        # Jobs in our processing list that no pass, buffer or hand-off knows of were taken by a pass that did
        # not finish (a store error, or a Redis call retried after its first answer was lost): their
        # placement may have been committed already, so they are looked up before they are placed.
        # Cleared either way: a failed pass that left nothing has nothing to isolate.
        isolating = wake.isolating()
        strays = await h.strays() if h.reconcile_due() else []
        if strays and isolating:
            # The pass before raised something no rule foresaw: its jobs one at a time, the culprit
            # dead-lettered (dispatcher/queues/dead_letters.py)
            await isolate(strays, lambda t: self.place_strays([t]), self.settle_refused, rt.metrics)
            return True
        room, view = wake.take_room(), None
        if room is None and (wake.look_wanted() or strays):
            view = await rt.db(snapshot)
            room = capacity(view)
        room = room or {}
        # A pool whose oldest buffered jobs are out in a hand-off: its younger jobs (buffered or in Redis)
        # must not take its free slots first, or they would start ahead of the ones the hand-off gives
        # back. The room is kept for when the hand-off is over (``Wakeups.resume``).
        held = {pool: n for pool, n in room.items() if n > 0 and h.buffer.held_outside_a_pass(pool)}
        if held:
            wake.defer(held)
            room = {pool: n for pool, n in room.items() if pool not in held}
        ready: list[Ready] = []
        for pool, n in room.items():  # buffered jobs are older than anything still in Redis: they go first
            ready += h.buffer.pop(pool, n)
        try:
            return await self._fill(room, view, strays, ready)
        finally:
            h.buffer.release(ready)  # placed, back in the buffer, or strays of a failed pass: not out

    async def _fill(
        self, room: dict[str, int], view: list[GpuFree] | None, strays: list[Taken], ready: list[Ready]
    ) -> bool:
        """The rest of a pass: ``ready`` (popped from the buffer for ``room``) first, then jobs taken from
        Redis for what room is left and for the buffers' deficit."""
        rt, h, wake = self.rt, self.handoffs, self.wake
        left = dict(room)
        for r in ready:
            left[r.pool] -= 1
        early_park, early_back = h.buffer.lapsed()
        if early_park or early_back:
            # Settled before the take, which serves parked jobs first: jobs pushed out of a buffer still
            # in demand (``put_back``) come back into it ahead of the younger ones this take finds in Redis.
            # After it, they waited parked while a hand-off started those younger ones (an outside review).
            await rt.settle(Settlement(park=_parked(early_park), back=_back(early_back)))
        deficit = h.buffer.deficit()
        limits = {pool: left.get(pool, 0) + deficit.get(pool, 0) for pool in set(left) | set(deficit)}
        want = min(sum(left.values()) + sum(deficit.values()), rt.settings.dispatch_batch_size)
        set_aside = rt.intake.set_aside
        taken = await rt.intake.take(want, limits) if want > 0 else []
        if rt.intake.set_aside > set_aside:
            # The take cleared part of a queue's head: what is behind it is looked at now, with the pools'
            # room read again (it was used up by this pass), not after an idle poll. Each take moves at most
            # SCAN_DEPTH jobs per list: a long head takes a few passes, each of bounded work.
            wake.look_now()
        now = time.monotonic()
        park, back = h.buffer.lapsed(now)  # again: a priming may have lapsed during the take
        settlement = Settlement(park=_parked(park), back=_back(back))
        # Pools whose buffered jobs leave now: this pass's jobs of them follow the same way, even if a
        # callback puts the pool in demand again before they are decided (buffered, these younger jobs would
        # start before the older ones just sent to the queue).
        gone = {r.pool: True for r in early_back + back} | {
            r.pool: False for r in early_park + park if not h.buffer.wanted(r.pool, now)
        }
        if not (strays or ready or taken):
            await rt.settle(settlement)
            self._idle(left, view)
            return rt.intake.set_aside > set_aside
        started = time.perf_counter()
        items, prepared = self.prepare(strays + taken)
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
            filled = [pool for pool, n in room.items() if n > 0 and left.get(pool, 0) == 0]
            if filled and rt.intake.alone and h.buffer.size > 0:
                # Every slot of these pools is busy and will call back here: the first to free should find a
                # job at hand, as later ones do (``ReadyBuffer.prime``). The next pass takes it.
                h.buffer.prime(filled)
                wake.refill()
        self._refused(h.buffer.add([r for r in keep if r.pool not in gone]), settlement, gone)
        self._refused([r for r in keep if r.pool in gone], settlement, gone)
        await rt.settle(settlement)
        if h.standbys is not None and len(h.buffer):
            h.standbys.jobs_waiting()  # bind them to busy slots, if some lack a standby
        self._idle(left, view)
        return True

    def _idle(self, left: dict[str, int], view: list[GpuFree] | None) -> None:
        """Free slots this pass had nothing to put on: standbys waiting behind running jobs can take them, and
        a job pushed next is looked for (``Wakeups.job_pushed``), as is one after a pass whose ``left`` may
        call a free slot taken (``_room_unused``)."""
        exact, self._room_unused = not self._room_unused, False
        unannounced = self.wake.passed(left, read=view is not None, exact=exact)
        h = self.handoffs
        idle = {p: n for p, n in left.items() if n > 0 and not h.buffer.count(p)}
        if idle and h.standbys is not None:
            h.standbys.room_idle(idle, any_age=unannounced)

    async def place_strays(self, strays: list[Taken]) -> None:
        """Jobs found in our processing list that nothing here knew of: looked up before they are placed."""
        started = time.perf_counter()
        items, prepared = self.prepare(strays)
        await self.settle_refused(prepared)
        place = [Ready(job, pool, el, check=True) for job, pool, el in items]
        settlement = Settlement()
        if place:
            keep = await self._place_and_start(place, None, [], started, settlement)
            self._refused(self.handoffs.buffer.add(keep), settlement)
        await self.rt.settle(settlement)

    async def settle_refused(self, s: Settlement) -> None:
        """Settle jobs refused before placement (``prepare``, ``isolate``). A refused job whose task waits
        ``queued`` for it (a retry or scheduled task a dispatcher put back in Redis) ends that task
        ``failed`` with the reason (db/dead_letters.py), visible by id. The database first: a crash before
        the Redis settlement leaves the job to be refused again, never a task waiting for nothing."""
        rt = self.rt
        items = [(c[0], c[1], why) for _, raw, _, why in s.dead if (c := claimed(raw)) is not None]
        if items:
            for task_id in await rt.db(fail_dead_lettered, items=items, now=rt.now()):
                error = next(f"dead-lettered: {why}" for t, _, why in items if t == task_id)
                rt.events.publish("failed", task_id, error=error)
                log.warning(
                    "task failed: its job was dead-lettered",
                    extra={"action": "task_failed", "task_id": task_id, "error": error},
                )
        await rt.settle(s)

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
        h = self.handoffs
        result = await self._place(place, view)
        if result is None:  # raced another dispatcher: look again, and up what the database has
            for r in place:
                r.check = True
            h.buffer.put_back(place)
            self.wake.slot_freed()
            return []
        self._room_unused |= len(result.placed) < len(place)
        of = {id(r.job): r for r in place}
        was_buffered = {id(r) for r in ready}
        done = self.requests.start(result, {k: r.element for k, r in of.items()}, started)
        if result.placed and h.standbys is not None:
            h.standbys.kick()
        settlement.ack += done.ack
        settlement.dead += done.dead  # new jobs reusing a known task id
        unplaced = [of[id(j)] for j, _ in result.unplaced]
        h.buffer.put_back([r for r in unplaced if id(r) in was_buffered])
        return [r for r in unplaced if id(r) not in was_buffered]

    async def _place(self, place: list[Ready], view: list[GpuFree] | None) -> DispatchResult | None:
        """Record and place jobs in one transaction; None when it raced another dispatcher."""
        rt = self.rt
        kwargs = {
            "items": [(r.job, r.pool) for r in place],
            "dispatcher_id": rt.settings.dispatcher_id,
            "lease_seconds": rt.settings.task_timeout_seconds,
            "max_attempts": rt.settings.max_attempts,
            "rng": rt.rng,
        }
        check = any(r.check for r in place)
        try:
            try:
                result = await rt.db(dispatch, now=rt.now(), view=view, check_existing=check, **kwargs)
            except IntegrityError:  # one of them is known already (a copy, a tombstone): look before placing
                result = await rt.db(dispatch, now=rt.now(), check_existing=True, **kwargs)
        except IntegrityError as exc:  # another dispatcher recorded one of them meanwhile
            if len(self._races) > _RACES_KEPT:
                self._races.clear()
            self._races.update(_race_key(r) for r in place)
            if max(self._races[_race_key(r)] for r in place) >= RACES_BEFORE_ISOLATING:
                # Not a race: the same jobs meet the same error pass after pass (a table the upgrade could
                # not adopt, a constraint gpuq does not know). Raised, it fails the pass, and its jobs are
                # tried one by one: the culprit, its count kept, raises again at once and is dead-lettered
                # with this error; the others run (and their counts go).
                raise
            log.warning(
                "placement raced another dispatcher; the next pass finishes these jobs",
                extra={"action": "dispatch_race", "error": str(exc.orig)},
            )
            return None
        for r in place:
            self._races.pop(_race_key(r), None)
        return result

    def _refused(
        self, jobs: list[Ready], settlement: Settlement, gone: dict[str, bool] | None = None
    ) -> None:
        """Jobs taken that neither found a slot nor fit in the buffer: parked, or given back to the head of
        their queue with the rest of their pool's when it was only primed (``ReadyBuffer.goes_back``), after
        any given back by this pass's ``lapsed`` (older). ``gone``: pools this pass's ``lapsed`` sent back
        (True) or parked (False), decided then: their jobs go the same way."""
        buffer = self.handoffs.buffer
        way = {r.pool: (gone or {}).get(r.pool, buffer.goes_back(r.pool)) for r in jobs}
        settlement.back += _back([r for r in jobs if way[r.pool]])
        settlement.park += _parked([r for r in jobs if not way[r.pool]])

    def park(self, jobs: list[Ready]) -> None:
        """Buffered jobs this process will not start (draining): parked, so any dispatcher can."""
        if jobs:
            self.handoffs.settle_later(Settlement(park=_parked(jobs)))


def _race_key(r: Ready) -> tuple[str, int]:
    return r.job.task_id, r.job.attempt


def _back(jobs: list[Ready]) -> list[tuple[str, str, str | None]]:
    """To the head of the lists they were taken from, in this order: each exactly as it was there (the
    processing list's element after its source)."""
    return [(r.element, r.element.partition("\n")[2], r.pool) for r in jobs]


def _parked(jobs: list[Ready]) -> list[tuple[str, str, str]]:
    return [(r.element, r.pool, r.job.to_redis()) for r in jobs]
