"""``GET /tasks`` (list and filter tasks, a page at a time) and ``GET /tasks/{id}/events`` (a task's state
changes as Server-Sent Events). Both need ``API_TOKEN`` like every ``/tasks`` route."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from dispatcher.db.listing import (
    CURSOR_PATTERN,
    DEFAULT_LIMIT,
    MAX_LIMIT,
    BadFilter,
    TaskFilter,
    list_tasks,
    parse_states,
    since_utc,
)
from dispatcher.db.reads import get_task
from dispatcher.errors import BadInput, NotFound, TooMany, responses
from dispatcher.http.routes import D, H, api_auth, find_task
from dispatcher.queues.event_hub import RETRY_AFTER_SECONDS, HubFull
from dispatcher.queues.task_events import FINAL_EVENTS
from dispatcher.states import TaskState

router = APIRouter()

#: Seconds of silence after which a stream sends a keep-alive comment and looks at the database again.
QUIET_SECONDS = 10.0

_STATE = "|".join(s.value for s in TaskState)
#: ``state``: one state or several separated by commas. The document says exactly what the server takes (the
#: patterns are checked here rather than by FastAPI, whose refusal would quote the pattern instead of naming
#: the state or cursor that is wrong).
STATES_PATTERN = f"^(({_STATE})(,({_STATE}))*)?$"


@router.get("/tasks", dependencies=[Depends(api_auth)])
async def tasks(
    d: D,
    *,
    state: Annotated[
        str | None,
        Query(
            description="A state, or several separated by commas.",
            json_schema_extra={"pattern": STATES_PATTERN},
        ),
    ] = None,
    queue: str | None = None,
    type: Annotated[str | None, Query(description="Task type.")] = None,
    gpu_id: str | None = None,
    since: Annotated[datetime | None, Query(description="Created at or after (ISO 8601).")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: Annotated[
        str | None,
        Query(description="next_cursor of the previous page.", json_schema_extra={"pattern": CURSOR_PATTERN}),
    ] = None,
) -> dict[str, Any]:
    """Tasks newest first; ``next_cursor`` is null on the last page."""
    try:
        states = parse_states(state)
        if state is not None and not re.fullmatch(STATES_PATTERN, state):
            raise BadFilter(f"state: {state!r} is not states separated by commas (no spaces, none empty)")
        where = TaskFilter(states, queue, type, gpu_id, since_utc(since) if since is not None else None)
        page: dict[str, Any] = await d.db(list_tasks, where=where, limit=limit, cursor=cursor)
    except BadFilter as exc:
        field, _, msg = str(exc).partition(": ")
        errors = [{"loc": ["query", field], "msg": msg, "type": "value_error"}]
        raise BadInput(str(exc), errors=errors) from None
    return page


def sse(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data, default=str) + b"\n\n"


#: The event a task's state was reached by, where its name differs.
_EVENT_OF_STATE = {"processing": "dispatched"}


def _said_already(state: dict[str, Any], ev: dict[str, Any]) -> bool:
    """Is the first event of a stream the change its ``state`` event showed already? Events go out after
    their commit, so one can reach a stream that subscribed before the task was read, though the read saw
    its change: 'state: scheduled' then 'scheduled' (a flaky CI run of test_events_stream_from_another_
    dispatcher). Same name, and the same attempt where both say one."""
    name = _EVENT_OF_STATE.get(str(state.get("state")), state.get("state"))
    attempts = (state.get("attempt"), ev.get("attempt"))
    return bool(ev.get("event") == name and (None in attempts or attempts[0] == attempts[1]))


@router.get(
    "/tasks/{task_id}/events",
    dependencies=[Depends(api_auth)],
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}},
        **responses(NotFound, TooMany, e429="EVENT_LISTENERS_MAX streams and waits are open"),
    },
)
async def task_events(task_id: str, d: D, hub: H) -> StreamingResponse:
    """First ``event: state`` (the task as GET /tasks/{id} shows it), then each change as it happens
    (``dispatched``, ``heartbeat``, ``retrying``, ``queued``, ``scheduled``, ``finished``, ``failed``,
    ``cancelled``); the stream ends with the task."""
    stack = AsyncExitStack()
    try:
        events = await stack.enter_async_context(hub.listen(task_id))
    except HubFull as exc:
        raise TooMany(f"{exc}; try again later", retry_after=RETRY_AFTER_SECONDS) from None
    try:
        found = await find_task(d, task_id)  # still waiting in Redis: first events "scheduled", "dispatched"
    except BaseException:
        await stack.aclose()
        raise
    if found is None:
        await stack.aclose()
        raise NotFound(f"unknown task {task_id!r} (not yet taken by a dispatcher, or never enqueued)")

    async def stream() -> AsyncIterator[bytes]:
        async with stack:
            yield sse("state", found)
            if found["state"] in FINAL_EVENTS:
                return
            said: dict[str, Any] | None = found
            while True:
                ev = await events.next(QUIET_SECONDS)
                if ev is not None:
                    if said is not None and _said_already(said, ev):
                        said = None
                        continue
                    said = None
                    yield sse(ev["event"], ev)
                    if ev["event"] in FINAL_EVENTS:
                        return
                    continue
                # Quiet: an operator's cancel or an event lost while Redis was away shows in the database.
                now = await d.db(get_task, task_id=task_id)
                if now is not None and now["state"] in FINAL_EVENTS:
                    yield sse("state", now)
                    return
                yield b": keep-alive\n\n"

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
