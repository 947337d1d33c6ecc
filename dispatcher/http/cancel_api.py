"""``POST /tasks/{task_id}/cancel``: the HTTP twin of ``gpuq task cancel`` (SPEC §4; needs ``API_TOKEN``).

The task is ``cancelled`` at once; a running one keeps its slot until its GPU confirms the stop (see
``dispatcher/loop/cancels.py``): the dispatcher that started the attempt is woken to send
``POST <GPU url>/cancel``.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from dispatcher.db.attempts import cancel_task
from dispatcher.errors import TRANSIENT, Conflict, NotFound, responses
from dispatcher.http.routes import D, api_auth, find_task
from dispatcher.loop.cancels import WAKE_CANCEL

log = logging.getLogger("gpuq.http")
router = APIRouter()


class CancelOut(BaseModel):
    task_id: str
    state: str
    applied: bool
    #: True while the GPU has not confirmed the stop: the slot stays busy until it does (or the lease ends).
    slot_held: bool


@router.post(
    "/tasks/{task_id}/cancel",
    dependencies=[Depends(api_auth)],
    response_model=CancelOut,
    responses=responses(NotFound, Conflict, e409="the task already finished or failed"),
)
async def cancel(task_id: str, d: D) -> CancelOut:
    """Cancel a task. One not yet taken from Redis is marked so that it never runs; a repeated cancel is
    answered 200 with ``applied: false``. An id neither recorded nor waiting is 404: marking it would
    silently drop a job submitted later under that id (a typo would swallow it)."""
    if await find_task(d, task_id) is None:
        raise NotFound(
            f"unknown task {task_id!r} (not in the database nor waiting in Redis): nothing to cancel"
        )
    fin = await d.db(cancel_task, task_id=task_id, now=d.now(), backoff=d.backoff)
    if fin.code != "applied" and fin.state != "cancelled":
        raise Conflict(f"task {task_id!r} is already {fin.state}: nothing to cancel")
    if fin.code == "applied":
        d.events.publish("cancelled", task_id, by="api")
    if fin.held:
        d.cancel_wanted()  # when this process started the attempt, or answered its partials
        try:
            await d.intake.wake_others(WAKE_CANCEL)  # when another one did
        except TRANSIENT as exc:  # their periodic look finds it
            log.warning("could not publish a cancel", extra={"action": "wake", "error": str(exc)})
    return CancelOut(task_id=task_id, state="cancelled", applied=fin.code == "applied", slot_held=fin.held)
