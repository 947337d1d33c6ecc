"""The end of the demo: the seed's GPU-load table (as it stood mid-run), jobs finished per GPU with what the
simulated GPUs themselves saw, and throughput and latency from the tasks table."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from demo.db import SEED_LOAD, Timing
from demo.watch import Snapshot
from simgpu.config import ServiceTime


def mean_service(spec: str) -> float:
    st = ServiceTime.parse(spec)
    if st.kind == "uniform":
        return (st.a + st.b) / 2
    if st.kind == "lognormal":
        return math.exp(st.a + st.b**2 / 2)
    return st.a  # fixed, exp


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: the smallest value with at least p% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]


def load_table(snap: Snapshot | None, slots: int) -> Group:
    """The seed's query as it answered at the busiest moment of the run (at the end it returns no rows)."""
    when = f" ({snap.at:.1f} s in, {snap.finished} jobs finished by then)" if snap is not None else ""
    table = Table()
    table.add_column("gpu_id")
    table.add_column("active_tasks", justify="right")
    table.add_column(f"of {slots} slots")
    for gpu_id, active in snap.rows if snap is not None else []:
        table.add_row(gpu_id, str(active), "■" * active + "□" * max(slots - active, 0))
    return Group(Text(f"GPU load mid-run{when}", style="bold"), Text(SEED_LOAD, style="dim"), table)


def finished_table(rows: list[tuple[str, int]], fleet: dict[str, Any]) -> Table:
    """Finished per GPU (database) beside what each simulated GPU counted itself: requests, the most jobs
    it ever ran at once, and how often a request came while all its slots were busy."""
    table = Table(title="Jobs per GPU", title_justify="left", title_style="bold")
    table.add_column("gpu_id")
    table.add_column("finished", justify="right")
    table.add_column("received", justify="right")
    table.add_column("peak / slots", justify="right")
    table.add_column("oversubscribed", justify="right")
    gpus = fleet["gpus"]
    for gpu_id, finished in rows:
        g = gpus.get(gpu_id, {})
        table.add_row(
            gpu_id,
            str(finished),
            str(g.get("received", "?")),
            f"{g.get('max_in_flight', '?')} / {g.get('slots', '?')}",
            str(g.get("oversubscriptions", "?")),
        )
    table.add_row("total", str(sum(n for _, n in rows)), str(fleet["totals"]["received"]), "", "")
    return table


def _seconds(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds()


def figures(timings: list[Timing], slots_total: int, service: str) -> Table:
    table = Table(title="Throughput and latency (tasks table)", title_justify="left", title_style="bold")
    table.add_column("figure")
    table.add_column("value", justify="right")
    if not timings:
        table.add_row("finished jobs", "0")
        return table
    first = min(t.enqueued for t in timings)
    last = max(t.finished for t in timings)
    span = max(_seconds(first, last), 1e-6)
    mean = mean_service(service)
    table.add_row("finished jobs", str(len(timings)))
    table.add_row("first enqueue → last finish", f"{span:.2f} s")
    table.add_row("throughput", f"{len(timings) / span:.0f} jobs/s")
    if mean > 0:
        table.add_row(f"  ideal for {slots_total} slots x {service}", f"{slots_total / mean:.0f} jobs/s")
    busy = sum(_seconds(t.started, t.finished) for t in timings)
    start = min(t.started for t in timings)
    utilisation = busy / (slots_total * max(_seconds(start, last), 1e-6))
    table.add_row("slot utilisation (busy / slots x span)", f"{utilisation:.0%}")
    for label, pairs in (
        ("enqueue → finish", [(t.enqueued, t.finished) for t in timings]),
        ("  waiting (enqueue → start)", [(t.enqueued, t.started) for t in timings]),
        ("  running (start → finish)", [(t.started, t.finished) for t in timings]),
    ):
        values = [_seconds(a, b) * 1000 for a, b in pairs]
        table.add_row(f"{label} p50 / p99", f"{percentile(values, 50):.0f} / {percentile(values, 99):.0f} ms")
    return table
