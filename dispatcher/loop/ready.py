"""The per-pool ready buffer behind slot hand-off (``dispatcher/loop/handoff.py``).

When an attempt ends, the transaction that ends it may also start the next job on the freed slot. That job
must be at hand without a Redis round trip, so the dispatch loop keeps, per pool, a few jobs it has already
moved into this process's processing list (``Intake.take``) and parsed, but not yet recorded in the
database. They are in Redis the whole time: if the process dies, the sweep puts them back like any other job
it had taken; on a graceful stop ``hand_back`` does.

Jobs popped are lent, not gone, until they come back (``put_back``) or are decided (``release``): a pool's
jobs lent to a hand-off (``BY_HANDOFF``) are ahead of the ones still here, so while they are out the loop
places none of that pool's younger jobs (it defers that pool's room, ``Wakeups.defer``: a younger job
placed first would start before an older one that the hand-off gives back); and a hand-off takes no
candidates of a pool whose jobs a pass holds (``BY_LOOP``: they would race for the slots the pass counted).

Bounds (README "Slot hand-off"): at most ``size`` jobs per pool (``HANDOFF_BUFFER``; 0 turns hand-off off),
served oldest first, so a high-priority job enqueued after the buffer was filled starts behind at most
``size`` jobs of its pool that were taken before it. A pool's buffer is refilled only while this process has
seen its slots freed recently (``DEMAND_SECONDS``): a dispatcher that receives no callbacks for a pool holds
no jobs for it, and jobs left in a buffer whose demand lapsed are parked again (see ``Dispatcher``). A
dispatcher with no other beside it (``Intake.alone``) also fills a pool's buffer when its own pass fills the
pool's last free slots (``prime``): every slot of the pool will call back here, and the first of them should
find a job ready (and a standby bound) as later ones do. Jobs of a pool primed and then not seen freeing a
slot within ``DEMAND_SECONDS`` (long jobs) go back to the head of the lists they came from (``lapsed``),
where they were, rather than to the parked lists.

Pure and process-local: it owns no I/O and is only touched from the event loop.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from producer.job import Job

#: Who holds jobs popped from the buffer: a pass of the loop, or a hand-off's transaction.
BY_LOOP = "loop"
BY_HANDOFF = "handoff"
BY_STANDBY = "standby"  # a bind of standby jobs (standbys.py)
BY_NEXT = "next"  # the next standbys of slots a group-commit batch promotes (standby_binds.take_next)

#: A pool counts as in demand this long after this process last saw one of its slots freed.
DEMAND_SECONDS = 2.0
#: A pool with more slots than HANDOFF_BUFFER buffers one job per slot, up to this many times HANDOFF_BUFFER
#: and at most SLOTS_CAP jobs (each is held parsed in memory: up to ~2 MiB for a 256 KiB job).
#: Its callbacks empty a buffer faster than the loop refills it when short of CPU: with 64 slots of 100 ms,
#: a buffer of 32 then left 6-22 % of slots without a standby against 0-2 % at 64 (efficiency 0.70-0.84
#: against 0.83-0.89, 5 same-session pairs, bench/RESULTS.md), while a 16-slot pool gained nothing from 64.
#: One job per slot bounds a later high-priority job's wait at about one job's duration on every slot.
SLOTS_CAP_FACTOR = 4
SLOTS_CAP = 128


@dataclass(slots=True)
class Ready:
    """A taken, parsed job waiting for a slot of its pool."""

    job: Job
    pool: str
    element: str  # exactly as held in the processing list
    check: bool = False  # the database may know it already (a failed pass or hand-off): look before placing
    since: float = field(default_factory=time.monotonic)


class ReadyBuffer:
    def __init__(self, size: int) -> None:
        self.size = size
        self._caps: dict[str, int] = {}  # pool -> its buffer's size, where more than ``size`` (``sized``)
        self._shrunk: dict[str, int] = {}  # pool -> its size before it lost slots, while it holds more
        self._jobs: dict[str, deque[Ready]] = {}
        self._demand: dict[str, float] = {}  # pool -> monotonic time of the last freed slot seen
        self._primed: dict[str, float] = {}  # pool -> monotonic time a pass of ours last filled it
        self._primed_first: dict[str, float] = {}  # pool -> its first such fill since a slot was seen freed
        # Jobs pushed out by ``put_back`` past ``size``: still held (the processing list), parked by the
        # next pass (``lapsed``).
        self._over: list[Ready] = []
        # Jobs popped and neither back nor decided yet, by identity: (the job, who holds it).
        self._lent: dict[int, tuple[Ready, str]] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self._jobs.values())

    def count(self, pool: str) -> int:
        return len(self._jobs.get(pool, ()))

    def pools(self) -> list[str]:
        """The pools with jobs here."""
        return [pool for pool, q in self._jobs.items() if q]

    def demand(self, pools: Iterable[str], now: float | None = None) -> None:
        """Slots of ``pools`` were freed here: keep their buffers filled for a while."""
        now = time.monotonic() if now is None else now
        for pool in pools:
            self._demand[pool] = now

    def sized(self, slots: Mapping[str, int]) -> None:
        """The pools' slot counts (active GPUs), read by housekeeping: a pool of more slots than ``size``
        buffers one job per slot, up to ``SLOTS_CAP_FACTOR`` times ``size`` and ``SLOTS_CAP``. A pool that
        lost slots keeps what it holds until its hand-offs use it (no refill meanwhile): moved out to be
        parked, its youngest jobs would be served after younger ones the same pass takes (an outside
        review)."""
        top = min(SLOTS_CAP_FACTOR * self.size, max(self.size, SLOTS_CAP))
        before = {pool: self.cap(pool) for pool in self._jobs}
        self._caps = {pool: min(n, top) for pool, n in slots.items() if n > self.size}
        for pool, was in before.items():
            if self.cap(pool) < min(was, self.count(pool) + self.lent(pool)):
                self._shrunk[pool] = max(was, self._shrunk.get(pool, 0))

    def cap(self, pool: str) -> int:
        """How many jobs ``pool``'s buffer holds: ``size`` (HANDOFF_BUFFER; 0: none), or its slots if more."""
        return self._caps.get(pool, self.size) if self.size > 0 else 0

    def _keep(self, pool: str) -> int:
        """What ``put_back`` keeps: the size, or what the pool held before it lost slots."""
        return max(self.cap(pool), self._shrunk.get(pool, 0))

    def prime(self, pools: Iterable[str], now: float | None = None) -> None:
        """This process just filled the last free slots of ``pools`` and is the only one that will see them
        freed: fill their buffers now, so that the first slots to free find a job at hand."""
        now = time.monotonic() if now is None else now
        for pool in pools:
            # A pool whose slots this process sees freed is fed already: priming it would send its jobs back
            # to their queue rather than parked when that demand lapses, behind the ones parked before.
            if now - self._demand.get(pool, -1e9) > DEMAND_SECONDS:
                if not self._only_primed(pool):
                    self._primed_first[pool] = now
                self._primed[pool] = now

    def _wanted(self, pool: str, now: float) -> bool:
        last = max(self._demand.get(pool, -1e9), self._primed.get(pool, -1e9))
        return self.size > 0 and now - last <= DEMAND_SECONDS

    def wanted(self, pool: str, now: float | None = None) -> bool:
        """Is ``pool`` in demand here (slots freed or primed lately)? Jobs of a pool that is not wait in
        their queue, not in this process: none of them is bound as a standby either."""
        return self._wanted(pool, time.monotonic() if now is None else now)

    def goes_back(self, pool: str, now: float | None = None) -> bool:
        """Do jobs of ``pool`` that leave this process go back to the head of their queue (primed, and no
        slot freed here since) rather than to the parked lists? All of them must go the same way: parked
        jobs are served first, so younger ones parked would overtake older ones given back."""
        now = time.monotonic() if now is None else now
        return self._only_primed(pool) and not self._wanted(pool, now)

    def unprimed(self, now: float | None = None) -> dict[str, float]:
        """Pools primed here that then saw no slot freed within ``DEMAND_SECONDS`` (long jobs), with when
        they were primed: their standbys bound since then and not sent are taken back, their jobs going back
        to their queue with the buffered ones. Standbys bound before (while slots were seen freed) stay: their
        jobs are older than the ones parked when that demand lapsed, which their queue's would not be. The
        first priming since a slot was seen freed counts: a pass that fills the pool again (a GPU joined, a
        job cancelled) primes it again, and the standbys bound in between are of the priming all the same."""
        return {pool: self._primed_first[pool] for pool in self._primed if self.goes_back(pool, now)}

    def _only_primed(self, pool: str) -> bool:
        """No slot of ``pool`` was seen freed here since it was last primed."""
        return self._primed.get(pool, -1e9) > self._demand.get(pool, -1e9)

    def next_lapse(self, now: float | None = None) -> float | None:
        """Seconds until the first pool holding jobs here lapses (``lapsed`` then gives them out), None when
        none does: the loop's idle wait ends then, so jobs leave within ``DEMAND_SECONDS``, not one idle poll
        (up to a minute) later."""
        now = time.monotonic() if now is None else now
        ends = [
            max(self._demand.get(pool, -1e9), self._primed.get(pool, -1e9)) + DEMAND_SECONDS - now
            for pool, q in self._jobs.items()
            if q
        ]
        return max(0.0, min(ends)) if ends else None

    def deficit(self, now: float | None = None) -> dict[str, int]:
        """Jobs per pool the loop should take to fill the buffers of pools in demand."""
        now = time.monotonic() if now is None else now
        out = {}
        for pool in self._demand.keys() | self._primed.keys():
            # Jobs out with a standby bind mostly come back (one per slot that gets a standby is kept):
            # refilled for as if gone, they would push the youngest out to be parked when they do.
            have = self.count(pool) + self.lent(pool, BY_STANDBY)
            if pool in self._shrunk and self.count(pool) + self.lent(pool) <= self.cap(pool):
                del self._shrunk[pool]  # used down to its size: refilled as any
            if self._wanted(pool, now) and have < self.cap(pool) and pool not in self._shrunk:
                out[pool] = self.cap(pool) - have
        return out

    def pop(self, pool: str, n: int, holder: str = BY_LOOP) -> list[Ready]:
        """Up to ``n`` jobs of ``pool``, oldest first, lent to ``holder`` (a pass of the loop unless told)
        until they come back or are released."""
        q = self._jobs.get(pool)
        out: list[Ready] = []
        while q and len(out) < n:
            r = q.popleft()
            self._lent[id(r)] = (r, holder)
            out.append(r)
        return out

    def pop_each(
        self, n: int, pools: Mapping[str, int] | None = None, extra: Mapping[str, int] | None = None
    ) -> list[Ready]:
        """A hand-off's candidates: up to ``pools[pool]`` jobs of each pool whose slots its batch frees, or
        up to ``n`` of every pool when those are not known (``None``); ``extra`` more per pool for free
        slots the loop left to it (``Wakeups.defer``). Pools whose jobs a pass holds are
        skipped: the pass counted their free slots and is placing their oldest jobs on them; so are pools
        whose oldest jobs a standby bind holds (a younger job placed here would start first). Other hand-offs
        may hold some: each takes the next oldest, and its transaction's clock reading (taken in the order
        the batches start) orders their ``started_at`` when each places its own."""
        wanted = dict({pool: n for pool in self._jobs} if pools is None else pools)
        for pool, k in (extra or {}).items():
            wanted[pool] = wanted.get(pool, 0) + k
        return [
            r
            for pool, k in wanted.items()
            if not self.lent(pool, BY_LOOP) and not self.lent(pool, BY_STANDBY)
            for r in self.pop(pool, k, BY_HANDOFF)
        ]

    def lent(self, pool: str, holder: str | None = None) -> int:
        """Jobs of ``pool`` popped (by ``holder``, or by anyone) that are neither back nor decided."""
        return sum(1 for r, h in self._lent.values() if r.pool == pool and holder in (None, h))

    def held_outside_a_pass(self, pool: str) -> bool:
        """Are some of ``pool``'s oldest jobs out with a hand-off or a standby bind? A pass must then not
        start the pool's younger jobs first (``Wakeups.defer``)."""
        return any(r.pool == pool and h != BY_LOOP for r, h in self._lent.values())

    def release(self, items: Iterable[Ready]) -> None:
        """These popped jobs are decided (placed, dropped, parked, or lost to a failed pass: strays then):
        no longer out. Idempotent, so a ``finally`` can release whatever it popped."""
        for r in items:
            self._lent.pop(id(r), None)

    def put_back(self, items: Iterable[Ready]) -> None:
        """Jobs popped but not placed go back to the front, in their order, ahead of those added since. The
        loop may have refilled the buffer while they were out (a hand-off's transaction in flight): the
        youngest past ``size`` leave it, to be parked by the next pass, so the ordering bound holds."""
        by_pool: dict[str, list[Ready]] = {}
        for r in items:
            self._lent.pop(id(r), None)
            by_pool.setdefault(r.pool, []).append(r)
        for pool, rs in by_pool.items():
            q = self._jobs.setdefault(pool, deque())
            q.extendleft(reversed(rs))
            over = [q.pop() for _ in range(len(q) - self._keep(pool))]
            self._over.extend(reversed(over))

    def add(self, items: Iterable[Ready], now: float | None = None) -> list[Ready]:
        """Append jobs that found no slot; returns those that do not fit, or whose pool is not in demand here
        (to be parked)."""
        now = time.monotonic() if now is None else now
        over = []
        for r in items:
            q = self._jobs.setdefault(r.pool, deque())
            if len(q) < self.cap(r.pool) and self._wanted(r.pool, now):
                q.append(r)
            else:
                over.append(r)
        return over

    def lapsed(self, now: float | None = None) -> tuple[list[Ready], list[Ready]]:
        """Take out the jobs of pools no longer in demand (this process stopped seeing their slots freed),
        and those ``put_back`` pushed out: (to park, to put back at the head of their lists, oldest first).
        Jobs of a pool that was only primed and never seen freeing a slot since go back (``goes_back``):
        they waited for slots that turn over slowly (long jobs), and belong in their queue, in order and
        visible, like the jobs behind them."""
        now = time.monotonic() if now is None else now
        park: list[Ready] = []
        back: list[Ready] = []
        for pool, q in self._jobs.items():
            if q and not self._wanted(pool, now):
                (back if self.goes_back(pool, now) else park).extend(q)
                q.clear()
        for r in self._over:  # younger than the buffered ones of their pool: after them
            (back if self.goes_back(r.pool, now) else park).append(r)
        self._over = []
        return park, back

    def drain(self) -> list[Ready]:
        out, self._over = self._all(), []
        for q in self._jobs.values():
            q.clear()
        return out

    def _all(self) -> list[Ready]:
        return self._over + [r for q in self._jobs.values() for r in q]

    def elements(self) -> list[str]:
        return [r.element for r in self._all()]

    def held(self) -> list[tuple[str, datetime]]:
        """Each buffered job's element and ``enqueued_at``: they wait in their queue's age (``/metrics``)."""
        return [(r.element, r.job.enqueued_at) for r in self._all()]
