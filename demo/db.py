"""What the demo reads from the dispatcher's SQLite file while it runs and at the end.

A plain engine, not ``dispatcher.db.engine.make_engine``: that one takes the write lock at BEGIN (BEGIN
IMMEDIATE, how embedded mode serialises writers); these reads need none. SQLite in WAL mode lets them run
beside the dispatcher's writes without blocking it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import create_engine, select, text

from dispatcher.db.schema import tasks

#: The seed system's GPU-load query, verbatim.
SEED_LOAD = "SELECT gpu_id, COUNT(*) AS active_tasks FROM tasks WHERE state = 'processing' GROUP BY gpu_id"
FINISHED_PER_GPU = (
    "SELECT gpu_id, COUNT(*) AS finished FROM tasks WHERE state = 'finished' GROUP BY gpu_id ORDER BY gpu_id"
)
STATES = "SELECT state, COUNT(*) FROM tasks GROUP BY state"


@dataclass(frozen=True, slots=True)
class Timing:
    enqueued: datetime
    started: datetime
    finished: datetime


class DemoDb:
    def __init__(self, path: Path) -> None:
        self.engine = create_engine(f"sqlite:///{path}")

    def _rows(self, sql: str) -> list[tuple[str, int]]:
        with self.engine.connect() as conn:
            return [(str(a), int(b)) for a, b in conn.execute(text(sql)).all()]

    def seed_load(self) -> list[tuple[str, int]]:
        return sorted(self._rows(SEED_LOAD))

    def finished_per_gpu(self) -> list[tuple[str, int]]:
        return self._rows(FINISHED_PER_GPU)

    def states(self) -> Counter[str]:
        return Counter(dict(self._rows(STATES)))

    def timings(self) -> list[Timing]:
        """Finished tasks' timestamps, parsed by the table's column types (SQLite stores them as text)."""
        query = select(tasks.c.enqueued_at, tasks.c.started_at, tasks.c.finished_at).where(
            tasks.c.state == "finished"
        )
        with self.engine.connect() as conn:
            return [Timing(*row) for row in conn.execute(query) if None not in row]

    def close(self) -> None:
        self.engine.dispose()
