"""What wakes the dispatch loop, and what it should look at when it wakes.

Parts that free slots or find work (hand-offs, housekeeping, cancels, agents) call ``slot_freed``, ``room``
or ``refill`` here instead of reaching into the loop (``core.py``); the loop waits on ``event`` and asks,
once per pass, ``take_room``, ``look_wanted`` and ``isolating``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping

from dispatcher.errors import TRANSIENT
from dispatcher.loop.runtime import Runtime

log = logging.getLogger("gpuq.dispatcher")


class Wakeups:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.event = asyncio.Event()  # "a slot was freed OR a job arrived OR stop"
        self.look = True  # free slots may exist that nobody counted: the next pass reads them
        self.isolate = False  # a pass raised something unforeseen: try its jobs one at a time
        self._room: dict[str, int] | None = None  # free slots per pool a hand-off left over (fresh count)
        # Free slots a pass counted for pools whose oldest buffered jobs were out in a hand-off (``defer``),
        # with the number of the deferral that last set them.
        self._deferred: dict[str, tuple[int, int]] = {}
        self._deferrals = 0
        self._publish_pending = False  # a wake-up to publish once the one in flight is out
        self._publishing = False
        # When a pass that read every pool's free slots last left none of them free (None: since then a
        # pass left slots free, or none has read them yet): a job pushed then need not be looked for.
        self._full_since: float | None = None
        # The next read is one nobody asked for by freeing a slot (the idle poll's, or a push's once the last
        # full read is IDLE_POLL_SECONDS old): free slots it finds were freed without a word.
        self._unannounced = False

    def slot_freed(self) -> None:
        """Wake this loop to look for free slots now, and every other dispatcher through Redis. A burst of
        freed slots costs one PUBLISH in flight plus one after it, not one per slot."""
        self.look = True
        self.event.set()
        self._publish_pending = True
        if not self._publishing:
            self._publishing = True
            self.rt.spawn(self._publish(), "publish-wake")

    def room(self, free: dict[str, int]) -> None:
        """A hand-off left ``free`` slots per pool (counted in its transaction) with no buffered job for
        them: the loop fills them without reading them again, and other dispatchers are woken (they may
        serve other queues). A look someone else asked for meanwhile (a slot freed by another dispatcher
        after this hand-off's count) stays asked for: clearing it lost that wake-up until the idle poll."""
        look = self.look
        self._room = free
        self.slot_freed()
        self.look = look

    def refill(self) -> None:
        """Buffered jobs were used: wake the loop to take more (no slot is free: nobody else to wake)."""
        self.event.set()

    def look_now(self) -> None:
        """Something may have changed that nobody counted (a wake-up from elsewhere, a lost one): look."""
        self.look = True
        self.event.set()

    def job_pushed(self) -> None:
        """A producer enqueued (the wake channel's "job"): the next pass takes jobs for the buffers, and reads
        the free slots only if some may be idle. Each push looked (a database read per pass): the efficiency
        run's 65 pushes cost 30 reads in its first half second, inside the first waves of callbacks (issue
        12). A push frees no slot; every part that frees one says so (``slot_freed``, ``room``, a "slot"
        wake-up), and a slot freed behind our back (an operator's SQL) is looked for within
        ``IDLE_POLL_SECONDS``, as without pushes."""
        full = self._full_since
        if full is None:
            self.look_now()
        elif time.monotonic() - full < self.rt.settings.idle_poll_seconds:
            self.event.set()
        else:
            self.look_unannounced()

    def look_unannounced(self) -> None:
        """Look although nothing said a slot was freed (the idle poll, a push after IDLE_POLL_SECONDS)."""
        self._unannounced = True
        self.look_now()

    def passed(self, left: Mapping[str, int], *, read: bool, exact: bool = True) -> bool:
        """A pass is over: ``left`` free slots per pool it had nothing for; ``read``: it read every pool's
        free slots (not only a hand-off's count); ``exact`` False: some job counted against that room took
        no slot (dropped as a copy, scheduled, raced), so ``left`` may call a free slot taken. True when the
        free slots left were found by a read nobody asked for (``look_unannounced``): jobs bound as standbys
        meanwhile were bound believing no slot free (``Standbys.room_idle``)."""
        unannounced = read and self._unannounced
        if read:
            self._unannounced = False
        if not exact or any(n > 0 for n in left.values()):
            self._full_since = None
        elif read:
            self._full_since = time.monotonic()
        return unannounced

    async def _publish(self) -> None:
        try:
            while self._publish_pending:
                self._publish_pending = False
                await self.rt.intake.wake_others("slot")
        except TRANSIENT as exc:
            log.warning("could not publish wake-up", extra={"action": "wake", "error": str(exc)})
        finally:
            self._publishing = False

    def defer(self, room: dict[str, int]) -> None:
        """A pass had ``room`` for pools whose oldest buffered jobs a hand-off holds: placing younger jobs
        there would start them first if the hand-off gives its jobs back. The room is kept: the next hand-off
        takes candidates for it (``deferred``, ``counted``), or it goes back to the loop (``resume``)."""
        for pool, n in room.items():
            self._deferrals += 1
            self._deferred[pool] = (max(n, self._deferred.get(pool, (0, 0))[0]), self._deferrals)

    def deferred(self) -> tuple[dict[str, int], int]:
        """The room deferred per pool, and the mark to pass to ``counted`` once a transaction counted it."""
        return {pool: n for pool, (n, _) in self._deferred.items()}, self._deferrals

    def counted(self, mark: int) -> None:
        """A hand-off that began after the deferrals up to ``mark`` took candidates for their room and counted
        every pool's free slots in its transaction (what it left goes to the loop, ``room``): they are
        spent. Under a steady stream of overlapping hand-offs, where ``resume`` may never find a pool
        unheld, this is what keeps a deferred slot from staying idle while jobs wait."""
        for pool, (_, stamp) in list(self._deferred.items()):
            if stamp <= mark:
                del self._deferred[pool]

    def resume(self, pools: Iterable[str]) -> None:
        """No hand-off holds jobs of ``pools`` any more (given back or placed): the room deferred for them
        goes to the next pass, which is woken. It may be stale (the hand-off may have used it): a placement
        checks every claim, so too much room costs a transaction, too little would leave a slot idle while
        jobs wait."""
        back = {pool: self._deferred.pop(pool)[0] for pool in set(pools) if pool in self._deferred}
        if not back:
            return
        room = dict(self._room or {})
        for pool, n in back.items():
            room[pool] = max(n, room.get(pool, 0))
        self._room = room
        self.event.set()

    def take_room(self) -> dict[str, int] | None:
        """The free slots a hand-off counted and left to the loop, once."""
        room, self._room = self._room, None
        return room

    def look_wanted(self) -> bool:
        """Whether a slot may have been freed that nobody counted (then the pass reads them), once."""
        look, self.look = self.look, False
        return look

    def isolating(self) -> bool:
        """Whether the last pass failed in a way no rule foresaw (its jobs are tried one by one), once."""
        isolate, self.isolate = self.isolate, False
        return isolate
