"""``GET /tasks``: list and filter tasks, a page at a time (SPEC §6 auth: ``API_TOKEN``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query

from dispatcher.db.listing import DEFAULT_LIMIT, MAX_LIMIT, BadFilter, TaskFilter, list_tasks, parse_states
from dispatcher.routes import D, api_auth

router = APIRouter()


def naive_utc(value: datetime | None) -> datetime | None:
    """The database holds naive UTC: an aware time is converted, a naive one taken as UTC."""
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(UTC).replace(tzinfo=None)


@router.get("/tasks", dependencies=[Depends(api_auth)])
async def tasks(
    d: D,
    *,
    state: Annotated[str | None, Query(description="A state, or several separated by commas.")] = None,
    queue: str | None = None,
    type: Annotated[str | None, Query(description="Task type.")] = None,
    gpu_id: str | None = None,
    since: Annotated[datetime | None, Query(description="Created at or after (ISO 8601).")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page.")] = None,
) -> dict[str, Any]:
    """Tasks newest first; ``next_cursor`` is null on the last page."""
    try:
        where = TaskFilter(parse_states(state), queue, type, gpu_id, naive_utc(since))
        page: dict[str, Any] = await d.db(list_tasks, where=where, limit=limit, cursor=cursor)
    except BadFilter as exc:
        raise HTTPException(422, str(exc)) from None
    return page
