"""Helpers shared by the fault tests: memory, log reading, deliveries beyond attempts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from tests.dispatcher.harness import DispatcherProc


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak since start) of a process, in KiB, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def full_log(d: DispatcherProc) -> str:
    return d.log_path.read_text(errors="replace")


def ran_beyond_attempts(engine: Engine, stats: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Tasks the GPUs received more often than the attempts the database gave them: a job run twice
    without a reason. Empty when every delivery was an attempt of its own."""
    received = Counter(job["task_id"] for job in stats["jobs"])
    with engine.connect() as conn:
        attempts = dict(conn.exec_driver_sql("SELECT task_id, attempt FROM tasks").all())
    return {t: (n, int(attempts.get(t, 0))) for t, n in received.items() if n > int(attempts.get(t, 0))}
