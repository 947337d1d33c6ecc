"""Read-only views for the HTTP API and the CLI."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, select

from dispatcher.db.engine import iso
from dispatcher.db.schema import attempts, tasks


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
        "run_after": iso(row.run_after),
        "enqueued_at": iso(row.enqueued_at),
        "created_at": iso(row.created_at),
        "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at),
        "updated_at": iso(row.updated_at),
        "error": row.error,
        "result": json.loads(row.result) if row.result else None,
        "data": json.loads(row.data) if row.data else None,
        "history": [
            {
                "attempt": h.attempt,
                "gpu_id": h.gpu_id,
                "slot_index": h.slot_index,
                "started_at": iso(h.started_at),
                "ended_at": iso(h.ended_at),
                "outcome": h.outcome,
                "error": h.error,
            }
            for h in history
        ],
    }
