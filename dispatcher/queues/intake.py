"""The dispatcher's side of Redis: taking jobs reliably, settling them, sweeping, heartbeats and wake-ups.

A job never exists only in this process's memory: a Lua script moves it atomically from its list into this
dispatcher's processing list of that queue (``Keys.proc``), tagged with the list it came from
(``<source>\\n<raw>``). A queue's lists, parked lists and processing lists share its hash tag, so every
script here touches one Redis Cluster slot: on a cluster (``REDIS_CLUSTER``) a take runs once per queue, and a
settlement is one script per queue; on one Redis a take still covers all queues in one round trip.
It leaves the processing list only after the database has recorded it (``settle``), or when it is
dead-lettered or handed back.

Take contract (``take``): a job is taken only for a pool that can start it now (``free``), so jobs for a
full pool stay in their queue lists, in priority order, visible and changeable (``gpuq task priority``,
``GET /tasks/{id}``) and counted in the queue-age metric. A job taken for a pool's ready buffer counts
against that pool's budget too (``loop/placing.py`` passes room plus buffer deficit). A taken job that
then finds no slot (another dispatcher was faster) is buffered or parked by the placing pass;
``Settlement.back`` puts such a job back at the head of its list instead (of its pool's set-aside list, when
that holds jobs: those are younger, and served first). Parked lists are served first for their pool: each
turn of a queue (in its weighted order) tries its parked lists before its own. Jobs a take skipped at a
list's head because their pool had no room are moved aside, in the same script, once more than
``SCAN_DEPTH`` of them sit there (``Keys.aside``: one list per queue, priority and pool, served just before
that priority's list for their pool), so a queue that mixes pools keeps moving for pools with room whatever
waits at its head for the others.

If the process dies, its heartbeat key expires and any other dispatcher puts the tagged jobs back at the head
of their lists (``sweep``); the heartbeat records which queues the process serves (``Keys.owner_queues``), so
the sweeper finds its processing lists even for queues it does not serve itself. Key names live in
``producer.keys``; jobs left under the names before issue 15 are moved by ``dispatcher.queues.migrate``.

``REDIS_WAIT_REPLICAS``: a write that hands a job back to Redis alone (a requeue, a settlement) is followed by
a fence (``fence``): a small write to the same slot and ``WAIT`` on its connection. Replication keeps a
master's order, so replicas holding the fence hold the hand-off.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError

from dispatcher.queues.intake_lua import REQUEUE, SCAN_DEPTH, SETTLE, TAKE
from dispatcher.queues.presence import Presence, as_str, new_instance
from producer.connect import is_cluster, refresh_slots_async, wait_options
from producer.keys import PRIORITY_ORDER, Keys, queue_key, scope

log = logging.getLogger("gpuq.intake")

__all__ = ["SCAN_DEPTH", "Intake", "NotReplicated", "Settlement", "Taken", "as_str", "weighted_order"]


class NotReplicated(RedisError):
    """Fewer replicas than REDIS_WAIT_REPLICAS acknowledged a hand-off in time."""


@dataclass(frozen=True, slots=True)
class Taken:
    element: str  # exactly as held in the processing list
    source: str  # the list it came from
    raw: str
    # the queue it belongs to: its list's, or the one it was set aside from; None if parked (its body says)
    queue: str | None
    pool: str | None = None  # the pool it was taken for (its type's route); None when unknown or unparsable


@dataclass(slots=True)
class Settlement:
    """What to do with taken jobs once the database has decided, applied at once (one script)."""

    ack: list[str] = field(default_factory=list)
    park: list[tuple[str, str, str]] = field(default_factory=list)  # (element, pool, job json)
    # (element, job json, its pool or None): back to the head of the list it came from, in this order (lost
    # a slot race, a primed buffer lapsed); one taken from a priority list goes to the head of its pool's
    # set-aside list of that priority instead while that list holds jobs (all younger: ``_commands``)
    back: list[tuple[str, str, str | None]] = field(default_factory=list)
    dead: list[tuple[str, str, str | None, str]] = field(default_factory=list)  # (element, raw, queue, why)
    restamp: list[tuple[str, str]] = field(default_factory=list)  # (old element, new element)


def weighted_order(queues: list[str], weights: dict[str, int] | None = None) -> list[str]:
    """One cycle of smooth weighted round-robin (nginx's): with weights a=3, b=1 -> a a b a. Each queue
    appears as often as its weight (default 1), spread out rather than in runs."""
    w = {q: (weights or {}).get(q, 1) for q in queues}
    current = dict.fromkeys(queues, 0)
    order = []
    for _ in range(sum(w.values())):
        for q in queues:
            current[q] += w[q]
        best = max(queues, key=lambda q: current[q])
        current[best] -= sum(w.values())
        order.append(best)
    return order


class Intake(Presence):
    """Taking jobs and settling them; the heartbeat and the sweeps it inherits (``presence.py``)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        dispatcher_id: str,
        queues: list[str],
        weights: dict[str, int] | None = None,
        *,
        routes: dict[str, str] | None = None,
        default_pool: str = "default",
        wait_replicas: int = 0,
        wait_timeout_seconds: float = 1.0,
        instance: str | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.dispatcher_id = dispatcher_id
        self.instance = instance or new_instance()
        self.procs = {q: keys.proc(q, dispatcher_id) for q in queues}
        self.queues = queues
        self.routes = dict(routes or {})  # task type -> pool (TASK_ROUTES)
        self.default_pool = default_pool
        self.cluster = is_cluster(redis)
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = int(wait_timeout_seconds * 1000)
        self._order = weighted_order(queues, weights)
        self._queue_of = {queue_key(q, p): q for q in queues for p in PRIORITY_ORDER}
        # A set-aside job is still its queue's, and may be a seed-style job that does not say which queue
        self._queue_of |= {
            keys.aside(q, p, pool): q for q in queues for p in PRIORITY_ORDER for pool in self.pools()
        }
        # parked and set-aside lists: their names start with the queue's stem and end with a pool's name
        self._parked_stem = {
            f"{keys.prefix}{scope(q)}:{kind}:": q for q in queues for kind in ("parked", "aside")
        }
        self._take = redis.register_script(TAKE)
        self._settle = redis.register_script(SETTLE)
        self._turn = 0
        #: Jobs this process's takes set aside so far (``Keys.aside``): a take that set jobs aside made room
        #: at a queue's head, so the loop looks again at once rather than after an idle poll.
        self.set_aside = 0
        self._scan_old = True  # look for parked lists of the layout before issue 15 at the first sweep
        # look for jobs set aside for pools no longer routed to at the first sweep, then every
        # ASIDE_RESCAN_SECONDS (presence.py)
        self._aside_due = 0.0
        self._old_seen = False  # a dispatcher of that layout was running at the last sweep
        self.alone = False  # known at the first sweep (presence.py)

    @property
    def proc(self) -> str:
        """The processing list of the first queue (tests that serve one queue look at it)."""
        return self.procs[self.queues[0]]

    def queue_of(self, source: str) -> str | None:
        """The queue a source list (a priority list or a parked list) belongs to; None if not ours."""
        queue = self._queue_of.get(source)
        if queue is None:
            # a pool name may hold a colon: the longest stem that starts the key (one may start another's)
            stems = [stem for stem in self._parked_stem if source.startswith(stem)]
            queue = self._parked_stem[max(stems, key=len)] if stems else None
        return queue

    async def take(self, want: int, free: dict[str, int] | None) -> list[Taken]:
        """Up to ``want`` jobs, never more for a pool than ``free`` gives it (pool -> slots it can start now;
        ``None``: no limit per pool). First the parked lists of pools with room, then the queues by weighted
        round-robin (QUEUE_WEIGHTS): one job per visit, a queue of weight w visited w times per cycle, each
        call starting one step further along the cycle, so the shares hold for small takes too. A job's pool
        is its type's route (TASK_ROUTES, else the default pool); a job whose pool is full stays in its list,
        in its place, while jobs behind it for pools with room are taken (within ``SCAN_DEPTH``). When the
        first ``SCAN_DEPTH`` jobs of a list are all for pools without room (a full pool, or one without GPUs,
        in a queue that mixes pools), they are set aside in order (``Keys.aside``, per priority and pool) and
        the list is looked at once more: taken before that list's other jobs of their pool once it has room.

        On a cluster each queue is its own script (its own slot): the queues are visited in the same
        rotating order, each asked for what the ones before it left of ``want`` and of the pools' room."""
        if want <= 0:
            return []
        budgets = {pool: n for pool, n in (free or {}).items() if n > 0}
        start = self._turn % len(self._order)
        self._turn += 1
        order = self._order[start:] + self._order[:start]
        if not self.cluster:
            return await self._take_from(order, want, free is not None, budgets)
        out: list[Taken] = []
        for queue in dict.fromkeys(order):
            if len(out) >= want or (free is not None and not budgets):
                break
            got = await self._take_from([queue], want - len(out), free is not None, budgets)
            for t in got:
                if t.pool in budgets:
                    budgets[t.pool] -= 1
                    if budgets[t.pool] <= 0:
                        del budgets[t.pool]
            out += got
        return out

    async def _take_from(
        self, order: list[str], want: int, limited: bool, budgets: dict[str, int]
    ) -> list[Taken]:
        keys: list[str] = []
        args: list[str | int] = [want, SCAN_DEPTH, self.default_pool, 1 if limited else 0]
        args += [len(self.routes), *(v for pair in self.routes.items() for v in pair)]
        args += [len(budgets), *(v for pair in budgets.items() for v in pair)]
        pools = self.pools()
        args += [len(pools), *pools]
        sources = list(budgets) if limited else pools
        for queue in dict.fromkeys(order):
            for pool in budgets:
                keys += [self.procs[queue], self.keys.parked(queue, pool)]
                args.append(f"1:{pool}")
        for queue in order:
            keys.append(self.procs[queue])
            for priority in PRIORITY_ORDER:
                keys += [self.keys.aside(queue, priority, pool) for pool in sources]
                keys.append(queue_key(queue, priority))
                keys += [self.keys.aside(queue, priority, pool) for pool in pools]
            args.append(f"q:{len(PRIORITY_ORDER)}")
        flat = await self._take(keys=keys, args=args)
        if flat[-1]:
            self.set_aside += int(flat[-1])
            log.info(
                "jobs set aside: their pools had no room and they blocked a queue that mixes pools",
                extra={"action": "set_aside", "jobs": int(flat[-1]), "queues": list(dict.fromkeys(order))},
            )
        out = []
        for i in range(0, len(flat) - 1, 3):
            source, raw = as_str(flat[i]), as_str(flat[i + 1])
            for_pool = as_str(flat[i + 2]) or None
            out.append(Taken(f"{source}\n{raw}", source, raw, self._queue_of.get(source), for_pool))
        return out

    async def held(self) -> list[Taken]:
        """What our processing lists still hold: empty between passes unless one did not finish."""
        pipe = self.redis.pipeline(transaction=False)
        for proc in self.procs.values():
            pipe.lrange(proc, 0, -1)
        out = []
        for elements in await pipe.execute():
            for element in elements:
                source, _, raw = as_str(element).partition("\n")
                out.append(Taken(f"{source}\n{raw}", source, raw, self._queue_of.get(source)))
        return out

    async def settle(self, s: Settlement) -> None:
        """Apply ``s``: one script per queue on a cluster (one slot each), one in all on one Redis; a script
        applies its operations atomically, as MULTI/EXEC did (see ``SETTLE`` for why not MULTI)."""
        ops, dead = self._commands(s)
        if self.cluster:
            if dead:
                # The dead-letter list is in another slot: written first, so a crash in between leaves a job
                # in both (dead-lettered again when swept back), never in neither.
                await self.redis.rpush(self.keys.dead, *dead)
            merged = list(ops.items())
        else:
            letters = [("rpush", self.keys.dead, letter) for letter in dead]
            merged = [(self.queues[0], [c for v in ops.values() for c in v] + letters)]
        for queue, commands in merged:
            if not commands:  # most passes settle nothing: no round trip for it
                continue
            keys: dict[str, int] = {}  # each key once, numbered from 1 as Lua's KEYS
            args: list[Any] = []
            for command, key, value in commands:
                args += [command, keys.setdefault(key, len(keys) + 1), value]
            await self._settle(keys=list(keys), args=args)
            if self.wait_replicas and (s.park or s.back or s.dead):
                await self.fence(queue, strict=False)

    def _commands(self, s: Settlement) -> tuple[dict[str, list[tuple[str, str, Any]]], list[str]]:
        """``s`` as commands per queue (command, key, value) and the dead letters to push."""
        ops: dict[str, list[tuple[str, str, Any]]] = {}

        def on(element: str, *commands: tuple[str, str, Any]) -> None:
            queue = self.queue_of(element.partition("\n")[0]) or self.queues[0]
            ops.setdefault(queue, []).append(("lrem", self.procs[queue], _b(element)))
            ops[queue].extend(commands)

        for el in s.ack:
            on(el)
        # Jobs taken from a parked list go back to its head (LPUSH in reverse keeps their order); jobs newly
        # parked go to its tail, behind those parked before them: a pool's parked jobs keep their order.
        for el, pool, body in reversed(s.park):
            if el.startswith(self._parked_key(el, pool) + "\n"):
                on(el, ("lpush", self._parked_key(el, pool), body))
        for el, pool, body in s.park:
            if not el.startswith(self._parked_key(el, pool) + "\n"):
                on(el, ("rpush", self._parked_key(el, pool), body))
        for el, body, of in reversed(s.back):
            source = el.partition("\n")[0]
            aside = self._aside_of(source, of)
            if aside is None:
                on(el, ("lpush", source, body))
            else:  # a take serves that list first, and took this job only while it was empty
                on(el, ("lpushx", aside, body), ("lpushelse", source, body))
        now = datetime.now(UTC).isoformat()
        # json.dumps writes bytes that were not UTF-8 (kept as surrogate escapes) as \udcXX escapes
        dead = [json.dumps({"raw": raw, "reason": why, "queue": q, "at": now}) for _, raw, q, why in s.dead]
        for el, *_ in s.dead:
            on(el)
        for old, new in s.restamp:
            queue = self.queue_of(old.partition("\n")[0]) or self.queues[0]
            on(old, ("rpush", self.procs[queue], new))
        return ops, dead

    def _aside_of(self, source: str, pool: str | None) -> str | None:
        """The set-aside list of ``pool`` for the priority list ``source`` (None: not a priority list)."""
        queue = self._queue_of.get(source)
        if pool is None or queue is None:
            return None
        for priority in PRIORITY_ORDER:
            if queue_key(queue, priority) == source:
                return self.keys.aside(queue, priority, pool)
        return None

    def _parked_key(self, element: str, pool: str) -> str:
        return self.keys.parked(self.queue_of(element.partition("\n")[0]) or self.queues[0], pool)

    async def fence(self, queue: str, *, strict: bool = True) -> None:
        """Wait until REDIS_WAIT_REPLICAS replicas hold what was written to ``queue``'s slot so far: a write
        there and WAIT on the same connection (replication keeps the master's order). ``strict``: raise
        NotReplicated when too few answer in time; else log it (the write itself is done)."""
        key = self.keys.fence(queue)
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(key, self.dispatcher_id, ex=60)
        pipe.execute_command(
            "WAIT", self.wait_replicas, self.wait_timeout_ms, **wait_options(self.redis, key)
        )
        try:
            acked = int((await pipe.execute())[1])
        except (RedisError, RedisClusterException):
            await refresh_slots_async(self.redis)  # a failover: WAIT must go to the slot's new master
            raise
        if acked >= self.wait_replicas:
            return
        if strict:
            raise NotReplicated(f"only {acked} of {self.wait_replicas} replicas acknowledged")
        log.warning(
            "a hand-off is not yet on enough replicas",
            extra={"action": "wait_replicas", "queue": queue, "acked": acked, "wanted": self.wait_replicas},
        )

    async def requeue(self, jobs: list[tuple[str, str]]) -> None:
        """Push (list key, job json) at the head of their lists: retries whose backoff is over, first due
        first (pushed in reverse keeps their order at the head). One script per slot on a cluster; then,
        with REDIS_WAIT_REPLICAS, a fence: the database may mark them queued only once replicas hold them."""
        if not jobs:
            return
        groups: dict[int, list[tuple[str, str]]] = {}
        for key, body in jobs:
            slot = key_slot(key.encode()) if self.cluster else 0
            groups.setdefault(slot, []).append((key, body))
        for group in groups.values():
            lists = [k for k, _ in group]
            await self.redis.eval(REQUEUE, len(lists), *lists, *(b for _, b in group))
            if self.wait_replicas:
                await self.fence(self._queue_of_list(lists[0]))

    def _queue_of_list(self, key: str) -> str:
        """The queue whose list ``key`` is (any queue's, not only ours): for the fence's slot."""
        queue = self.queue_of(key)
        if queue is not None:
            return queue
        for suffix in (":high", ":low"):
            if key.startswith("{") and key.endswith("}" + suffix):
                return key[1 : -len(suffix) - 1]
            if key.endswith(suffix):  # a queue with its own {tag}
                return key[: -len(suffix)]
        return key

    async def wake_others(self, what: str) -> None:
        await self.redis.publish(self.keys.wake, what)

    async def depths(self) -> dict[str, int]:
        pipe = self.redis.pipeline(transaction=False)
        names = [queue_key(q, p) for q in self.queues for p in PRIORITY_ORDER]
        for name in names:
            pipe.llen(name)
        pipe.llen(self.keys.dead)
        counts = await pipe.execute()
        return dict(zip([*names, self.keys.dead], (int(c) for c in counts), strict=True))


def _lrem_push(pipe: Any, proc: str, element: str, key: str, body: str, *, head: bool) -> None:
    pipe.lrem(proc, 1, _b(element))
    if head:
        pipe.lpush(key, body)
    else:
        pipe.rpush(key, body)


def _b(element: str) -> str:
    """The exact bytes of a processing-list element read through ``_s`` (redis-py takes bytes as well as
    str where its stubs say str)."""
    return cast(str, element.encode("utf-8", "surrogateescape"))
