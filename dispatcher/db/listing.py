"""``GET /tasks`` and ``gpuq task list``: the tasks table filtered, newest first, one page at a time.

Pages are keyset-paginated on ``(created_at, task_id)``: the cursor is the last row's key, so a page costs
the same however deep it is and rows inserted meanwhile neither repeat nor shift later pages (an OFFSET
would do both). ``idx_tasks_created_at`` is that key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, or_, select

from dispatcher.db.engine import iso, naive_utc
from dispatcher.db.schema import tasks
from dispatcher.states import TaskState

MAX_LIMIT = 500
DEFAULT_LIMIT = 50

_COLUMNS = (
    tasks.c.task_id,
    tasks.c.state,
    tasks.c.type,
    tasks.c.queue,
    tasks.c.pool,
    tasks.c.priority,
    tasks.c.gpu_id,
    tasks.c.slot_index,
    tasks.c.attempt,
    tasks.c.run_after,
    tasks.c.created_at,
    tasks.c.started_at,
    tasks.c.finished_at,
    tasks.c.error,
)


class BadFilter(ValueError):
    """A filter or cursor the caller got wrong; the message says which."""


@dataclass(frozen=True, slots=True)
class TaskFilter:
    states: tuple[str, ...] = ()
    queue: str | None = None
    type: str | None = None
    gpu_id: str | None = None
    since: datetime | None = None  # naive UTC; created at or after


def parse_states(text: str | None) -> tuple[str, ...]:
    """``queued,retrying`` -> both; an unknown name is refused rather than matching nothing."""
    if not text:
        return ()
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    known = {s.value for s in TaskState}
    wrong = [n for n in names if n not in known]
    if wrong:
        raise BadFilter(f"state: unknown {', '.join(wrong)} (one of {', '.join(sorted(known))})")
    return names


def since_utc(value: datetime) -> datetime:
    """``since`` as the database holds times (naive UTC). A time whose UTC falls outside the years 1-9999
    (``0001-01-01T00:00:00+01:00``) is before or after every task: the earliest or latest time there is."""
    try:
        return naive_utc(value)
    except OverflowError:
        return datetime.min if value.year == 1 else datetime.max


#: A cursor: the last row's key, ``<created_at in microseconds since 1970 (UTC)>.<task_id, UTF-8, in hex>``.
#: Every string this pattern matches is a place in the keyset ("older than this"), so the API's document says
#: exactly which cursors the server takes; 17 digits reach the year 5138, 1,020 bytes hold 255 characters.
CURSOR_PATTERN = r"^[0-9]{1,17}\.([0-9a-f]{2}){1,1020}$"
_CURSOR = re.compile(CURSOR_PATTERN)
_EPOCH = datetime(1970, 1, 1)
_MICROSECOND = timedelta(microseconds=1)


def encode_cursor(created_at: datetime, task_id: str) -> str:
    return f"{(created_at - _EPOCH) // _MICROSECOND}.{task_id.encode().hex()}"


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    if not _CURSOR.fullmatch(cursor):
        raise BadFilter("cursor: not a cursor from an earlier page (next_cursor)")
    micros, _, hex_id = cursor.partition(".")
    # bytes that are not UTF-8 never came from a page; replaced, they still name a place in the keyset
    return _EPOCH + int(micros) * _MICROSECOND, bytes.fromhex(hex_id).decode("utf-8", "replace")


def list_tasks(
    conn: Connection, *, where: TaskFilter, limit: int = DEFAULT_LIMIT, cursor: str | None = None
) -> dict[str, Any]:
    """One page, newest first: ``{"tasks": [...], "next_cursor": str | None}`` (None on the last page)."""
    limit = max(1, min(limit, MAX_LIMIT))
    conds: list[ColumnElement[bool]] = []
    if where.states:
        conds.append(tasks.c.state.in_(where.states))
    for column, value in (
        (tasks.c.queue, where.queue),
        (tasks.c.type, where.type),
        (tasks.c.gpu_id, where.gpu_id),
    ):
        if value is not None:
            conds.append(column == value)
    if where.since is not None:
        conds.append(tasks.c.created_at >= where.since)
    if cursor:
        at, task_id = decode_cursor(cursor)
        conds.append(or_(tasks.c.created_at < at, and_(tasks.c.created_at == at, tasks.c.task_id < task_id)))
    rows = conn.execute(
        select(*_COLUMNS)
        .where(*conds)
        .order_by(tasks.c.created_at.desc(), tasks.c.task_id.desc())
        .limit(limit + 1)
    ).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "tasks": [
            {
                "task_id": r.task_id,
                "state": r.state,
                "type": r.type,
                "queue": r.queue,
                "pool": r.pool,
                "priority": r.priority,
                "gpu_id": r.gpu_id,
                "slot_index": r.slot_index,
                "attempts": r.attempt,
                "run_after": iso(r.run_after),
                "created_at": iso(r.created_at),
                "started_at": iso(r.started_at),
                "finished_at": iso(r.finished_at),
                "error": r.error,
            }
            for r in rows
        ],
        "next_cursor": encode_cursor(rows[-1].created_at, rows[-1].task_id) if more else None,
    }
