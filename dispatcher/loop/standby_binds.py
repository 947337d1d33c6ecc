"""Binding standby jobs (``standbys.py``): a round takes the buffer's jobs and records them as standbys of
this process's busy slots (``db/standby.py``), oldest jobs on the slots whose holders started first.

Why a module of its own: the round is the one part of standby jobs that takes jobs out of the ready buffer,
and with that the buffer's accounting (jobs out count as held; a pass or hand-off holding a pool's oldest jobs
keeps a round off that pool, and the other way round), which the rest of ``Standbys`` never touches.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from dispatcher.db.dispatch import Placed
from dispatcher.db.standby import Bound, bind
from dispatcher.loop.handoff import HandOffs
from dispatcher.loop.ready import BY_STANDBY, Ready
from dispatcher.loop.runtime import Runtime
from dispatcher.loop.wakeups import Wakeups

#: Holders remembered as running long (a standby there was overtaken): bounded, cleared when full.
AVOID_MAX = 1000


@dataclass(slots=True)
class Standby:
    ready: Ready
    bound: Bound
    seq: int  # bind order: lower is older
    since: float = field(default_factory=time.monotonic)  # when it was bound
    promoted: asyncio.Event = field(default_factory=asyncio.Event)
    overtaken: int = 0

    def placed(self) -> Placed:
        b = self.bound
        return Placed(b.job, b.pool, b.gpu_id, b.slot_index, b.url, 1)


def uncount(handoffs: HandOffs, items: list[Ready]) -> None:
    """These jobs are no longer out with a bind or a standby: back in the buffer, or settled."""
    handoffs.in_flight.subtract(r.element for r in items)
    handoffs.in_flight += Counter()  # drop zero counts


def _suspect(items: list[Ready]) -> list[Ready]:
    for r in items:
        r.check = True
    return items


def _bindable(candidates: list[Ready]) -> list[Ready]:
    """The jobs a round may bind: of each pool, the fresh first attempts before its first other job (to be
    looked up, a retry, a scheduled one). Binding younger ones past it would start them first (a test saw
    job 227 of 300 on a one-slot pool run out of order)."""
    out, stopped = [], set()
    for r in candidates:
        if r.pool in stopped:
            continue
        if r.check or r.job.attempt != 0 or r.job.not_before is not None:
            stopped.add(r.pool)
        else:
            out.append(r)
    return out


class Binder:
    def __init__(self, rt: Runtime, wake: Wakeups, handoffs: HandOffs) -> None:
        self.rt = rt
        self.wake = wake
        self.handoffs = handoffs
        self.targets = True  # a bind may find a busy slot of ours without a standby
        self.avoid: set[tuple[str, int]] = set()  # holders (task, attempt) whose slot must get no standby
        self._seq = 0

    async def round(self, record: Callable[[Standby], None]) -> None:
        """Bind buffered jobs to busy slots of ours without a standby; ``record`` each one bound."""
        buffer = self.handoffs.buffer
        candidates: list[Ready] = []
        if not self.targets:
            return
        for pool in buffer.pools():
            # Not while a pass or a hand-off holds the pool's oldest jobs: binding younger ones would start
            # them first if those came back.
            if not buffer.lent(pool):
                candidates += buffer.pop(pool, buffer.count(pool), BY_STANDBY)
        if not candidates:
            return
        try:
            await self._bind(candidates, record)
        finally:
            # The room a pass left to this pool while its oldest jobs were out goes back to the loop.
            pools = {r.pool for r in candidates}
            self.wake.resume(p for p in pools if not buffer.held_outside_a_pass(p))

    async def _bind(self, candidates: list[Ready], record: Callable[[Standby], None]) -> None:
        buffer = self.handoffs.buffer
        # Out of the buffer and not yet decided: ours all the same (the processing list's reconcile must not
        # take them for strays while the transaction runs).
        self.handoffs.in_flight.update(r.element for r in candidates)
        fresh = _bindable(candidates)
        rt = self.rt
        bound: list[Bound] = []
        known: set[str] = set()
        cancelled = False
        try:
            if fresh:
                if len(self.avoid) > AVOID_MAX:
                    self.avoid.clear()
                work = asyncio.ensure_future(
                    rt.db(
                        bind,
                        candidates=[(r.job, r.pool) for r in fresh],
                        dispatcher_id=rt.settings.dispatcher_id,
                        max_attempts=rt.settings.max_attempts,
                        now=rt.now(),
                        avoid=sorted(self.avoid),
                    )
                )
                try:
                    res = await asyncio.shield(work)
                except asyncio.CancelledError:
                    # A stop: the transaction runs on in its thread and may commit. Its standbys are
                    # recorded here all the same, so the stop takes them back (``release_all``).
                    cancelled = True
                    res = await work
                bound, known = res.bound, {j.task_id for j in res.known}
        except BaseException:
            # Not known whether it committed: looked up before they are placed (a bound row is then known,
            # and its slot's standby runs after its lease, never twice).
            uncount(self.handoffs, candidates)
            buffer.put_back(_suspect(candidates))
            raise
        by_id = {id(r.job): r for r in fresh}
        taken = set()
        for b in bound:
            r = by_id[id(b.job)]
            taken.add(id(r))
            self._seq += 1
            record(Standby(r, b, self._seq))
        for r in fresh:
            if r.job.task_id in known:
                r.check = True
        back = [r for r in candidates if id(r) not in taken]  # in their order: the buffer's is the queue's
        uncount(self.handoffs, back)
        buffer.release([r for r in fresh if id(r) in taken])
        buffer.put_back(back)
        if len(bound) < len(fresh):  # no busy slot of ours left without a standby: wait for a change
            self.targets = False
        if bound:
            self.wake.refill()  # the buffer has room again
        if cancelled:
            raise asyncio.CancelledError
