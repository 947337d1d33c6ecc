"""Read-only views for the HTTP API and the CLI."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from dispatcher.db.schema import attempts, tasks


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() + "Z" if value is not None else None


def get_task(conn: Connection, *, task_id: str) -> dict[str, Any] | None:
    row = conn.execute(select(tasks).where(tasks.c.task_id == task_id)).first()
    if row is None:
        return None
    history = conn.execute(
        select(attempts).where(attempts.c.task_id == task_id).order_by(attempts.c.attempt)
    ).all()
    return {
        "task_id": row.task_id,
        "state": row.state,
        "type": row.type,
        "queue": row.queue,
        "pool": row.pool,
        "priority": row.priority,
        "gpu_id": row.gpu_id,
        "slot_index": row.slot_index,
        "attempts": row.attempt,
        "max_attempts": row.max_attempts,
        "run_after": _iso(row.run_after),
        "enqueued_at": _iso(row.enqueued_at),
        "created_at": _iso(row.created_at),
        "started_at": _iso(row.started_at),
        "finished_at": _iso(row.finished_at),
        "updated_at": _iso(row.updated_at),
        "error": row.error,
        "result": json.loads(row.result) if row.result else None,
        "data": json.loads(row.data) if row.data else None,
        "history": [
            {
                "attempt": h.attempt,
                "gpu_id": h.gpu_id,
                "slot_index": h.slot_index,
                "started_at": _iso(h.started_at),
                "ended_at": _iso(h.ended_at),
                "outcome": h.outcome,
                "error": h.error,
            }
            for h in history
        ],
    }
