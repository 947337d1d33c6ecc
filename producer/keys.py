"""Every Redis key gpuq uses, in one place.

Layout (``P`` is ``REDIS_KEY_PREFIX``, default ``gpuq:``; ``Q`` a queue name from ``TASK_QUEUES``)::

    Q                       list    waiting jobs of normal priority, oldest first (RPUSH / LMOVE LEFT).
                                    The seed's name, unprefixed, so its producers keep working.
    Q:high, Q:low           list    waiting jobs of high / low priority; taken before / after Q
    P<parked>:<pool>        list    jobs earlier dispatchers took while their pool was full: only read now,
                                    served first once the pool has room (a full pool's jobs now wait in
                                    their queue lists: see dispatcher.intake)
    P<dead>                 list    jobs that cannot run (unparsable, breaking a limit, a
                                    reused task id): {"raw", "reason", "queue", "at"}
    P<idem>:<key>           string  idempotency mark of an accepted delivery -> task_id
                                    (TTL IDEMPOTENCY_TTL_SECONDS, default 24 h)
    P<proc>:<dispatcher>    list    jobs a dispatcher took and has not yet recorded in the database;
                                    swept back to their queue when the dispatcher's heartbeat is gone
    P<alive>:<dispatcher>   string  the dispatcher's heartbeat (TTL a few seconds)
    P<dispatchers>          set     ids of dispatchers that may own a processing list
    P<wake>                 pubsub  "job" after an enqueue, "slot" after a slot was freed:
                                    wakes every dispatcher's placement loop at once;
                                    "agent:<gpu_id>" after jobs were placed on a pull GPU:
                                    wakes its agents' long polls, whichever dispatcher holds them
    P<events>:<task_id>     pubsub  the task's state changes as JSON ({"event": "dispatched" | "heartbeat" |
                                    "retrying" | "finished" | ...}): GET /tasks/{id}/events streams them

The producer writes only queue lists, idempotency marks and the wake channel; the dispatcher owns the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Priority(StrEnum):
    """A job's priority within its queue; each has its own list so FIFO order holds inside a level."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


#: Order in which a dispatcher looks at a queue's lists.
PRIORITY_ORDER: tuple[Priority, ...] = (Priority.HIGH, Priority.NORMAL, Priority.LOW)

IDEMPOTENCY_TTL_SECONDS = 24 * 3600


def queue_key(queue: str, priority: Priority = Priority.NORMAL) -> str:
    """The list holding ``queue``'s waiting jobs of ``priority`` (normal is the bare queue name)."""
    return queue if priority is Priority.NORMAL else f"{queue}:{priority.value}"


@dataclass(frozen=True, slots=True)
class Keys:
    """Prefixed key names; one instance per configured prefix."""

    prefix: str = "gpuq:"

    @property
    def dead(self) -> str:
        return f"{self.prefix}dead"

    @property
    def dispatchers(self) -> str:
        return f"{self.prefix}dispatchers"

    @property
    def wake(self) -> str:
        return f"{self.prefix}wake"

    def parked(self, pool: str) -> str:
        return f"{self.prefix}parked:{pool}"

    def idem(self, key: str) -> str:
        return f"{self.prefix}idem:{key}"

    def proc(self, dispatcher_id: str) -> str:
        return f"{self.prefix}proc:{dispatcher_id}"

    def alive(self, dispatcher_id: str) -> str:
        return f"{self.prefix}alive:{dispatcher_id}"

    def task_events(self, task_id: str) -> str:
        return f"{self.prefix}events:{task_id}"
