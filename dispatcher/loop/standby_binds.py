"""Binding standby jobs (``standbys.py``): a round takes the buffer's jobs and records them as standbys of
this process's busy slots (``db/standby.py``), oldest jobs on the slots whose holders started first.

Why a module of its own: the round is the one part of standby jobs that takes jobs out of the ready buffer,
and with that the buffer's accounting (jobs out count as held; a pass or hand-off holding a pool's oldest jobs
keeps a round off that pool, and the other way round), which the rest of ``Standbys`` never touches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dispatcher.db.dispatch import Placed
from dispatcher.db.handoff_claims import FOLD_BYTES
from dispatcher.db.standby import Bound, NextBind, bind
from dispatcher.limits import item_bytes
from dispatcher.loop.handoff import HandOffs
from dispatcher.loop.ready import BY_NEXT, BY_STANDBY, Ready
from dispatcher.loop.runtime import Runtime
from dispatcher.loop.wakeups import Wakeups

log = logging.getLogger("gpuq.dispatcher")

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


@dataclass(slots=True)
class NextJob:
    """A buffered job out with a group-commit batch, to be bound as the next standby of a slot that batch
    gives to a standby sent early (``db/standby.bind_next_statements``)."""

    ready: Ready
    bind: NextBind


def uncount(handoffs: HandOffs, items: list[Ready]) -> None:
    """These jobs are no longer out with a bind or a standby: back in the buffer, or settled."""
    handoffs.in_flight.subtract(r.element for r in items)
    handoffs.in_flight += Counter()  # drop zero counts


def note(message: str, items: list[Standby], **extra: Any) -> None:
    """What became of standbys other than being sent: each is a job that will run later than it could."""
    extra |= {"action": "standby", "count": len(items), "task_ids": [s.bound.job.task_id for s in items][:20]}
    log.info(message, extra=extra)


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
            # Nor for a pool no longer in demand here: its jobs go back to Redis at the next pass.
            if not buffer.lent(pool) and buffer.wanted(pool):
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
        kept = [(by_id[id(b.job)], b) for b in bound]
        taken = {id(r) for r, _ in kept}
        for r in fresh:
            if r.job.task_id in known:
                r.check = True
        # The rest in their order: the buffer's is the queue's.
        self._keep(kept, [r for r in candidates if id(r) not in taken], record)
        if len(bound) < len(fresh) and not known:  # no busy slot of ours left without one: wait for a change
            self.targets = False
        if cancelled:
            raise asyncio.CancelledError

    # -- in the group commit: the next standby of a slot, bound as its standby takes it ---------------------

    def take_next(self, early: list[Standby], items: list[dict[str, Any]], taken: int = 0) -> list[NextJob]:
        """For these standbys sent early, whose holders' ends a group-commit batch is about to commit: one
        buffered job of the pool each, to be bound on the slot the batch gives them (bound by a round
        instead, after that COMMIT, 9-26 % of 100 ms jobs found no standby when their holder ended). Never
        past a job that cannot be bound (``_bindable``), nor while a round holds the pool's jobs. Jobs out
        with a hand-off, another batch or a pass start before these do, which is their order; one that a
        pass fails to place (a race) comes back behind them, an overtaking within the prefetch bound (README
        "Slot hand-off"). Skipping the pool while a pass placed its jobs (as was done) left the slots this
        batch promotes without a next standby for that transaction's length: freed without one, they made
        more passes, and the 100 ms benchmark lost its standby chain for seconds at a time. Taken as
        ``BY_NEXT``: most are kept, so the buffer is refilled for them at once. Their data goes out in the
        batch's own query, with the hand-off's candidates (``taken``: their bytes) under ``place_fresh``'s
        bound (half a statement, as escaping may double it) and within what its results (``items``) leave of
        a statement. A budget of their own (as was done) let large bindings push the candidates off the one
        query onto ``dispatch``."""
        buffer = self.handoffs.buffer
        out: list[NextJob] = []
        limit = self.rt.limits.batch_bytes
        budget = min(FOLD_BYTES, limit // 2, limit - sum(item_bytes(i) for i in items)) - taken
        by_pool: dict[str, list[Standby]] = {}
        for s in early:
            by_pool.setdefault(s.bound.pool, []).append(s)
        for pool, ss in by_pool.items():
            if buffer.lent(pool, BY_STANDBY):
                continue
            popped = buffer.pop(pool, len(ss), BY_NEXT)
            ok = []
            for r in _bindable(popped):
                budget -= len(r.element)  # the jobs' data goes out in the batch's own query
                if budget < 0:
                    break
                ok.append(r)
            buffer.put_back(popped[len(ok) :])
            for r, s in zip(ok, ss, strict=False):
                b = s.bound
                out.append(NextJob(r, NextBind(r.job, pool, b.gpu_id, b.slot_index, b.job.task_id, b.url)))
        self.handoffs.in_flight.update(n.ready.element for n in out)
        return out

    def next_done(
        self, nexts: list[NextJob], bound: list[Bound], record: Callable[[Standby], None], *, suspect: bool
    ) -> None:
        """The batch is over: the jobs bound are standbys now (``record``), the others go back to the front
        of the buffer in their order (``suspect``: the transaction may have committed them, so they are
        looked up before they are placed)."""
        buffer = self.handoffs.buffer
        won = {b.job.task_id: b for b in bound}
        kept = [(n.ready, won[n.ready.job.task_id]) for n in nexts if n.ready.job.task_id in won]
        back = [n.ready for n in nexts if n.ready.job.task_id not in won]
        self._keep(kept, _suspect(back) if suspect else back, record)
        pools = {n.bind.pool for n in nexts}
        self.wake.resume(p for p in pools if not buffer.held_outside_a_pass(p))

    def _keep(
        self, kept: list[tuple[Ready, Bound]], back: list[Ready], record: Callable[[Standby], None]
    ) -> None:
        """A bind is over (a round's, or the next standbys of a batch): the jobs bound are standbys now
        (``record``, in bind order), ``back`` goes to the front of the buffer in its order."""
        for r, b in kept:
            self._seq += 1
            record(Standby(r, b, self._seq))
        uncount(self.handoffs, back)
        self.handoffs.buffer.release([r for r, _ in kept])
        self.handoffs.buffer.put_back(back)
        if kept:
            self.wake.refill()  # the buffer has room again
