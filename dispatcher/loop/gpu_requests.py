"""Requests to GPU services and what their answers mean for the attempt (SPEC §4), for the Dispatcher.

A 2xx accepts the job (the callback ends it), a 2xx with a status ends it at once, 400/413/422 fail the task,
other 4xx and 501 (a wrong URL, token or method: the GPU's fault) send the job back to wait without using an
attempt, 5xx/408/429/refused fail the attempt (retried), no answer leaves it to the lease. Failures count
towards taking the GPU out of rotation; the first success after them resets the count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from dispatcher.db.dispatch import DispatchResult, Placed
from dispatcher.db.gpus import record_failure, record_success
from dispatcher.eager import start_now
from dispatcher.errors import TRANSIENT
from dispatcher.gpus.gpu_client import Answer, Verdict
from dispatcher.gpus.pull import is_pull
from dispatcher.gpus.same_service import shown_url
from dispatcher.gpus.tokens import make_token
from dispatcher.loop.agents import AgentHub
from dispatcher.loop.attempt_ends import AttemptEnds
from dispatcher.loop.runtime import Runtime
from dispatcher.queues.dead_letters import dead_letter
from dispatcher.queues.intake import Settlement
from dispatcher.states import Outcome

#: Refusals of the POST itself (wrong method, a redirect not followed: one that would turn it into a GET,
#: leave the URL's origin or loop): a GET probe cannot tell whether they are fixed. (A probe that followed a
#: 307 to another origin put such a GPU back every few seconds, each time refusing the job again: a retest.)
HELD_REFUSALS = frozenset({*range(300, 400), 405, 501})

log = logging.getLogger("gpuq.dispatcher")

#: Recent (task, attempt) pairs this process sent: enough to cover a lost commit answer being retried
#: (seconds), small enough not to grow the process (~2.5 MB at 10,000; 100,000 cost 25 MB in the soak).
_SENT_MEMORY = 10_000

_VERDICT_OUTCOME = {
    Verdict.FINISHED: Outcome.FINISHED,
    Verdict.FAILED: Outcome.FAILED,
    Verdict.RETRY: Outcome.FAILED_RETRY,
    Verdict.REFUSED: Outcome.GPU_REFUSED,
    # Out of file descriptors here: an attempt used for it failed jobs that never reached a GPU (three in a
    # row at MAX_ATTEMPTS=3). Given back, as for a GPU that refused; the job waits its backoff, then again.
    Verdict.NOT_SENT: Outcome.NOT_SENT,
}


class GpuRequests:
    def __init__(self, rt: Runtime, ends: AttemptEnds, agents: AgentHub) -> None:
        self.rt = rt
        self.ends = ends
        self.agents = agents
        self._suspect: set[str] = set()  # GPUs this process counted failures for
        self._sent: OrderedDict[tuple[str, int], str] = OrderedDict()  # -> the attempt's pool
        self._posting: set[tuple[str, int]] = set()  # requests not answered yet
        self._not_sent = 0  # requests this process could not send (its own limits), for a rate-limited log
        # Is this task a standby this process holds and has not sent? (standbys.py; wired by core.py)
        self.standby_of_ours: Callable[[str], bool] = lambda _task_id: False
        # Told when this process takes a GPU out of rotation (standbys.py: nothing more is sent there).
        self.gpu_down: Callable[[str], None] = lambda _gpu_id: None

    def posting(self, task_id: str, attempt: int) -> bool:
        """Is this process's request for the attempt still on its way? (A cancel must not overtake it.)"""
        return (task_id, attempt) in self._posting

    def sent(self, p: Placed) -> bool:
        """Did this process send this attempt? (A lost commit answer brings a job back as our own.) One our
        id held when this process started is taken as sent: an earlier life of the id sent it, or no one
        can know (``SentJournal.inherit``)."""
        pair = (p.job.task_id, p.attempt)
        return pair in self._sent or pair in self.rt.journal.inherited

    def pool_of(self, task_id: str, attempt: int) -> str | None:
        """The pool of an attempt this process sent lately (None: not known here: another dispatcher's, a
        pull GPU's, or too old). A hand-off takes candidates only for the pools its ends free."""
        return self._sent.get((task_id, attempt))

    def fire(self, p: Placed, started: float) -> None:
        """Send the job to its GPU in the background (an owned task) and act on the answer. A pull GPU's
        agent fetches it instead (``dispatcher/loop/agents.py``): its long polls are woken."""
        if is_pull(p.url):
            self.agents.placed(p)
            return
        body = {
            "task_id": p.job.task_id,
            "type": p.job.type,
            "data": p.job.data,
            "attempt": p.attempt,
            "callback_url": self.rt.settings.public_callback_url,
            "callback_token": make_token(self.rt.settings.secret, p.job.task_id, p.attempt),
        }
        self.rt.metrics.dispatched.labels(p.pool).inc()
        self._sent[(p.job.task_id, p.attempt)] = p.pool
        if len(self._sent) > _SENT_MEMORY:
            self._sent.popitem(last=False)
        self._posting.add((p.job.task_id, p.attempt))
        self.rt.journal.record(p.job.task_id, p.attempt)  # before any byte goes out (sent_journal.py)
        # The request's bytes go out now, not a turn or two of the loop later (eager.py); its answer is
        # judged by a task of its own, as before.
        request = start_now(self.rt.gpu.send(p.url, body), name=f"request:{p.job.task_id}:{p.attempt}")
        self.rt.spawn(self._send(p, request, started), f"post:{p.job.task_id}:{p.attempt}")

    def start(self, result: DispatchResult, element_of: dict[int, str], started: float) -> Settlement:
        """Fire the requests of the jobs placed (and of our own attempts recorded but not sent), publish
        their events; the settlement acknowledges every job the database decided on."""
        # By identity: two copies of one task in a batch are two elements of the processing list.
        # Not a standby of ours either: promoted and not yet sent, it is ours to send, once (standbys.py).
        unsent = [p for p in result.mine if not self.sent(p) and not self.standby_of_ours(p.job.task_id)]
        done = Settlement(
            ack=[element_of[id(p.job)] for p in result.placed + result.mine]
            + [element_of[id(j)] for j, _ in result.dropped]
            + [element_of[id(j)] for j in result.deferred],
        )
        for job, why in result.refused:  # a new job reusing a known task id
            dead_letter(done, self.rt.metrics, element_of[id(job)], job.queue, why, reused=True)
        for job, why in result.invalid:  # a "retry" of a task never recorded, with an id the rules refuse
            dead_letter(done, self.rt.metrics, element_of[id(job)], job.queue, why)
        for job, why in result.dropped:
            log.info(
                "dropped a copy of a known task", extra={"action": "drop", "task_id": job.task_id, "why": why}
            )
        for placed in result.placed + unsent:
            self.fire(placed, started)
            self.rt.events.publish(
                "dispatched",
                placed.job.task_id,
                attempt=placed.attempt,
                gpu_id=placed.gpu_id,
                slot_index=placed.slot_index,
                pool=placed.pool,
            )
        for job in result.deferred:
            self.rt.events.publish("scheduled", job.task_id, run_after=job.not_before)
        return done

    async def _send(self, p: Placed, request: asyncio.Task[Answer], started: float) -> None:
        self.rt.metrics.dispatch_latency.observe(time.perf_counter() - started)
        try:
            answer = await request
        except Exception as exc:  # a bug, not the network (send maps those): the lease decides
            log.exception("GPU request failed", extra={"action": "gpu_request", "task_id": p.job.task_id})
            answer = Answer(Verdict.UNKNOWN, error=f"the request failed: {type(exc).__name__}: {exc}")
        finally:
            self._posting.discard((p.job.task_id, p.attempt))
        self.rt.metrics.gpu_requests.labels(answer.verdict.value).inc()
        try:
            await self._judge(p, answer)
        except TRANSIENT as exc:  # the lease will settle this attempt
            log.error(
                "could not record a GPU answer",
                extra={"action": "gpu_answer", "task_id": p.job.task_id, "error": str(exc)},
            )
        except Exception as exc:
            # Something in this answer no rule foresaw: end the attempt (freeing its slot) with what
            # happened, rather than leave the slot to the lease and the real error to a log line.
            log.exception(
                "could not record a GPU answer", extra={"action": "gpu_answer", "task_id": p.job.task_id}
            )
            with contextlib.suppress(Exception):
                await self.ends.end_attempt(
                    p.job.task_id,
                    p.attempt,
                    Outcome.FAILED_RETRY,
                    error=f"the dispatcher could not record the GPU's answer: {type(exc).__name__}: {exc}",
                )

    async def _judge(self, p: Placed, answer: Answer) -> None:
        if answer.unhealthy:
            self._suspect.add(p.gpu_id)
            s = self.rt.settings
            went_down = await self.rt.db(
                record_failure,
                gpu_id=p.gpu_id,
                error=answer.error or "",
                threshold=s.gpu_failure_threshold,
                probe_seconds=s.gpu_probe_seconds,
                now=self.rt.now(),
                hold=answer.status in HELD_REFUSALS,
            )
            if went_down:
                self.gpu_down(p.gpu_id)
            if went_down and answer.status in HELD_REFUSALS:
                log.error(
                    f"GPU taken out of rotation until an operator checks its URL: it refuses POST "
                    f"({answer.status}), which a probe cannot see; then `gpuq gpu activate {p.gpu_id}` "
                    f"or `gpuq gpu set {p.gpu_id} --url URL`",
                    extra=_about(p, answer, "gpu_down", held=True),
                )
            elif went_down:
                log.error(
                    "GPU taken out of rotation",
                    extra=_about(p, answer, "gpu_down"),
                )
        elif p.gpu_id in self._suspect and answer.status is not None:  # the GPU answered (not our EMFILE)
            self._suspect.discard(p.gpu_id)
            await self.rt.db(record_success, gpu_id=p.gpu_id)
        if answer.verdict is Verdict.NOT_SENT:
            self._not_sent += 1
            if self._not_sent % 100 == 1:  # one line per hundred: an exhausted process must not flood its log
                log.error(
                    "GPU request not sent: this process is out of file descriptors (raise `ulimit -n`, or"
                    " lower HTTP_MAX_CONNECTIONS); the job waits again without using an attempt",
                    extra=_about(p, answer, "gpu_not_sent", not_sent=self._not_sent),
                )
        if answer.verdict is Verdict.REFUSED:
            log.warning(
                "GPU refused the request (check its URL and BEARER_TOKEN); the job waits again",
                extra=_about(p, answer, "gpu_refused", url=shown_url(p.url)),
            )
        outcome = _VERDICT_OUTCOME.get(answer.verdict)
        if outcome is None:
            if answer.verdict is Verdict.UNKNOWN:
                log.warning(
                    "GPU request got no answer; the lease decides",
                    extra=_about(p, answer, "gpu_no_answer"),
                )
            return
        # A status in a 2xx body is the GPU's report, like a callback: a later identical callback is a repeat.
        reported = None
        if answer.status is not None and 200 <= answer.status < 300:
            reported = "failed_retry" if outcome is Outcome.FAILED_RETRY else outcome.value
        await self.ends.end_attempt(
            p.job.task_id, p.attempt, outcome, result=answer.result, error=answer.error, reported=reported
        )


def _about(p: Placed, answer: Answer, action: str, **more: Any) -> dict[str, Any]:
    """The log fields of a line about a GPU's answer to ``p``: which task, which GPU, what went wrong."""
    return {"action": action, "task_id": p.job.task_id, "gpu_id": p.gpu_id, "error": answer.error, **more}
