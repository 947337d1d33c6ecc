"""Ends of a standby's attempt met before its promotion (``standbys.py``): kept here and applied once the
standby is promoted.

Why: the owner sends a standby before its holder's transaction commits; when that transaction fails, the
GPU's synchronous answer for the standby can arrive while its row is still ``standby``. Applied then, it
would be stale and the answer lost (the job rerun after its lease); kept, it is applied once a look finds
the row promoted. A callback for it was answered 503 and may come again: one of the two applies, the
other is a repeat.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from dispatcher.db.standby import states
from dispatcher.loop.runtime import Runtime
from dispatcher.states import TaskState

log = logging.getLogger("gpuq.dispatcher")

#: Ends kept at most; past it the oldest is left to its lease. In memory only: a stop loses them, and the
#: job reruns after its lease (docs/standby.md).
DEFERRED_ENDS_MAX = 10_000

End = Callable[[], Coroutine[Any, Any, Any]]


class DeferredEnds:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._ends: dict[str, End] = {}  # task -> its end, again

    def __bool__(self) -> bool:
        return bool(self._ends)

    def add(self, task_id: str, again: End) -> None:
        if len(self._ends) >= DEFERRED_ENDS_MAX:
            dropped = next(iter(self._ends))
            del self._ends[dropped]
            log.warning(
                "too many ends of standby jobs waiting for their promotion; one left to its lease",
                extra={"action": "standby", "task_id": dropped},
            )
        self._ends[task_id] = again

    async def apply(self) -> None:
        """Each end whose standby is no longer ``standby`` (promoted, or taken over) runs again now."""
        ids = list(self._ends)
        seen = await self.rt.db(states, task_ids=ids)
        for task_id in ids:
            if seen.get(task_id, (None, 0))[0] != TaskState.STANDBY.value:
                again = self._ends.pop(task_id)
                self.rt.spawn(again(), f"deferred-end:{task_id}")
