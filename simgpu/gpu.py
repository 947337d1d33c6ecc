"""One simulated GPU: its slot accounting, its counters, and the life of each job it accepts.

A job holds a slot from its arrival until its final callback starts going out (sync mode: until its answer
is written), or until the simulator gives up on it (lost_callback: at the end of its service time). The slot
is not held until the callback's *answer*: the dispatcher frees the slot as soon as it has the callback and
may send the next job before answering (SPEC §4), and counting that job as a fifth would accuse a correct
dispatcher. Callbacks still waiting for their answer are counted apart, as ``callbacks_pending``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Coroutine
from typing import Any

import orjson

from simgpu.callbacks import CallbackClient
from simgpu.config import Behaviour
from simgpu.jobs import Job
from simgpu.plan import Plan, draw_plan

log = logging.getLogger("simgpu")


class GpuSim:
    def __init__(
        self, name: str, url: str, behaviour: Behaviour, rng: random.Random, callbacks: CallbackClient
    ) -> None:
        self.name = name
        self.url = url
        self.behaviour = behaviour
        self.rng = rng
        self.in_flight = 0
        self.callbacks_pending = 0
        self._callbacks = callbacks
        self._waiting: set[Job] = set()  # accepted (async), service time not over yet
        self.holding: set[Job] = set()  # jobs holding a slot (async and sync)
        self._sync: set[Job] = set()  # sync mode: being answered
        self._unstarted: set[Job] = set()  # took a slot, answer delayed (slow_answer), not started yet
        self._stopped: set[Job] = set()  # of those, cancelled before they started: they never will
        self._tasks: set[asyncio.Task[Any]] = set()
        self.pull = False  # a pull agent (agent.py): a heartbeat answered 409 stops the job
        self._warmed = False  # its callback connections opened (CallbackClient.expect)
        self.reset()

    def reset(self) -> None:
        """Zero the counters; jobs at work keep their slots."""
        self.received = 0
        self.max_in_flight = self.in_flight
        self.oversubscriptions = 0
        # Each oversubscription: the arriving request and the jobs that held every slot (who to blame).
        self.overlaps: list[dict[str, Any]] = []
        self.answers: Counter[str] = Counter()
        self.callbacks_sent: Counter[str] = Counter()
        self.callbacks_answered: Counter[str] = Counter()
        self.cancels: Counter[str] = Counter()

    @property
    def down(self) -> bool:
        return self.behaviour.down

    def arrive(self, raw: bytes) -> None:
        """Count a request; one that finds every slot held is an oversubscription, logged with the holders."""
        self.received += 1
        if self.in_flight >= self.behaviour.slots:
            self.oversubscriptions += 1
            task_id, attempt = _peek(raw)
            self.overlaps.append(
                {
                    "gpu": self.name,
                    "task_id": task_id,
                    "attempt": attempt,
                    "at": time.time(),
                    "holding": sorted(
                        (
                            {"task_id": j.task_id, "attempt": j.attempt, "received_at": j.received_at}
                            for j in self.holding
                        ),
                        key=lambda h: h["received_at"],
                    ),
                }
            )

    def draw(self, job: Job) -> Plan:
        """Draw the job's fate; a job that will be accepted takes its slot now."""
        job.plan = plan = draw_plan(self.behaviour.faults, self.rng)
        if plan.refusal is None:
            job.service_time = self.behaviour.service_time.sample(self.rng)
            self.in_flight += 1
            self.holding.add(job)
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._unstarted.add(job)
        return plan

    def may_start(self, job: Job) -> bool:
        """After the answer's delay: False when the job was cancelled meanwhile (it gave its slot back)."""
        self._unstarted.discard(job)
        if job in self._stopped:
            self._stopped.discard(job)
            return False
        return True

    def start(self, job: Job) -> None:
        """Async mode: the job works for its service time, then calls back."""
        loop = asyncio.get_running_loop()
        if not self._warmed:  # its first job: its slots' callback connections, opened now
            self._warmed = True
            self._callbacks.expect(job.callback_url, self.behaviour.slots)
        self._waiting.add(job)
        job.timer = loop.call_later(job.service_time, self._finish, job)
        if job.plan.heartbeat:
            job.beat = loop.call_later(job.plan.heartbeat, self._beat, job)

    def cancel(self, task_id: str, attempt: int) -> str:
        """``POST <gpu>/cancel``: stop the job now and give its slot back, with no callback.

        "stopped" (it ran here and no longer does), "not_running" (finished, or never seen), "busy" (a
        synchronous job: it cannot be stopped and its answer ends it)."""
        for job in self._waiting:
            if job.task_id == task_id and job.attempt == attempt:
                self._waiting.discard(job)
                for handle in (job.timer, job.beat):
                    if handle is not None:
                        handle.cancel()
                job.timer = job.beat = None
                self.in_flight -= 1
                self.holding.discard(job)
                job.released_at = time.time()
                self.cancels["stopped"] += 1
                return "stopped"
        if any(j.task_id == task_id and j.attempt == attempt for j in self._sync):
            self.cancels["busy"] += 1
            return "busy"
        for job in self._unstarted:
            # Taken (it holds a slot) but its answer is still delayed: "not running" would free the slot at
            # the dispatcher while the job is about to start, so it is stopped before it starts.
            if job.task_id == task_id and job.attempt == attempt and job not in self._stopped:
                self._stopped.add(job)
                self.in_flight -= 1
                self.holding.discard(job)
                job.released_at = time.time()
                self.cancels["stopped"] += 1
                return "stopped"
        self.cancels["not_running"] += 1
        return "not_running"

    async def run_sync(self, job: Job) -> dict[str, Any]:
        self._sync.add(job)
        try:
            if job.service_time:
                await asyncio.sleep(job.service_time)
        finally:
            self._sync.discard(job)
            self.in_flight -= 1
            self.holding.discard(job)
            job.released_at = time.time()
            job.answered_mono = time.monotonic()
        return job.result_body()

    def _finish(self, job: Job) -> None:
        self._waiting.discard(job)
        if job.beat is not None:
            job.beat.cancel()
        job.timer = job.beat = None  # the handles refer back to the job; the job log keeps jobs a long time
        self.in_flight -= 1
        self.holding.discard(job)
        job.released_at = time.time()
        if job.plan.outcome != "lost":
            body = orjson.dumps(job.result_body())
            self._spawn(self._deliver(job, body), f"callback {job.task_id}")

    async def _deliver(self, job: Job, body: bytes) -> None:
        job.callback_sent_at = time.time()
        job.callback_sent_mono = time.monotonic()
        status = "finished" if job.plan.outcome == "finished" else "failed"
        job.callback_status = await self._call(job, body, status)
        job.callback_answered_mono = time.monotonic()
        if job.plan.duplicate:
            job.duplicate_sent_mono = time.monotonic()
            job.duplicate_status = await self._call(job, body, status)

    def _beat(self, job: Job) -> None:
        job.beat = asyncio.get_running_loop().call_later(job.plan.heartbeat, self._beat, job)
        body = orjson.dumps({"task_id": job.task_id, "status": "running"})
        # A lost heartbeat costs nothing (the next one follows), so it is not retried.
        self._spawn(self._call(job, body, "running", retry=False), f"heartbeat {job.task_id}")

    async def _call(self, job: Job, body: bytes, status: str, *, retry: bool = True) -> int | None:
        self.callbacks_sent[status] += 1
        self.callbacks_pending += 1
        try:
            answer = await self._callbacks.send(job.callback_url, job.callback_token, body, retry=retry)
        finally:
            self.callbacks_pending -= 1
        self.callbacks_answered["no_answer" if answer is None else str(answer)] += 1
        if (
            self.pull
            and status == "running"
            and answer == 409
            and self.cancel(job.task_id, job.attempt) == "stopped"
        ):
            # How a pull GPU learns of a cancel (SPEC §9): stop, then say so with a final callback, which the
            # dispatcher answers 409 and takes as the confirmation that frees the slot.
            body = orjson.dumps({"task_id": job.task_id, "status": "failed", "error": "cancelled"})
            self._spawn(self._call(job, body, "failed"), f"stopped {job.task_id}")
        if answer is None or answer >= 300:
            log.debug(
                "callback not applied",
                extra={"action": "callback", "gpu": self.name, "task_id": job.task_id, "answer": answer},
            )
        return answer

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "callback task failed",
                exc_info=task.exception(),
                extra={"action": "callback_crashed", "gpu": self.name, "task": task.get_name()},
            )

    async def abandon(self) -> None:
        """At shutdown: drop the jobs still at work and the callbacks still going out."""
        for job in self._waiting:
            for handle in (job.timer, job.beat):
                if handle is not None:
                    handle.cancel()
        self._waiting.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def snapshot(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "down": self.down,
            "slots": self.behaviour.slots,
            "received": self.received,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "oversubscriptions": self.oversubscriptions,
            "overlaps": list(self.overlaps),
            "answers": dict(self.answers),
            "callbacks_sent": dict(self.callbacks_sent),
            "callbacks_answered": dict(self.callbacks_answered),
            "callbacks_pending": self.callbacks_pending,
            "cancels": dict(self.cancels),
            "config": self.behaviour.describe(),
        }


def _peek(raw: bytes) -> tuple[str | None, int | None]:
    """The task id and attempt of a request body, as far as it has them (it is parsed properly later)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    task_id, attempt = body.get("task_id"), body.get("attempt")
    return (
        task_id if isinstance(task_id, str) else None,
        attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
    )
