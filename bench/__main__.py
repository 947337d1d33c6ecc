"""``python -m bench`` (``make bench``): every workload through gpuq, then through Celery, one after the other
in the same run; a table on stdout, ``<out>/<stamp>.json``, ``<out>/<stamp>.png`` and ``<out>/<stamp>.md``.

    python -m bench                      the full benchmark (16 GPUs x 4 slots: 6,400 x 100 ms, 20,000 x 0 ms;
                                         4 GPUs x 4 slots: 4,000 x 40 ms with one and with three dispatchers;
                                         scale-out: 256 GPUs x 4 slots, 4,096 x 4 s, three dispatchers)
    python -m bench --only short,three   some workloads only (while developing)
    python -m bench --smoke --out DIR    a few seconds per system (tests/bench runs it)
    python -m bench --profile            then each workload through gpuq again, with py-spy on the dispatcher
    python -m bench --profile-only       those runs alone

Exit 0 when every job ran exactly once and no GPU was oversubscribed (targets missed do not fail the run:
they are figures to report), 1 otherwise, 2 when Redis, MariaDB or a process could not be set up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from bench import gpuq_run, procs, runner, workloads
from bench.gpuq_run import Gpuq
from bench.procs import ProcError
from bench.report import changed_files, git_revision, machine, markdown, print_table, speedup_vs_celery
from bench.stores import BenchDatabase, BenchRedis, StoreError
from bench.workloads import TARGETS, Workload

OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description="gpuq vs Celery on a simulated GPU fleet")
    p.add_argument("--smoke", action="store_true", help="tiny workloads (seconds), for CI")
    p.add_argument("--gpus", type=int, default=16)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--service", type=float, default=0.1, help="fixed service time of the efficiency run, s")
    p.add_argument("--jobs", type=int, default=6400, help="jobs in the efficiency run")
    p.add_argument("--overhead-jobs", type=int, default=20_000, help="jobs in the 0 ms run")
    p.add_argument("--no-celery", action="store_true", help="gpuq only (no Celery installed)")
    p.add_argument("--handoff-buffer", type=int, default=None, help="HANDOFF_BUFFER of gpuq (0: no hand-off)")
    p.add_argument(
        "--commit-pipeline", type=int, default=None, help="COMMIT_PIPELINE of gpuq (1: one batch at a time)"
    )
    p.add_argument(
        "--standby-jobs",
        choices=["true", "false"],
        default=None,
        help="STANDBY_JOBS of gpuq (false: hand-off only, for a comparison)",
    )
    p.add_argument(
        "--cold-callbacks",
        action="store_true",
        help="the simulator opens callback connections only as callbacks need them (simgpu/callbacks.py)",
    )
    p.add_argument(
        "--only",
        default="",
        help="comma list of workloads to run (efficiency,short,three,overhead,pull,pull-short,scaleout)",
    )
    p.add_argument(
        "--profile", action="store_true", help="then profile the dispatcher (py-spy) in each workload"
    )
    p.add_argument("--profile-only", action="store_true", help="only the profiled runs, no measurement")
    p.add_argument("--quiet-load", type=float, default=0.0, help="wait for a 1-min load average below this")
    p.add_argument("--quiet-wait", type=float, default=300.0, help="wait at most this long for it, s")
    p.add_argument("--out", type=Path, default=OUT, help="where the result files go")
    p.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis server (a free db is claimed)")
    p.add_argument("--mysql", default="mysql+pymysql://root@127.0.0.1:3306", help="MariaDB server")
    return p.parse_args(argv)


def wait_quiet(console: Console, below: float, most: float) -> float:
    """Other people's test runs share the machine: wait (a while) for a calm minute, and say what we got."""
    deadline = time.monotonic() + most
    load = os.getloadavg()[0]
    while below and load >= below and time.monotonic() < deadline:
        console.print(f"[dim]load average {load:.2f} ≥ {below}: waiting for a quieter machine[/]")
        time.sleep(15)
        load = os.getloadavg()[0]
    return round(load, 2)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:  # piped or captured: wide enough for the table's labels
        console = Console(width=120)
    sets = (
        workloads.smoke()
        if args.smoke
        else workloads.full(args.gpus, args.slots, args.service, args.jobs, args.overhead_jobs)
    )
    if args.handoff_buffer is not None:
        gpuq_run.HANDOFF_BUFFER = args.handoff_buffer
        meta_extra = {"handoff_buffer": args.handoff_buffer}
    else:
        meta_extra = {}
    if args.commit_pipeline is not None:
        gpuq_run.COMMIT_PIPELINE = args.commit_pipeline
        meta_extra["commit_pipeline"] = args.commit_pipeline
    if args.standby_jobs is not None:
        gpuq_run.STANDBY_JOBS = args.standby_jobs
        meta_extra["standby_jobs"] = args.standby_jobs
    if args.cold_callbacks:
        procs.Sim.cold_callbacks = True
        meta_extra["cold_callbacks"] = True
    if args.only:
        sets = [w for w in sets if w.name in args.only.split(",")]
    systems = ["gpuq"] if args.no_celery else ["gpuq", "celery"]
    try:
        redis_store = BenchRedis(args.redis)
        database = BenchDatabase(args.mysql)
    except StoreError as exc:
        console.print(f"[bold red]bench: {exc}[/]")
        return 2
    meta: dict[str, Any] = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench", *argv]),
        "git": git_revision(),
        "changed_files": changed_files(),
        "machine": machine(),
        "load_at_start": wait_quiet(console, args.quiet_load, args.quiet_wait),
        "redis_db": redis_store.db,
        "database": database.name,
        "producer": "producer.handler.lambda_handler, API Gateway REST proxy events of 100 tasks",
        "workloads": [w.describe() for w in sets],
        "targets": TARGETS,
    } | meta_extra
    figures: dict[str, dict[str, Any]] = {s: {} for s in systems}
    stamp = datetime.now().strftime("%Y-%m-%d-%H%M")
    with tempfile.TemporaryDirectory(prefix="gpuq-bench-") as tmp:
        ctx = runner.Context(redis_store, database, Path(tmp))
        try:
            for workload in [] if args.profile_only else sets:
                for system in systems:
                    if system != "gpuq" and (workload.dispatchers > 1 or workload.pull):
                        continue  # gpuq's own workload: callbacks all to one of several dispatchers
                    figures[system][workload.name] = _run(console, ctx, system, workload)
            if args.profile or args.profile_only:
                meta["profile"] = {
                    w.name: _profile(console, ctx, w, args.out / f"{stamp}-{w.name}.pyspy.txt") for w in sets
                }
        except (ProcError, StoreError) as exc:
            console.print(f"[bold red]bench: {exc}[/]")
            return 2
        finally:
            redis_store.release()
            database.drop()
    if args.profile_only:
        args.out.joinpath(f"{stamp}-profile.json").write_text(json.dumps(_finite(meta), indent=1) + "\n")
        return 0
    return _report(console, args, meta, figures, stamp)


def _system(name: str) -> runner.System:
    if name == "gpuq":
        return Gpuq()
    from bench.celery_run import CeleryBaseline  # Celery is a bench-only dependency

    return CeleryBaseline()


def _run(console: Console, ctx: runner.Context, system: str, workload: Workload) -> dict[str, Any]:
    start = "backlog enqueued first" if workload.backlog else "enqueued live"
    console.print(
        f"[bold]{system}[/] {workload.name}: {workload.jobs:,} jobs x {workload.service * 1000:g} ms on "
        f"{workload.gpus} GPUs x {workload.slots} slots, {start} (load {os.getloadavg()[0]:.2f}) ..."
    )
    result = runner.run(ctx, _system(system), workload, backlog=workload.backlog)
    console.print(
        f"  {result['completed']:,} done in {result['makespan_s']:.2f} s: "
        f"{result['jobs_per_s']:,.0f} jobs/s, "
        f"dispatch p50 {result['dispatch_latency_ms']['p50']:.2f} ms, "
        f"{result['oversubscriptions']} oversubscriptions"
    )
    return workload.describe() | result


def _profile(console: Console, ctx: runner.Context, workload: Workload, raw: Path) -> dict[str, Any]:
    """The workload through gpuq once more, py-spy sampling the dispatcher; its collapsed stacks go to
    ``raw`` (for a flame graph), their summary into the results."""
    from bench.profile import Profiler, print_profile, summarize

    raw.parent.mkdir(parents=True, exist_ok=True)
    profiler = Profiler(raw)
    if profiler.exe is None:
        console.print("[yellow]py-spy is not installed (pip install py-spy): no profile[/]")
        return {}
    console.print(
        f"[bold]gpuq[/] {workload.name}: {workload.jobs:,} jobs again, py-spy on the dispatcher ..."
    )
    hooks = runner.Hooks(on_consumer=profiler.attach, after=profiler.detach)
    result = runner.run(ctx, Gpuq(), workload, backlog=workload.backlog, hooks=hooks)
    summary = summarize(raw, profiler.seconds)
    summary |= {"raw": str(raw), "jobs_per_s_while_profiled": result["jobs_per_s"]}
    summary |= {
        "dispatcher_cores": result["consumer_cores"],
        "dispatcher_cpu_ms_per_job": result["consumer_cpu_ms_per_job"],
        "request_bursts": result["request_bursts"],
        "machine_busy": result["machine_busy"],
    }
    print_profile(console, summary)
    return summary


def _report(
    console: Console, args: argparse.Namespace, meta: dict[str, Any], figures: dict[str, Any], stamp: str
) -> int:
    first = meta["workloads"][0]
    title = (
        f"gpuq vs Celery · {first['gpus']} GPUs x {first['slots']} slots · "
        f"{meta['machine']['nproc']} cores · "
        f"load {meta['load_at_start']} at start"
    )
    print_table(console, title, figures)
    speedup = speedup_vs_celery(figures)
    if speedup is not None:
        meta["speedup_vs_celery"] = round(speedup, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    result_file = args.out / f"{stamp}.json"
    result_file.write_text(json.dumps(_finite({"meta": meta, "runs": figures}), indent=1) + "\n")
    (args.out / f"{stamp}.md").write_text(markdown(meta, figures))
    try:
        from bench.plot import plot

        if all({"efficiency", "overhead"} <= set(runs) for runs in figures.values()):  # what it draws
            plot(figures, title, args.out / f"{stamp}.png")
    except ImportError:
        console.print(
            "[yellow]matplotlib is not installed: no plot (pip install -r bench/requirements.txt)[/]"
        )
    console.print(f"results: {result_file} (.md, .png beside it)")
    runs = [run for system in figures.values() for run in system.values()]
    sound = all(
        r["oversubscriptions"] == 0
        and r["duplicates"] == 0
        and r["completed"] == r["jobs"]
        and r.get("db_states", {"finished": r["jobs"]}) == {"finished": r["jobs"]}
        for r in runs
    )
    if not sound:
        console.print(
            "[bold red]unsound run: a job ran twice, did not finish, or a GPU was oversubscribed[/]"
        )
    return 0 if sound else 1


def _finite(value: Any) -> Any:
    """NaN (a percentile of no samples) as null: JSON has no NaN, and strict readers (jq) refuse it."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
