"""Every Redis key gpuq uses, in one place.

Layout (``P`` is ``REDIS_KEY_PREFIX``, default ``gpuq:``; ``Q`` a queue name from ``TASK_QUEUES``; ``{Q}`` its
hash tag, see ``scope``)::

    Q                       list    waiting jobs of normal priority, oldest first (RPUSH / LMOVE LEFT).
                                    The seed's name, unprefixed, so its producers keep working.
    {Q}:high, {Q}:low       list    waiting jobs of high / low priority; taken before / after Q
    P{Q}:idem:<key>         string  idempotency mark of an accepted delivery -> task_id
                                    (TTL IDEMPOTENCY_TTL_SECONDS, default 24 h); <key> requeue:<sha256>
                                    marks a dead letter pushed back by ``gpuq queue requeue`` on a cluster
    P{Q}:proc:<dispatcher>  list    jobs a dispatcher took from Q and has not yet recorded in the database;
                                    swept back to their list when the dispatcher's heartbeat is gone
    P{Q}:parked:<pool>      list    jobs of Q a dispatcher took whose pool then had no slot and that did not
                                    fit its ready buffer; served first once the pool has room
    P{Q}:aside:<prio>:<pool> list   jobs set aside from the head of Q's <prio> list (high, normal, low) by a
                                    take that found more than SCAN_DEPTH jobs there whose pool had no room
                                    (a queue that mixes pools), in their order; logically still the head of
                                    that list for their pool: served just before it once the pool has room
    P<dead>                 list    jobs that cannot run (unparsable, breaking a limit, a
                                    reused task id): {"raw", "reason", "queue", "at"}
    P<alive>:<dispatcher>   string  the dispatcher's heartbeat (TTL a few seconds)
    P<dispatchers>          set     ids of dispatchers that may own a processing list
    P<dispatchers>:queues   hash    dispatcher id -> JSON list of the queues it takes from (its processing
                                    lists), so that a sweeper serving other queues finds them all
    P{Q}:fence              string  written with REDIS_WAIT_REPLICAS before a WAIT that must cover a hand-off
    P<wake>                 pubsub  "job" after an enqueue, "slot" after a slot was freed:
                                    wakes every dispatcher's placement loop at once;
                                    "agent:<gpu_id>" after jobs were placed on a pull GPU:
                                    wakes its agents' long polls, whichever dispatcher holds them
    P<events>:<task_id>     pubsub  the task's state changes as JSON ({"event": "dispatched" | "heartbeat" |
                                    "retrying" | "finished" | ...}): GET /tasks/{id}/events streams them

Redis Cluster (``REDIS_CLUSTER=true``): every key of one queue hashes to the slot of the queue's own list, so
each script that moves a job (push, take, settle, sweep) touches one slot. ``Q`` hashes as a whole (or by its
own ``{tag}`` when it has one); ``{Q}`` in the other names makes them hash the same way. A delivery spanning
queues is pushed queue by queue; a retry after a partial push is safe through the idempotency marks. The
keys that belong to no queue (dead letters, heartbeats, channels) live wherever they hash.

Before issue 15 the layout was flat: ``Q:high``, ``Q:low``, ``P idem:<key>``, ``P proc:<dispatcher>`` and
``P parked:<pool>`` (the ``Legacy`` names below). A dispatcher moves jobs it finds under those names into the
new ones (``dispatcher.queues.migrate``) and the producer still honours an old idempotency mark.

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


def _tag_of(key: str) -> str | None:
    """The part of ``key`` Redis Cluster hashes when it is not the whole key: the text between the first
    ``{`` and the next ``}``, if not empty (CLUSTER KEYSLOT's rule)."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    return key[start + 1 : end] if end > start + 1 else None


def scope(queue: str) -> str:
    """The hash-tagged stem of ``queue``'s keys: ``{Q}``, or ``Q`` itself when it carries its own tag."""
    return queue if _tag_of(queue) is not None else f"{{{queue}}}"


def scope_problem(queue: str) -> str | None:
    """Why ``queue`` cannot share a cluster slot with its keys (a ``}`` outside a tag, an empty ``{}``), or
    None. Such a name is refused in every mode so that one key layout serves plain Redis and a cluster."""
    hashed = _tag_of(queue) or queue
    stem = scope(queue)
    if (_tag_of(stem) or stem) != hashed:
        return "braces that are not one {tag}"
    return None


def queue_key(queue: str, priority: Priority = Priority.NORMAL) -> str:
    """The list holding ``queue``'s waiting jobs of ``priority`` (normal is the bare queue name)."""
    return queue if priority is Priority.NORMAL else f"{scope(queue)}:{priority.value}"


def queue_lists(queue: str) -> list[str]:
    """``queue``'s lists in the order a dispatcher takes from them."""
    return [queue_key(queue, p) for p in PRIORITY_ORDER]


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
    def owner_queues(self) -> str:
        return f"{self.prefix}dispatchers:queues"

    @property
    def owner_pools(self) -> str:
        """Dispatcher id -> the pools it routes to: where its set-aside and parked lists may be."""
        return f"{self.prefix}dispatchers:pools"

    @property
    def queues_seen(self) -> str:
        """Queue -> when a running dispatcher last served it (unix seconds): jobs left in a queue that none
        serves any more are said (``dispatcher/queues/unserved.py``)."""
        return f"{self.prefix}dispatchers:queues_seen"

    @property
    def owner_databases(self) -> str:
        """Dispatcher id -> the database it works in (``db/identity.py``): one per key prefix."""
        return f"{self.prefix}dispatchers:databases"

    def fence(self, queue: str) -> str:
        return f"{self.prefix}{scope(queue)}:fence"

    @property
    def wake(self) -> str:
        return f"{self.prefix}wake"

    def parked(self, queue: str, pool: str) -> str:
        return f"{self.prefix}{scope(queue)}:parked:{pool}"

    def aside(self, queue: str, priority: Priority, pool: str) -> str:
        """Jobs of ``queue``'s ``priority`` list set aside for ``pool`` (the priority before the pool: a
        pool's name may hold a colon, a priority's cannot)."""
        return f"{self.prefix}{scope(queue)}:aside:{priority.value}:{pool}"

    def idem(self, queue: str, key: str) -> str:
        return f"{self.prefix}{scope(queue)}:idem:{key}"

    def proc(self, queue: str, dispatcher_id: str) -> str:
        return f"{self.prefix}{scope(queue)}:proc:{dispatcher_id}"

    def alive(self, dispatcher_id: str) -> str:
        return f"{self.prefix}alive:{dispatcher_id}"

    def starting(self, dispatcher_id: str) -> str:
        """Set by a dispatcher's start before it looks at the others' databases, until its heartbeat runs:
        two starting at once see each other (``preflight.check_one_database``)."""
        return f"{self.prefix}starting:{dispatcher_id}"

    def journal(self, dispatcher_id: str) -> str:
        """Which life (instance) of a dispatcher id keeps the journal a recovery may trust
        (dispatcher/sent_journal.py)."""
        return f"{self.prefix}journal:{dispatcher_id}"

    def task_events(self, task_id: str) -> str:
        return f"{self.prefix}events:{task_id}"


@dataclass(frozen=True, slots=True)
class Legacy:
    """Key names of the layout before issue 15 (one flat namespace), read only to move what is left there."""

    prefix: str = "gpuq:"

    @staticmethod
    def queue_key(queue: str, priority: Priority) -> str:
        return queue if priority is Priority.NORMAL else f"{queue}:{priority.value}"

    def parked(self, pool: str) -> str:
        return f"{self.prefix}parked:{pool}"

    def idem(self, key: str) -> str:
        return f"{self.prefix}idem:{key}"

    def proc(self, dispatcher_id: str) -> str:
        return f"{self.prefix}proc:{dispatcher_id}"
