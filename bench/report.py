"""The results: one table (rich on stdout, Markdown in the summary file), the JSON file, the machine facts."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.procs import ROOT
from bench.workloads import TARGETS

Figures = dict[str, Any]  # {"gpuq": {"efficiency": {...}, "overhead": {...}}, "celery": {...}}


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line), "?"
    )
    mem_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line
    )
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(mem_kb / 1024**2, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "py_loop_ms": python_loop_ms(),
    }


def python_loop_ms(n: int = 1_000_000, tries: int = 5) -> float:
    """The machine's speed for Python code, as one number runs on different days can be compared by: the
    best of ``tries`` timings of an ``n``-step pure Python loop. The same "2-core machine" ran both systems
    about half as fast one afternoon as that morning (bench/RESULTS.md, 2026-11-30 18:10-18:35)."""
    best = math.inf
    for _ in range(tries):
        started = time.perf_counter()
        total = 0
        for i in range(n):
            total += i
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1)


#: The per-job CPU figures of a run (ms): the consumer (the first dispatcher, or the Celery worker), the
#: simulated fleet, the MariaDB and Redis servers (server-wide) and the driver enqueuing the jobs.
_CPU_PARTS = (
    "consumer_cpu_ms_per_job",
    "sim_cpu_ms_per_job",
    "mariadb_cpu_ms_per_job",
    "redis_cpu_ms_per_job",
    "driver_cpu_ms_per_job",
)


def cpu_per_job(run: dict[str, Any] | None) -> float | None:
    """CPU per job of every process measured in a run, ms (None: a figure is missing)."""
    if not run or any(not isinstance(run.get(k), (int, float)) for k in _CPU_PARTS):
        return None
    return float(sum(run[k] for k in _CPU_PARTS))


def cpu_ceiling(run: dict[str, Any] | None, cores: int | None = None) -> float | None:
    """The efficiency this machine's cores allow at the run's CPU per job, every core busy: the jobs/s the
    cores can pay for over the jobs/s the fleet takes (capacity / service time), at most 1. A run near its
    ceiling is bound by the machine's CPU, not by waiting; one far below it is bound by latency. The cores
    are those of the machine that ran it (recorded in the run), not of the one rendering the report."""
    total = cpu_per_job(run)
    cores = cores or int((run or {}).get("cores") or 0) or os.cpu_count() or 1
    if total is None or total <= 0 or not run or not run.get("service"):
        return None
    affordable = cores * 1000.0 / total
    return min(1.0, affordable / (float(run["capacity"]) / float(run["service"])))


def _git(*args: str) -> str | None:
    """``git args`` in the checkout; None where git or the checkout is missing."""
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def changed_files() -> list[str]:
    """Tracked files that differ from the commit: what was measured is the work tree, not only HEAD."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    return [] if out is None else [line[3:] for line in out.splitlines()]


def git_revision() -> str:
    head, dirty = _git("rev-parse", "--short", "HEAD"), _git("status", "--porcelain", "--untracked-files=no")
    if head is None or dirty is None:
        return "unknown"
    return head.strip() + ("+dirty" if dirty.strip() else "")


@dataclass(frozen=True)
class Row:
    label: str
    pick: Callable[[Figures], Any]  # from one system's runs
    target: str = ""
    ok: Callable[[Any], bool] | None = None
    fmt: str = "{:,.1f}"


def _at_most(label: str, pick: Callable[[Figures], Any], target: str, fmt: str) -> Row:
    """A row held to an upper bound of ``TARGETS``, its target column written from the same number."""
    limit = TARGETS[target]
    return Row(label, pick, f"≤ {limit:g}", lambda v: v <= limit, fmt)


def _at_least(label: str, pick: Callable[[Figures], Any], target: str, fmt: str) -> Row:
    """A row held to a lower bound of ``TARGETS``, its target column written from the same number."""
    limit = TARGETS[target]
    return Row(label, pick, f"≥ {limit:g}", lambda v: v >= limit, fmt)


def _get(workload: str, *path: str) -> Callable[[Figures], Any]:
    def pick(runs: Figures) -> Any:
        value: Any = runs.get(workload)
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    return pick


ROWS = [
    _at_most(
        "dispatch latency p50, ms",
        _get("efficiency", "dispatch_latency_ms", "p50"),
        "dispatch_p50_ms",
        "{:,.2f}",
    ),
    _at_most(
        "dispatch latency p99, ms",
        _get("efficiency", "dispatch_latency_ms", "p99"),
        "dispatch_p99_ms",
        "{:,.2f}",
    ),
    _at_most(
        "slot turnaround p50, ms", _get("efficiency", "turnaround_ms", "p50"), "turnaround_p50_ms", "{:,.2f}"
    ),
    _at_most(
        "slot turnaround p99, ms", _get("efficiency", "turnaround_ms", "p99"), "turnaround_p99_ms", "{:,.2f}"
    ),
    Row(
        "  turnaround p99 once settled (slots freed 1 s on: enqueue burst over)",
        _get("efficiency", "turnaround_settled_ms", "p99"),
        fmt="{:,.2f}",
    ),
    Row(
        "  turnarounds over 15 ms, of slots freed in the first second",
        _get("efficiency", "turnarounds_over_15ms", "first_s"),
        fmt="{:,}",
    ),
    Row(
        "  turnarounds over 15 ms, of slots freed later",
        _get("efficiency", "turnarounds_over_15ms", "settled"),
        fmt="{:,}",
    ),
    Row(
        "  turnaround p50, part 1: callback until recorded",
        _get("efficiency", "turnaround_split_ms", "callback_recorded", "p50"),
        fmt="{:,.2f}",
    ),
    Row(
        "  turnaround p50, part 2: then until next request (< 0: sent first)",
        _get("efficiency", "turnaround_split_ms", "then_next_request", "p50"),
        fmt="{:,.2f}",
    ),
    Row(
        "  next request sent before the callback was answered (standby), share",
        _get("efficiency", "sent_before_answer_share"),
        fmt="{:.2f}",
    ),
    _at_least(
        "efficiency (ideal / measured makespan)", _get("efficiency", "efficiency"), "efficiency", "{:.3f}"
    ),
    Row("makespan, s", _get("efficiency", "makespan_s"), fmt="{:,.2f}"),
    Row(
        "  CPU per job, every process measured (efficiency run), ms*",
        lambda r: cpu_per_job(r.get("efficiency")),
        fmt="{:,.2f}",
    ),
    Row(
        "  efficiency the cores allow at that CPU per job (all cores busy)",
        lambda r: cpu_ceiling(r.get("efficiency")),
        fmt="{:.3f}",
    ),
    Row(
        "  machine busy, % of all cores (efficiency run)",
        lambda r: _pct(_get("efficiency", "machine_busy")(r)),
        fmt="{:.0f}",
    ),
    _at_least(
        "short jobs (16 slots x 40 ms): efficiency", _get("short", "efficiency"), "short_efficiency", "{:.3f}"
    ),
    Row("  short jobs: slot turnaround p50, ms", _get("short", "turnaround_ms", "p50"), fmt="{:,.2f}"),
    _at_least(
        "three dispatchers, callbacks to one (16 x 40 ms): efficiency",
        _get("three", "efficiency"),
        "three_efficiency",
        "{:.3f}",
    ),
    Row("  three dispatchers: slot turnaround p50, ms", _get("three", "turnaround_ms", "p50"), fmt="{:,.2f}"),
    Row("pull agents (as the efficiency run): efficiency", _get("pull", "efficiency"), fmt="{:.3f}"),
    Row("  pull agents: slot turnaround p50, ms", _get("pull", "turnaround_ms", "p50"), fmt="{:,.2f}"),
    Row("  pull agents: slot turnaround p99, ms", _get("pull", "turnaround_ms", "p99"), fmt="{:,.2f}"),
    Row("pull agents, short jobs (16 x 40 ms): efficiency", _get("pull-short", "efficiency"), fmt="{:.3f}"),
    Row(
        "  pull agents, short jobs: turnaround p50, ms",
        _get("pull-short", "turnaround_ms", "p50"),
        fmt="{:,.2f}",
    ),
    _at_most(
        "database commits per job (efficiency run)",
        _get("efficiency", "db_commits_per_job"),
        "commits_per_job",
        "{:.2f}",
    ),
    Row(
        "  jobs started by a hand-off (efficiency run), share",
        _get("efficiency", "handoff_share"),
        fmt="{:.2f}",
    ),
    Row(
        "priority inversion: jobs started ahead of a later high-priority one",
        _get("efficiency", "priority_inversion_jobs"),
        fmt="{:d}",
    ),
    _at_least(
        "overhead-bound throughput, jobs/s", _get("overhead", "jobs_per_s"), "overhead_jobs_per_s", "{:,.0f}"
    ),
    Row(
        "  steady rate (10th-90th pct of completions), jobs/s",
        _get("overhead", "steady_jobs_per_s"),
        fmt="{:,.0f}",
    ),
    Row(
        "scale-out (1,024 slots x 4 s, 3 dispatchers): efficiency",
        _get("scaleout", "efficiency"),
        fmt="{:.3f}",
    ),
    Row("  scale-out: jobs/s", _get("scaleout", "jobs_per_s"), fmt="{:,.0f}"),
    Row("  scale-out: database commits per job", _get("scaleout", "db_commits_per_job"), fmt="{:.2f}"),
    Row(
        "  scale-out: dispatcher CPU, cores busy (first of three)",
        _get("scaleout", "consumer_cores"),
        fmt="{:,.2f}",
    ),
    Row(
        "oversubscriptions (all runs)",
        lambda r: sum(r[w]["oversubscriptions"] for w in r),
        "0",
        lambda v: v == 0,
        "{:d}",
    ),
    Row(
        "jobs run twice / not run (all runs)",
        lambda r: "/".join(str(x) for x in _twice_missing(r)),
        "0/0",
        lambda v: v == "0/0",
        "{}",
    ),
    Row(
        "consumer CPU per job, ms (overhead run)", _get("overhead", "consumer_cpu_ms_per_job"), fmt="{:,.2f}"
    ),
    Row("consumer CPU, cores busy (overhead run)", _get("overhead", "consumer_cores"), fmt="{:,.2f}"),
    Row("consumer peak RSS, MB (overhead run)", _get("overhead", "peak_rss_mb"), fmt="{:,.0f}"),
    Row("simulator CPU per job, ms (overhead run)", _get("overhead", "sim_cpu_ms_per_job"), fmt="{:,.2f}"),
    Row("MariaDB CPU per job, ms (overhead run)*", _get("overhead", "mariadb_cpu_ms_per_job"), fmt="{:,.2f}"),
    Row("Redis CPU per job, ms (overhead run)*", _get("overhead", "redis_cpu_ms_per_job"), fmt="{:,.2f}"),
    Row(
        "producer: jobs enqueued per s (overhead run)", _get("overhead", "producer_jobs_per_s"), fmt="{:,.0f}"
    ),
    Row(
        "machine busy, % of all cores (overhead run)",
        lambda r: _pct(_get("overhead", "machine_busy")(r)),
        fmt="{:.0f}",
    ),
    Row("load average 1 min at end (overhead run)", _get("overhead", "load_avg_1m"), fmt="{:.2f}"),
]


def _pct(value: Any) -> Any:
    return None if value is None else value * 100


def _twice_missing(runs: Figures) -> tuple[int, int]:
    twice = sum(r["duplicates"] for r in runs.values())
    missing = sum(r["jobs"] - r["completed"] for r in runs.values())
    return twice, missing


def _cell(row: Row, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return row.fmt.format(value)


def table_rows(figures: Figures) -> list[list[str]]:
    """[label, gpuq, celery, target, gpuq meets it]"""
    gpuq, celery = figures.get("gpuq", {}), figures.get("celery", {})
    rows = []
    for row in ROWS:
        ours = row.pick(gpuq) if gpuq else None
        theirs = row.pick(celery) if celery else None
        verdict = "" if row.ok is None or ours is None else ("yes" if row.ok(ours) else "NO")
        rows.append([row.label, _cell(row, ours), _cell(row, theirs), row.target, verdict])
    speedup = speedup_vs_celery(figures)
    if speedup is not None:
        ok = "yes" if speedup >= TARGETS["speedup_vs_celery"] else "NO"
        after = next(i for i, cells in enumerate(rows) if cells[0].startswith("  steady rate"))
        rows.insert(
            after + 1, ["gpuq / Celery, overhead-bound throughput", f"{speedup:.2f}x", "", "≥ 2.5x", ok]
        )
    return rows


def speedup_vs_celery(figures: Figures) -> float | None:
    try:
        return float(figures["gpuq"]["overhead"]["jobs_per_s"]) / float(
            figures["celery"]["overhead"]["jobs_per_s"]
        )
    except (KeyError, TypeError, ZeroDivisionError):
        return None


HEADERS = ["", "gpuq", "Celery", "target", "gpuq meets it"]
FOOTNOTE = "* server-wide: other users of the same Redis/MariaDB servers count too"


def print_table(console: Console, title: str, figures: Figures) -> None:
    table = Table(title=title, title_justify="left", caption=FOOTNOTE, caption_justify="left")
    for i, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for cells in table_rows(figures):
        style = "bold red" if cells[-1] == "NO" else None
        table.add_row(*cells, style=style)
    console.print(table)


def markdown(meta: dict[str, Any], figures: Figures) -> str:
    m = meta["machine"]
    lines = [
        f"Run {meta['date']} · `{meta['command']}` · gpuq {meta['git']}",
        "",
        f"Machine: {m['nproc']} cores ({m['cpu_model']}), {m['ram_gib']} GiB RAM, Linux {m['kernel']}, "
        f"Python {m['python']}; load average at start {meta['load_at_start']}"
        + (f"; a 1M-step Python loop: {m['py_loop_ms']} ms." if m.get("py_loop_ms") else "."),
        "",
        "| " + " | ".join(HEADERS) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + " |",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(figures)]
    lines += ["", FOOTNOTE]
    return "\n".join(lines) + "\n"
