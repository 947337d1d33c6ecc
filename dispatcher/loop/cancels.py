"""Cancel that reaches the GPU (SPEC §4): ask the GPU to stop a cancelled attempt, free the slot when it has.

A cancel (``gpuq task cancel``, ``POST /tasks/{id}/cancel``) ends the task for the user at once, in the
database, from any process; the slot stays held (a *pending cancel*, see ``db/cancels.py``). The dispatcher
that started the attempt then sends ``POST <GPU url>/cancel`` with the Bearer header and
``{"task_id", "attempt"}``. Only that dispatcher sends, and only once its own request for the attempt has
been answered, so the cancel can never overtake the job on its way to the GPU (a GPU that got the cancel
first would say "not running" and then start the job on a slot given away). When that dispatcher is gone
(its heartbeat key expired: killed, or stopped), every live dispatcher sends the cancels it left: its
requests died with it, and a GPU takes a repeated cancel as one.
A GPU whose service takes cancels elsewhere is registered with that URL (``gpuq gpu set NAME --cancel-url
URL``); the cancel goes there instead of ``<GPU url>/cancel``.

The slot is given back (``AttemptEnds.confirm_stop`` → ``release_cancelled``) on a 2xx answer to the cancel,
on any final report for the attempt (callback or answer to the job's request) or at lease expiry. A cancel
that fails (refused, 5xx, no answer) is tried again after 0.5, 1, 2, 4, ... s, then every 30 s until one
of these comes (a GPU that restarts should not keep a slot for the whole lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from urllib.parse import urlsplit, urlunsplit

from dispatcher.db.cancels import PendingCancel, pending_cancels
from dispatcher.errors import TRANSIENT
from dispatcher.gpus.pull import is_pull
from dispatcher.loop.attempt_ends import AttemptEnds
from dispatcher.loop.gpu_requests import GpuRequests
from dispatcher.loop.runtime import Runtime

log = logging.getLogger("gpuq.cancels")

#: Pause before each further try of a cancel that failed; the last one repeats until the slot is freed.
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
#: Look for pending cancels at least this often (a wake-up from another process may be lost).
SCAN_SECONDS = 5.0
#: Look again this soon when a cancel waited for its job's request (or its standby) to go out first.
HELD_BACK_SECONDS = 0.2
#: The wake-up message (on the dispatchers' wake channel) that says "a running task was cancelled".
WAKE_CANCEL = "cancel"


def cancel_url(url: str) -> str:
    """``<GPU url>/cancel``: the path gets ``/cancel`` appended, the query string is kept."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/cancel"))


class CancelSender:
    """Sends this dispatcher's pending cancels to their GPUs (a side task of the Dispatcher)."""

    def __init__(self, rt: Runtime, requests: GpuRequests, ends: AttemptEnds) -> None:
        self.rt = rt
        self.requests = requests
        self.ends = ends
        self._kick = asyncio.Event()
        self._failures: dict[tuple[str, int], tuple[int, float]] = {}  # (tries failed, next try at)
        self._sending: set[tuple[str, int]] = set()

    def kick(self) -> None:
        """Look for pending cancels now (a task was cancelled, or a retry is due)."""
        self._kick.set()

    async def run(self) -> None:
        while not self.rt.stopping.is_set():
            self._kick.clear()
            try:
                await self.scan()
            except TRANSIENT as exc:
                log.warning("could not look for cancels", extra={"action": "cancel_scan", "error": str(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), SCAN_SECONDS)

    async def scan(self) -> None:
        pending = await self.rt.db(pending_cancels)
        keys = {(p.task_id, p.attempt) for p in pending}
        for gone in set(self._failures) - keys:  # settled meanwhile (a callback, the lease)
            del self._failures[gone]
        now = time.monotonic()
        mine = self.rt.settings.dispatcher_id
        alive: dict[str, bool] = {}
        held_back = False
        for p in pending:
            key = (p.task_id, p.attempt)
            if key in self._sending:
                continue
            # The job's own request is still out (its answer comes first), or it is a standby of ours not
            # sent yet: promoted by another process and cancelled, it was POSTed after the GPU had said "not
            # running" to its cancel and its slot was given to the next job (an outside trial: 6 jobs on a
            # 4-slot GPU). The standby's owner sends it or, seeing it cancelled, frees its slot unsent.
            if self.requests.posting(p.task_id, p.attempt) or self.requests.standby_of_ours(p.task_id):
                held_back = True
                continue
            if is_pull(p.url):
                continue  # nothing reaches a pull GPU: its agent learns from the 409 to its next heartbeat
            owner = p.dispatcher_id
            if owner is not None and owner != mine:
                if owner not in alive:
                    alive[owner] = await self.rt.intake.is_alive(owner)
                if alive[owner]:
                    continue  # its own dispatcher sends it, after its request for the job
            failed, due = self._failures.get(key, (0, 0.0))
            if now < due:
                continue
            self._sending.add(key)
            self.rt.spawn(self._send(p, failed), f"cancel:{p.task_id}:{p.attempt}")
        if held_back:  # its answer comes soon: look again then, not at the next SCAN_SECONDS
            asyncio.get_running_loop().call_later(HELD_BACK_SECONDS, self.kick)

    async def _send(self, p: PendingCancel, failed: int) -> None:
        key = (p.task_id, p.attempt)
        try:
            body = {"task_id": p.task_id, "attempt": p.attempt}
            ok, detail = await self.rt.gpu.cancel(p.cancel_url or cancel_url(p.url), body)
            self.rt.metrics.gpu_requests.labels("cancel_ok" if ok else "cancel_failed").inc()
            if ok:
                self._failures.pop(key, None)
                await self.ends.confirm_stop(p.task_id, p.attempt, why=detail)
                return
            delay = RETRY_DELAYS[min(failed, len(RETRY_DELAYS) - 1)]
            self._failures[key] = (failed + 1, time.monotonic() + delay)
            log.warning(
                "cancel not confirmed; will retry",
                extra={
                    "action": "cancel_failed",
                    "task_id": p.task_id,
                    "attempt": p.attempt,
                    "gpu_id": p.gpu_id,
                    "detail": detail,
                    "retry_in_seconds": delay,
                },
            )
            asyncio.get_running_loop().call_later(delay, self.kick)
        except TRANSIENT as exc:  # the answer is lost to us; the next scan sends the cancel again
            log.warning("could not record a cancel", extra={"action": "cancel_failed", "error": str(exc)})
        finally:
            self._sending.discard(key)
