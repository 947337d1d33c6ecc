"""A dispatcher's presence in Redis: its heartbeat, and giving back the jobs of those whose heartbeat is gone.

The other half of ``intake.py`` (which takes and settles jobs): while a dispatcher lives its heartbeat key
says so and records which queues it serves (``Keys.owner_queues``); when it is gone, any other dispatcher puts
the jobs of its processing lists back at the head of the lists they came from (``sweep_dead``), and a
dispatcher that stops gives its own back (``hand_back``) and retires its key. At its first sweep a dispatcher
also gives back jobs set aside for a pool TASK_ROUTES no longer names (``restore_set_aside``). ``Intake``
inherits all of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

from redis.asyncio import Redis
from redis.exceptions import RedisError

from dispatcher.queues.intake_lua import RESTORE, SWEEP
from dispatcher.queues.migrate import migrate, sweep_legacy_proc
from producer.keys import PRIORITY_ORDER, Keys, Legacy, Priority, queue_key, scope

#: How often a sweep looks again for jobs set aside for pools no longer routed to: a dispatcher of the old
#: routes may still set some aside after this one started (a rolling change of TASK_ROUTES).
ASIDE_RESCAN_SECONDS = 60.0

log = logging.getLogger("gpuq.intake")

HEARTBEAT_TTL_SECONDS = 10
#: How long the mark naming the life whose journal a recovery may trust outlives its last heartbeat
#: (``Keys.journal``; loop/recovery.py): a dead life's journal not read within this is left to the leases.
JOURNAL_MARK_TTL_SECONDS = 7 * 24 * 3600

#: The heartbeat key holds the instance (a random id per process) of the dispatcher it is for: set if it is
#: not another instance's; else that instance, and nothing written.
_BEAT = """
local v = redis.call('GET', KEYS[1])
if v and v ~= ARGV[1] then return v end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""
#: Take over the key of a process that is gone, unless someone else did first (two restarts at once).
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""
#: Retire: delete the heartbeat key only if it is ours (1); -1: another instance has it (0: nobody).
_RETIRE = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then redis.call('DEL', KEYS[1]); return 1 end
if v then return -1 end
return 0
"""


class DuplicateDispatcher(RuntimeError):
    """Another running process has this DISPATCHER_ID. Both would take each other's jobs for their own (the
    processing lists, the slots recorded as ``dispatcher_id``): an outside attack ran two with one ``.env``
    and saw GPUs given a fifth job and jobs run twice."""


#: The Redis clients a dispatcher process names (``dispatcher/serve.py``).
CLIENT_ROLES = ("loop", "beat", "events", "api")


def client_name(role: str, dispatcher_id: str, instance: str) -> str:
    """Redis client names (CLIENT LIST): who holds what, and which process of a DISPATCHER_ID is connected."""
    me = re.sub(r"[^A-Za-z0-9._:-]", "_", dispatcher_id)[:100]
    return f"gpuq-{role}-{me}-{instance}"


def new_instance() -> str:
    return uuid.uuid4().hex[:12]


class Presence:
    """Set by ``Intake.__init__``."""

    redis: Redis
    keys: Keys
    dispatcher_id: str
    instance: str  # this process's, among those that ever had this DISPATCHER_ID (``claim``)
    procs: dict[str, str]  # queue -> this dispatcher's processing list of it
    queues: list[str]
    cluster: bool
    _scan_old: bool  # look for parked lists of the layout before issue 15 at the next sweep
    _old_seen: bool  # a dispatcher of that layout was running at the last sweep
    _aside_due: float  # monotonic time of the next look for jobs set aside for pools no longer routed to
    #: No other dispatcher had a heartbeat at the last sweep (False until one ran): then the slots this
    #: process fills call back here, so it may fill a pool's ready buffer as it places
    #: (``ReadyBuffer.prime``).
    alone: bool
    routes: dict[str, str]  # task type -> pool (TASK_ROUTES)
    default_pool: str
    #: This life's instance once its journal holds all its id holds, else "off:<instance>" (runtime.py
    #: ``_start_journal``); refreshed with each heartbeat under ``Keys.journal``.
    journal_mark: str | None = None
    #: The instance whose heartbeat key ``claim`` took over (a process of our id that died moments ago).
    took_over: str | None = None
    #: The database this process works in (``db/identity.py``), published beside its queues and pools: a
    #: dispatcher of another database on the same key prefix is refused at start (preflight.py).
    database: str | None = None

    def pools(self) -> list[str]:
        """Every pool a job can be routed to (TASK_ROUTES and the default pool): a job is set aside for one
        of these, so its set-aside lists are those a take may write."""
        return sorted({*self.routes.values(), self.default_pool})

    async def hand_back(self) -> int:
        """Put every job still in our processing lists back where it came from (stop, or after an error)."""
        return await self._sweep_procs(list(self.procs.items()))

    async def _sweep_procs(self, procs: list[tuple[str, str]]) -> int:
        """Empty these (queue, processing list) back onto their sources (``SWEEP``: a job of a priority list
        goes to its pool's set-aside list when that holds jobs, by this process's routes)."""
        moved = 0
        routes: list[str | int] = [len(self.routes), *(v for pair in self.routes.items() for v in pair)]
        for queue, proc in procs:  # one script per list: each is one slot
            asides = [
                key for p in PRIORITY_ORDER for key in (queue_key(queue, p), self.keys.aside(queue, p, ""))
            ]
            moved += int(await self.redis.eval(SWEEP, 1, proc, self.default_pool, *routes, *asides))
        return moved

    async def claim(self, redis: Redis | None = None, *, poll: float = 0.25) -> None:
        """Take this DISPATCHER_ID's heartbeat key at start, or refuse to run beside a live process with it.

        A key of another instance is a process killed a moment ago (restarted by systemd, say) or a twin. One
        killed has no connection left to Redis (the kernel closed them): taken over at once. Otherwise (its
        connection lingers, CLIENT LIST is not allowed, a cluster) the key is watched: refreshed, it is a twin
        (``DuplicateDispatcher``); gone after its TTL, it was not."""
        r = redis or self.redis
        key = self.keys.alive(self.dispatcher_id)
        last: int | None = None
        while (held := await r.eval(_BEAT, 1, key, self.instance, HEARTBEAT_TTL_SECONDS)) is not None:
            other = as_str(held)
            if last is None and not await self._connected(r, other):
                if await r.eval(_TAKE_OVER, 1, key, other, self.instance, HEARTBEAT_TTL_SECONDS):
                    self.took_over = other
                    log.warning(
                        "took over this DISPATCHER_ID from a process that is gone",
                        extra={"action": "claim", "instance": self.instance, "previous": other},
                    )
                    return
                continue  # another process took it first: look at that one
            ttl = int(await r.pttl(key))
            if ttl == -1:  # no expiry: not a heartbeat of ours
                raise DuplicateDispatcher(
                    f"{key} (this DISPATCHER_ID's heartbeat key) was written without an expiry by something"
                    " other than a dispatcher: delete it, or give this dispatcher another DISPATCHER_ID"
                )
            if last is not None and ttl > last:
                raise DuplicateDispatcher(
                    f"DISPATCHER_ID={self.dispatcher_id} belongs to a running dispatcher (its heartbeat"
                    f" {key} is refreshed): give each dispatcher its own DISPATCHER_ID, or leave it unset"
                )
            last = ttl
            await asyncio.sleep(poll)

    async def _connected(self, r: Redis, other: str) -> bool:
        """Does a process of ours with instance ``other`` hold a connection to Redis? True when not known."""
        if self.cluster or other == "1":  # "1": a dispatcher from before instances, whose clients are unnamed
            return True
        try:
            clients = await r.client_list()
        except RedisError:  # CLIENT may be refused (ACL, a managed Redis)
            return True
        names = {client_name(role, self.dispatcher_id, other) for role in CLIENT_ROLES}
        return any(c.get("name") in names for c in clients)

    async def heartbeat(self, redis: Redis | None = None) -> None:
        """``redis``: a client of the heartbeat's own, so that nothing queued on the loop's delays it."""
        r = redis or self.redis
        key = self.keys.alive(self.dispatcher_id)
        if (held := await r.eval(_BEAT, 1, key, self.instance, HEARTBEAT_TTL_SECONDS)) is not None:
            raise DuplicateDispatcher(
                f"DISPATCHER_ID={self.dispatcher_id} was taken by another process (instance {as_str(held)},"
                f" ours {self.instance}): two dispatchers must not share an id; this one stops"
            )
        pipe = r.pipeline(transaction=False)
        pipe.sadd(self.keys.dispatchers, self.dispatcher_id)
        pipe.hset(self.keys.owner_queues, self.dispatcher_id, json.dumps(self.queues))
        # when each was last served: a queue none serves any more is said if it holds jobs (unserved.py)
        pipe.hset(self.keys.queues_seen, mapping=dict.fromkeys(self.queues, int(time.time())))
        pipe.hset(self.keys.owner_pools, self.dispatcher_id, json.dumps(self.pools()))
        if self.database is not None:
            pipe.hset(self.keys.owner_databases, self.dispatcher_id, self.database)
        if self.journal_mark is not None:
            pipe.set(self.keys.journal(self.dispatcher_id), self.journal_mark, ex=JOURNAL_MARK_TTL_SECONDS)
        await pipe.execute()

    async def is_alive(self, dispatcher_id: str) -> bool:
        """Does this dispatcher still refresh its heartbeat? (A stopped one retires its key at once.)"""
        return bool(await self.redis.exists(self.keys.alive(dispatcher_id)))

    async def retire(self) -> None:
        if int(await self.redis.eval(_RETIRE, 1, self.keys.alive(self.dispatcher_id), self.instance)) < 0:
            return  # the id is another process's now: what follows describes that one
        await self._unlist(self.dispatcher_id)

    async def _unlist(self, dispatcher_id: str) -> None:
        """What the heartbeat recorded of a dispatcher that stopped or is gone."""
        await self.redis.srem(self.keys.dispatchers, dispatcher_id)
        for owned in (self.keys.owner_queues, self.keys.owner_pools, self.keys.owner_databases):
            await self.redis.hdel(owned, dispatcher_id)

    async def queues_of(self, dispatcher_id: str) -> list[str]:
        """The queues ``dispatcher_id`` takes from, as its heartbeat recorded them (ours when unknown)."""
        raw = await self.redis.hget(self.keys.owner_queues, dispatcher_id)
        try:
            recorded = json.loads(raw) if raw else []
        except ValueError:
            recorded = []
        names = [q for q in recorded if isinstance(q, str)] if isinstance(recorded, list) else []
        return list(dict.fromkeys([*names, *self.queues]))

    async def sweep_dead(self) -> int:
        """Give back the jobs of dispatchers whose heartbeat is gone; returns how many were put back. On one
        Redis, also what the layout before issue 15 holds (``dispatcher.queues.migrate``)."""
        moved = 0
        # The set, and the queue records too: a dispatcher of the layout before issue 15 that swept one of
        # ours took it out of the set without touching its per-queue lists (rolling upgrade).
        members = await self.redis.smembers(self.keys.dispatchers)
        recorded = await self.redis.hkeys(self.keys.owner_queues)
        # A dispatcher of the old layout records no queues. While one runs, and at the sweep after it is
        # gone, look for old parked lists: it parks its ready buffer there when it drains, then retires.
        old_running = bool({as_str(m) for m in members} - {as_str(r) for r in recorded})
        look_for_old, self._old_seen = self._scan_old or self._old_seen or old_running, old_running
        others = 0
        for other in dict.fromkeys(as_str(raw) for raw in [*members, *recorded]):
            if other == self.dispatcher_id:
                continue
            if await self.redis.exists(self.keys.alive(other)):
                others += 1
                continue
            queues = await self.queues_of(other)
            n = await self._sweep_procs([(q, self.keys.proc(q, other)) for q in queues])
            if not self.cluster:  # the layout before issue 15 exists only on one Redis
                n += await sweep_legacy_proc(self.redis, Legacy(self.keys.prefix), other)
            await self._unlist(other)
            if n:
                log.warning(
                    "put back jobs of a dispatcher that is gone",
                    extra={"action": "sweep", "dead_dispatcher": other, "jobs": n},
                )
            moved += n
        self.alone = others == 0
        if not self.cluster:
            moved += await migrate(self.redis, self.keys, self.queues, parked=look_for_old or moved > 0)
            self._scan_old = False
        if time.monotonic() >= self._aside_due:
            moved += await self.restore_set_aside()
            self._aside_due = time.monotonic() + ASIDE_RESCAN_SECONDS
        return moved

    async def restore_set_aside(self) -> int:
        """Jobs set aside for a pool that is no longer routed to (TASK_ROUTES changed since): no take reads
        their lists, so they go back to the head of the list they were set aside from, in order, to be routed
        afresh. A SCAN of the keyspace: at start, then every ASIDE_RESCAN_SECONDS (a dispatcher still running
        the old routes during a rolling change keeps setting jobs aside for that pool)."""
        pools = set(self.pools())
        priorities = {p.value for p in PRIORITY_ORDER}
        moved = 0
        for queue in self.queues:
            stem = f"{self.keys.prefix}{scope(queue)}:aside:"
            found = [as_str(k) async for k in self.redis.scan_iter(match=_glob(stem) + "*", count=500)]
            for key in found:
                priority, _, pool = key[len(stem) :].partition(":")
                if pool in pools or priority not in priorities:
                    continue
                n = int(await self.redis.eval(RESTORE, 2, key, queue_key(queue, Priority(priority))))
                if n:
                    log.warning(
                        "jobs set aside for a pool no longer routed to are back in their queue",
                        extra={"action": "restore_set_aside", "queue": queue, "pool": pool, "jobs": n},
                    )
                moved += n
        return moved


def _glob(text: str) -> str:
    """``text`` matched literally by a SCAN pattern (a queue or prefix may hold glob characters)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def as_str(value: bytes | str) -> str:
    """Text of a Redis value. Bytes that are not UTF-8 (anyone can RPUSH anything) become surrogate escapes,
    so the job can still be dead-lettered and its element removed by ``_b`` of the same text."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
