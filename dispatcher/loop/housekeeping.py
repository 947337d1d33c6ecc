"""The dispatcher's periodic duties, each safe to run in every process at once (all conditional writes):

- heartbeat, and sweeping back the jobs of dispatchers whose heartbeat is gone;
- expiring leases: an attempt with no callback in time has failed, its slot is freed, the task retried;
- moving retries and scheduled tasks whose time has come back into Redis;
- probing GPUs that were taken out of rotation;
- reading each pool's slot count, which sizes its hand-off buffer (``ReadyBuffer.sized``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from datetime import timedelta

from dispatcher.db.agents_gone import take_back_unfetched_of
from dispatcher.db.attempts import expired_leases, slot_drift
from dispatcher.db.deferred import claim_due, mark_queued
from dispatcher.db.gpus import pool_slots, probe_result, probes_due
from dispatcher.errors import TRANSIENT
from dispatcher.loop.attempt_ends import AttemptEnds
from dispatcher.loop.recovery import recover
from dispatcher.loop.runtime import Runtime, SlotSignals
from dispatcher.queues.unserved import find_unserved, message
from dispatcher.states import Outcome
from producer.keys import queue_key

log = logging.getLogger("gpuq.housekeeping")

TICK_SECONDS = 0.25
#: Between heartbeats (the key lives HEARTBEAT_TTL_SECONDS of queues/presence.py, 10).
HEARTBEAT_SECONDS = 2.0
#: "GPU still down" is logged at most this often per GPU (probes go on every GPU_PROBE_SECONDS).
STILL_DOWN_EVERY_SECONDS = 60.0
#: A due task claimed for requeuing is due again after this if its claimer did not requeue it (it died, or
#: Redis refused the push): short for a retry to wait, and longer than a push takes unless Redis hangs (up
#: to EVENTS_WAIT_SECONDS plus the client's 10 s socket timeout). A push that outlasts the claim lets another
#: dispatcher claim and push too: a second "queued", and a second copy, dropped when taken.
REQUEUE_CLAIM_SECONDS = 10.0
#: How often queues no running dispatcher serves are looked for, and said at most (per queue).
UNSERVED_EVERY_SECONDS = 60.0
UNSERVED_SAID_EVERY_SECONDS = 600.0
#: The longest a requeue waits for its "queued" events to reach Redis before pushing the jobs anyway (a hung
#: Redis: events are best-effort, and the push waits out its own socket timeout).
EVENTS_WAIT_SECONDS = 1.0


class Housekeeping:
    def __init__(
        self,
        rt: Runtime,
        ends: AttemptEnds,
        signals: SlotSignals,
        sized: Callable[[Mapping[str, int]], None] | None = None,
    ) -> None:
        self.rt = rt
        self.ends = ends
        self.signals = signals
        self.sized = sized
        self._due: dict[str, float] = {}
        self._still_down_said: dict[str, float] = {}  # GPU -> when "still down" was last logged
        self._unserved_said: dict[str, float] = {}  # queue -> when "no dispatcher serves it" was last logged

    def _every(self, name: str, seconds: float) -> bool:
        now = time.monotonic()
        if now >= self._due.get(name, 0.0):
            self._due[name] = now + seconds
            return True
        return False

    async def run(self) -> None:
        beat = asyncio.create_task(self.beat(), name="heartbeat")
        try:
            await self._duties(beat)
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)

    async def beat(self) -> None:
        """The heartbeat in a task of its own, on its own Redis client: a slow duty (many leases to expire,
        a database that stalls) or a busy Redis pool never delays it past the key's TTL."""
        while not self.rt.stopping.is_set():
            try:
                await self.heartbeat()
            except TRANSIENT as exc:
                log.warning("heartbeat failed; will retry", extra={"action": "heartbeat", "error": str(exc)})
            self.rt.db_watch.look()  # here: the duties below may all be waiting for that database
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def _duties(self, beat: asyncio.Task[None]) -> None:
        while not self.rt.stopping.is_set():
            if beat.done():  # it never ends by itself: whatever ended it is fatal
                beat.result()
                raise RuntimeError("the heartbeat stopped")
            for name, seconds, duty in (
                ("sweep", 5.0, self.sweep),
                ("leases", 0.5, self.expire_leases),
                ("deferred", TICK_SECONDS, self.requeue_due),
                ("probes", 1.0, self.probe),
                ("drift", 30.0, self.check_drift),
                ("clock", 30.0, self.rt.sync_clock),
                ("pools", 5.0, self.read_pools),
                ("recovery", 5.0, self.recover),
                ("unserved", UNSERVED_EVERY_SECONDS, self.look_for_unserved),
            ):
                if not self._every(name, seconds):
                    continue
                try:
                    await duty()
                except TRANSIENT as exc:
                    log.warning("housekeeping failed; will retry", extra={"action": name, "error": str(exc)})
            await asyncio.sleep(TICK_SECONDS)

    async def recover(self) -> None:
        """Dispatchers on this machine that died since: what they recorded and never sent (recovery.py)."""
        if await recover(self.rt, self.rt.journal, starting=False):
            self.signals.slot_freed()

    async def read_pools(self) -> None:
        if self.sized is not None:
            self.sized(await self.rt.db(pool_slots))

    async def heartbeat(self) -> None:
        await self.rt.intake.heartbeat(self.rt.beat_redis)

    async def sweep(self) -> None:
        if await self.rt.intake.sweep_dead():
            self.signals.slot_freed()  # not a slot, but there is work: look now

    async def expire_leases(self) -> None:
        leases = await self.rt.db(expired_leases, now=self.rt.now())
        unfetched = await self.rt.db(take_back_unfetched_of, leases=leases) if leases else {}
        for task_id, attempt in leases:
            if (
                gpu := unfetched.get((task_id, attempt))
            ) is not None:  # its pull agent never fetched it: it waits again, no attempt used
                await self.ends.end_attempt(
                    task_id,
                    attempt,
                    Outcome.GPU_REFUSED,
                    error=f"pull GPU {gpu}: its agent did not fetch the job within TASK_TIMEOUT_SECONDS",
                )
                continue
            fin = await self.ends.end_attempt(
                task_id,
                attempt,
                Outcome.EXPIRED,
                error="no callback before the lease (TASK_TIMEOUT_SECONDS) ran out",
            )
            if fin.code == "applied":
                self.rt.metrics.lease_expiries.inc()
                log.warning(
                    "lease expired",
                    extra={
                        "action": "lease_expired",
                        "task_id": task_id,
                        "attempt": attempt,
                        "state": fin.state,
                    },
                )

    async def requeue_due(self) -> None:
        now = self.rt.now()
        jobs = await self.rt.db(claim_due, now=now, claim=timedelta(seconds=REQUEUE_CLAIM_SECONDS))
        if not jobs:
            return
        # "queued" before the job is in Redis: published after, it came behind the "dispatched" of a
        # dispatcher that placed the job at once (a fresh-clone CI run). Only the claimer says it (another
        # process that read the same due rows claimed none of them), behind the events this process
        # published before (a refusal's "retrying"; another process's may still be on its way), once per
        # claim if the push fails.
        await self.rt.events.publish_in_order(
            [("queued", j.task_id, {"attempt": j.attempt, "priority": j.priority.value}) for j in jobs],
            wait=EVENTS_WAIT_SECONDS,
        )
        # Redis first, then the database: a crash in between leaves a harmless extra copy, never none.
        await self.rt.intake.requeue([(queue_key(j.queue, j.priority), j.to_redis()) for j in jobs])
        await self.rt.db(mark_queued, jobs=jobs, now=self.rt.now())
        self.signals.slot_freed()

    async def probe(self) -> None:
        s = self.rt.settings
        for gpu_id, url in await self.rt.db(probes_due, now=self.rt.now()):
            ok, detail = await self.rt.gpu.probe(url)
            await self.rt.db(
                probe_result,
                gpu_id=gpu_id,
                ok=ok,
                error=detail,
                probe_seconds=s.gpu_probe_seconds,
                now=self.rt.now(),
            )
            if ok:
                self._still_down_said.pop(gpu_id, None)
                up = {"action": "gpu_up", "gpu_id": gpu_id, "detail": detail}
                log.info("GPU back in rotation", extra=up)
                self.signals.slot_freed()
                continue
            # A GPU down for an hour would say so every GPU_PROBE_SECONDS: once a minute is enough.
            now = time.monotonic()
            if now - self._still_down_said.get(gpu_id, -STILL_DOWN_EVERY_SECONDS) >= STILL_DOWN_EVERY_SECONDS:
                self._still_down_said[gpu_id] = now
                log.warning(
                    "GPU still down", extra={"action": "gpu_probe", "gpu_id": gpu_id, "detail": detail}
                )

    async def look_for_unserved(self) -> None:
        """Jobs in a queue no running dispatcher serves (unserved.py): a warning every 10 min per queue. A
        look that fails for a reason other than a store's is logged, never fatal: it only warns."""
        try:
            found = await find_unserved(self.rt.redis, self.rt.keys, self.rt.db)
        except TRANSIENT:
            raise
        except Exception:
            log.exception("the look for unserved queues failed", extra={"action": "unserved_queue"})
            return
        gauge, now = self.rt.metrics.unserved, time.monotonic()
        for queue in set(self._unserved_said) - {u.queue for u in found}:
            del self._unserved_said[queue]
            gauge.remove(queue)
        for u in found:
            gauge.labels(u.queue).set(u.waiting + u.deferred)
            if (
                now - self._unserved_said.get(u.queue, -UNSERVED_SAID_EVERY_SECONDS)
                < UNSERVED_SAID_EVERY_SECONDS
            ):
                continue
            self._unserved_said[u.queue] = now
            log.warning(
                message(u, self.rt.intake.queues),
                extra={
                    "action": "unserved_queue",
                    "queue": u.queue,
                    "waiting": u.waiting,
                    "deferred": u.deferred,
                },
            )

    async def check_drift(self) -> None:
        drift = await self.rt.db(slot_drift)
        if drift:
            log.error(
                "slots held by tasks that are not running", extra={"action": "drift", "slots": drift[:20]}
            )
