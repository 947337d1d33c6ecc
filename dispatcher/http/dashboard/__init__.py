"""The live dashboard: ``GET /`` is one self-contained HTML page (inline CSS and JS, nothing fetched from
elsewhere) that polls ``GET /api/overview`` every second and draws every GPU as a row of slots.

The page itself holds no data, so it is served without a token; ``/api/overview`` needs ``API_TOKEN`` like
``/gpus`` (the page takes it from ``?token=`` and sends it as a Bearer header). Each process computes the
overview at most once a second, however many browsers poll it.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from dispatcher.db.engine import utcnow
from dispatcher.db.overview import overview
from dispatcher.http.routes import D, api_auth
from dispatcher.queues.queue_view import Plan, pools_of, read_async

router = APIRouter()

_PAGE = files(__package__).joinpath("page.html").read_text(encoding="utf-8")
_MAX_AGE_SECONDS = 0.9


class _Cached:
    """The last overview and when it was made; one computation at a time."""

    def __init__(self) -> None:
        self.at = 0.0
        self.cost = 0.0  # seconds the last computation took
        self.value: dict[str, Any] | None = None
        self.lock = asyncio.Lock()


async def build_overview(d: D) -> dict[str, Any]:
    db = await d.db(overview, now=utcnow())
    plan = Plan(d.keys, d.settings.all_queues, pools_of(db["gpus"], d.settings.routes))
    queues = await read_async(d.redis, plan, d.handoffs.buffer.held())
    return {
        "now": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "dispatcher_id": d.settings.dispatcher_id,
        **db,
        **queues.to_json(),
    }


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(_PAGE, headers={"Cache-Control": "no-cache"})


@router.get("/api/overview", dependencies=[Depends(api_auth)])
async def api_overview(d: D, request: Request) -> dict[str, Any]:
    """GPUs with their slots, task counts, throughput per 10 s over 5 minutes, recent failures, queues."""
    state = request.app.state
    if not hasattr(state, "overview_cache"):
        state.overview_cache = _Cached()
    cached: _Cached = state.overview_cache
    async with cached.lock:
        # A fleet so busy that one overview takes long is asked for it less often, not piled up on.
        max_age = max(_MAX_AGE_SECONDS, 4 * cached.cost)
        if cached.value is None or time.monotonic() - cached.at >= max_age:
            started = time.monotonic()
            cached.value = await build_overview(d)
            cached.at = time.monotonic()
            cached.cost = cached.at - started
        return cached.value
