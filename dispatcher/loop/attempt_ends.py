"""Ending attempts (callbacks, GPU answers, leases, silent agents) and extending their leases.

``AttemptEnds`` is what every part that learns an attempt's fate calls (the HTTP callback too, as
``d.ends``); none reaches into the loop. Concurrent ends are committed together by the group commit
(``group_commit.py``), whose batch is the hand-off (``handoff.py``): the builder (``core.py``) connects
the two with ``hand_off_with``, the hand-off being built after the parts that end attempts.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import TYPE_CHECKING, Any

from dispatcher.db.attempts import Finish, extend_lease
from dispatcher.db.cancels import release_cancelled
from dispatcher.limits import encode_result
from dispatcher.loop.group_commit import GroupCommit
from dispatcher.loop.renewals import Renewals
from dispatcher.loop.runtime import Runtime, SlotSignals
from dispatcher.states import Outcome, TaskState

if TYPE_CHECKING:
    from dispatcher.loop.standbys import Standbys

log = logging.getLogger("gpuq.dispatcher")

EndMany = Callable[[list[dict[str, Any]]], Awaitable[list[Finish]]]


class AttemptEnds:
    def __init__(self, rt: Runtime, signals: SlotSignals) -> None:
        self.rt = rt
        self.signals = signals
        self.renewals = Renewals(min(rt.settings.task_timeout_seconds / 3, 5.0))
        self._end_many: EndMany | None = None
        self.standbys: Standbys | None = None  # wired by the builder (core.py) when standby jobs are on
        self.finisher = GroupCommit(
            self._batch, lambda coro: rt.spawn(coro, "finish-batches"), depth=rt.hot.workers
        )

    def hand_off_with(self, end_many: EndMany) -> None:
        """The group commit's batch: ``HandOffs.end_many`` (ends the attempts, starts buffered jobs)."""
        self._end_many = end_many

    async def _batch(self, items: list[dict[str, Any]]) -> list[Finish]:
        if self._end_many is None:
            raise RuntimeError("AttemptEnds used before hand_off_with")
        return await self._end_many(items)

    async def end_attempt(
        self,
        task_id: str,
        attempt: int,
        outcome: Outcome,
        *,
        result: Any = None,
        error: str | None = None,
        reported: str | None = None,
    ) -> Finish:
        """End an attempt; concurrent calls are committed together (see GroupCommit). A result the database
        cannot take (see limits.py) fails the attempt with the reason instead.

        With standby jobs (standbys.py): the standby bound to this attempt's slot is sent first when the GPU
        says the attempt is over (a lease sweep does not: the GPU may still be at it), and the standby's own
        reports wait until this end, a confirmed cancel's free included, is over. An end of a standby met
        before its promotion is kept and applied once it is promoted (a synchronous answer is not sent
        again, as a callback answered 503 is)."""
        standbys, early = self.standbys, None
        if standbys is not None:
            await standbys.wait_promoted(task_id)
            if outcome is not Outcome.EXPIRED:
                early = standbys.on_end(task_id, attempt)
        try:
            fin = await self._end(task_id, attempt, outcome, result=result, error=error, reported=reported)
        finally:
            if early is not None and standbys is not None:
                standbys.ended(early)
        if standbys is not None and fin.code == "stale" and fin.state == TaskState.STANDBY:

            def again() -> Coroutine[Any, Any, Finish]:
                return self.end_attempt(
                    task_id, attempt, outcome, result=result, error=error, reported=reported
                )

            standbys.defer_end(task_id, again)
        return fin

    async def _end(
        self,
        task_id: str,
        attempt: int,
        outcome: Outcome,
        *,
        result: Any,
        error: str | None,
        reported: str | None,
    ) -> Finish:
        rt = self.rt
        encoded, problem = encode_result(result, rt.limits.result_bytes)
        if problem is not None:
            log.warning(
                "result refused", extra={"action": "result_refused", "task_id": task_id, "error": problem}
            )
            outcome, result, error = Outcome.FAILED, None, problem
        item = {
            "task_id": task_id,
            "attempt": attempt,
            "outcome": outcome,
            "result": encoded,
            "error": error,
            "reported": reported,
        }
        fin = await self.finisher.submit(item)
        if fin.code == "applied":
            self.renewals.forget(task_id)
            rt.metrics.attempts.labels(outcome.value).inc()
            rt.events.publish(
                fin.state or outcome.value,
                task_id,
                attempt=attempt,
                outcome=outcome.value,
                result=result,
                error=error,
            )
            if fin.state == "failed":  # final: `gpuq task retry --state failed` brings such tasks back
                log.warning(
                    "task failed",
                    extra={
                        "action": "task_failed",
                        "task_id": task_id,
                        "attempt": attempt,
                        "outcome": outcome.value,
                        "error": error,
                    },
                )
            log.debug(
                "attempt ended",
                extra={
                    "action": "attempt_end",
                    "task_id": task_id,
                    "attempt": attempt,
                    "outcome": outcome.value,
                    "state": fin.state,
                },
            )
        elif fin.code == "stale" and fin.state == TaskState.CANCELLED:
            # A final report (or the lease) for a cancelled attempt: the GPU no longer runs it. The lease's
            # word was read before this end; it still counts only if no heartbeat renewed it since.
            await self.confirm_stop(
                task_id,
                attempt,
                why=f"attempt ended: {outcome.value}",
                lease_ended_by=rt.now() if outcome is Outcome.EXPIRED else None,
            )
        return fin

    async def confirm_stop(
        self, task_id: str, attempt: int, *, why: str, lease_ended_by: datetime | None = None
    ) -> bool:
        """The GPU no longer runs this cancelled attempt: give its slot back (see dispatcher/loop/cancels.py).
        No hand-off here: the freed slot is refilled by the loop, which slot_freed wakes. ``lease_ended_by``:
        the stop is only inferred from the lease (see ``release_cancelled``)."""
        freed = await self.rt.db(
            release_cancelled,
            task_id=task_id,
            attempt=attempt,
            lease_ended_by=lease_ended_by,
            now=self.rt.now(),
            lease_seconds=self.rt.settings.task_timeout_seconds,
        )
        if freed:
            log.info(
                "cancel confirmed; slot freed",
                extra={"action": "cancel_confirmed", "task_id": task_id, "attempt": attempt, "why": why},
            )
            self.signals.slot_freed()
        return freed

    async def heartbeat(
        self, task_id: str, attempt: int, progress: dict[str, Any] | None = None, partial: Any = None
    ) -> Finish:
        """A ``running`` callback: extend the lease; pass its progress and its ``partial`` (output so far)
        on to the task's event subscribers, in the order they came, without storing them. A partial whose
        attempt's lease this process extended lately costs no transaction (see renewals.py)."""
        rt = self.rt
        if self.standbys is not None:
            await self.standbys.wait_promoted(task_id)
        if partial is not None and self.renewals.fresh(task_id, attempt):
            fin = Finish("applied", TaskState.PROCESSING.value)
        else:
            fin = await rt.db(
                extend_lease,
                task_id=task_id,
                attempt=attempt,
                lease_seconds=rt.settings.task_timeout_seconds,
                now=rt.now(),
            )
            if fin.code == "applied":
                self.renewals.extended(task_id, attempt)
        if fin.code == "applied":
            rt.events.publish("heartbeat", task_id, attempt=attempt, progress=progress or {})
            if partial is not None:  # before the answer: the GPU's next partial may reach another process
                await rt.events.publish_now("partial", task_id, attempt=attempt, partial=partial)
        return fin
