"""``python -m demo [--jobs N]``: see the package docstring. Exit 0 when every job finished as it should
(none failed, no GPU ever over its slots), 1 otherwise, 130 when interrupted (Ctrl-C or SIGTERM)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from types import FrameType

from rich.console import Console

from demo.db import DemoDb
from demo.report import figures, finished_table, load_table
from demo.services import DemoError
from demo.stack import OnExit, start
from demo.submit import submit
from demo.watch import Watch
from simgpu.config import ConfigError, ServiceTime


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m demo", description="gpuq end to end on embedded defaults")
    p.add_argument("--jobs", type=int, default=400, help="jobs to submit (default 400)")
    p.add_argument("--gpus", type=int, default=4, help="simulated GPUs (default 4)")
    p.add_argument("--slots", type=int, default=4, help="slots per GPU (default 4)")
    p.add_argument("--service-time", default="exp:0.1", help="simulated job time (default exp:0.1 s)")
    p.add_argument("--redis-port", type=int, default=6379, help="where to look for a running Redis")
    p.add_argument("--timeout", type=float, default=90.0, help="give up after this many seconds")
    args = p.parse_args(argv)
    if min(args.jobs, args.gpus, args.slots) < 1:
        p.error("--jobs, --gpus and --slots must be at least 1")
    if not 1 <= args.redis_port <= 65535:  # 0 or 99999 went by, and the demo started a Redis of its own
        p.error(f"--redis-port: {args.redis_port} is no TCP port (1-65535)")
    if not args.timeout > 0:  # 0 or -1 failed at once with "not done after -1 s"
        p.error(f"--timeout: {args.timeout} s; give a number of seconds above 0")
    try:
        ServiceTime.parse(args.service_time)
    except ConfigError as exc:  # checked before anything starts (it was a traceback from the simulator)
        p.error(f"--service-time: {exc}")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM: stop like Ctrl-C, through the same clean-up


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`&`)
    with contextlib.ExitStack() as cleanup:
        try:
            return run(args, console, cleanup.callback)
        except DemoError as exc:
            console.print(f"\n[bold red]demo failed:[/] {exc}")
            return 1
        except KeyboardInterrupt:
            console.print("\n[yellow]interrupted: stopping everything the demo started[/]")
            return 130
    raise AssertionError("unreachable")


def run(args: argparse.Namespace, console: Console, on_exit: OnExit) -> int:
    """Start everything (each start registers its stop with ``on_exit``), submit, watch, report."""
    say = console.print
    jobs, service = args.jobs, args.service_time
    say(f"[bold]gpuq demo[/]: {jobs} jobs, {args.gpus} simulated GPUs x {args.slots} slots, {service} s each")
    stack = start(
        gpus=args.gpus,
        slots=args.slots,
        service=service,
        redis_port=args.redis_port,
        say=say,
        on_exit=on_exit,
    )
    db = DemoDb(stack.db_path)
    on_exit(db.close)
    watch = Watch(stack.dispatcher.url, db, jobs, args.slots)
    on_exit(watch.close)
    failure: list[BaseException] = []

    def submitting() -> None:
        try:
            submit(jobs, watch.submitted)
        except BaseException as exc:
            failure.append(exc)

    say("Submitting: API Gateway and SQS events → producer.handler.lambda_handler\n")
    submitter = threading.Thread(target=submitting, name="submit", daemon=True)
    watch.started = time.monotonic()
    submitter.start()
    watch.run(console, submitter, failure, args.timeout)

    s = watch.submitted
    say(f"\nSubmitted {s.tasks} jobs at once: {s.api_requests} API Gateway requests (all 202) and")
    say(f"{s.sqs_events} SQS events of {s.sqs_records} records (no batchItemFailures).\n")
    say(load_table(watch.busiest, args.slots))
    now = db.seed_load()
    say(f"The same query now: {now if now else 'no rows, every slot is free again'}\n")
    stats = stack.fleet.stats(jobs=False)
    say(finished_table(db.finished_per_gpu(), stats))
    say(figures(db.timings(), args.gpus * args.slots, service))
    states = db.states()
    problems = []
    if states["finished"] != s.tasks:
        problems.append(f"{s.tasks} submitted, but the tasks table has {dict(states)}")
    if stats["totals"]["received"] != s.tasks:
        problems.append(f"the GPUs received {stats['totals']['received']} requests for {s.tasks} jobs")
    if stats["totals"]["oversubscriptions"]:
        problems.append(f"{stats['totals']['oversubscriptions']} requests found a GPU with no free slot")
    if problems:
        raise DemoError("; ".join(problems))
    say(f"\n[bold green]All {s.tasks} jobs finished, none twice, no GPU over its {args.slots} slots.[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
