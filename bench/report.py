"""The results: one table (rich on stdout, Markdown in the summary file), the JSON file, the machine facts."""

from __future__ import annotations

import math
import os
import platform
import subprocess
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
    }


def changed_files() -> list[str]:
    """Tracked files that differ from the commit: what was measured is the work tree, not only HEAD."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line[3:] for line in out.splitlines()]


def git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


@dataclass(frozen=True)
class Row:
    label: str
    pick: Callable[[Figures], Any]  # from one system's runs
    target: str = ""
    ok: Callable[[Any], bool] | None = None
    fmt: str = "{:,.1f}"


def _get(workload: str, *path: str) -> Callable[[Figures], Any]:
    def pick(runs: Figures) -> Any:
        value: Any = runs.get(workload)
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    return pick


ROWS = [
    Row(
        "dispatch latency p50, ms",
        _get("efficiency", "dispatch_latency_ms", "p50"),
        "≤ 3",
        lambda v: v <= TARGETS["dispatch_p50_ms"],
        "{:,.2f}",
    ),
    Row(
        "dispatch latency p99, ms",
        _get("efficiency", "dispatch_latency_ms", "p99"),
        "≤ 15",
        lambda v: v <= TARGETS["dispatch_p99_ms"],
        "{:,.2f}",
    ),
    Row(
        "slot turnaround p50, ms",
        _get("efficiency", "turnaround_ms", "p50"),
        "≤ 3",
        lambda v: v <= TARGETS["turnaround_p50_ms"],
        "{:,.2f}",
    ),
    Row(
        "slot turnaround p99, ms",
        _get("efficiency", "turnaround_ms", "p99"),
        "≤ 15",
        lambda v: v <= TARGETS["turnaround_p99_ms"],
        "{:,.2f}",
    ),
    Row(
        "  turnaround p50, part 1: callback until recorded",
        _get("efficiency", "turnaround_split_ms", "callback_recorded", "p50"),
        fmt="{:,.2f}",
    ),
    Row(
        "  turnaround p50, part 2: then until next request",
        _get("efficiency", "turnaround_split_ms", "then_next_request", "p50"),
        fmt="{:,.2f}",
    ),
    Row(
        "efficiency (ideal / measured makespan)",
        _get("efficiency", "efficiency"),
        "≥ 0.95",
        lambda v: v >= TARGETS["efficiency"],
        "{:.3f}",
    ),
    Row("makespan, s", _get("efficiency", "makespan_s"), fmt="{:,.2f}"),
    Row(
        "short jobs (16 slots x 40 ms): efficiency",
        _get("short", "efficiency"),
        "≥ 0.90",
        lambda v: v >= TARGETS["short_efficiency"],
        "{:.3f}",
    ),
    Row("  short jobs: slot turnaround p50, ms", _get("short", "turnaround_ms", "p50"), fmt="{:,.2f}"),
    Row(
        "three dispatchers, callbacks to one (16 x 40 ms): efficiency",
        _get("three", "efficiency"),
        "≥ 0.90",
        lambda v: v >= TARGETS["three_efficiency"],
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
    Row(
        "database commits per job (efficiency run)",
        _get("efficiency", "db_commits_per_job"),
        "≤ 1.2",
        lambda v: v <= TARGETS["commits_per_job"],
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
    Row(
        "overhead-bound throughput, jobs/s",
        _get("overhead", "jobs_per_s"),
        "≥ 800",
        lambda v: v >= TARGETS["overhead_jobs_per_s"],
        "{:,.0f}",
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
        f"Python {m['python']}; load average at start {meta['load_at_start']}.",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + " |",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(figures)]
    lines += ["", FOOTNOTE]
    return "\n".join(lines) + "\n"
