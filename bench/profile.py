"""Where the dispatcher's time goes: py-spy (``pip install py-spy``; not a requirement) samples the running
``python -m dispatcher`` during a run, only the thread that holds the GIL (``--gil``: one interpreter runs
one thread of Python at a time, so that is what limits one dispatcher process). The collapsed stacks are
summed up three ways: per thread (the event loop vs the database worker threads of ``asyncio.to_thread``),
per component (the innermost frame that belongs to a known library or to gpuq), per function (self time).
``gil_busy`` is the share of the run's wall time in which some thread held the GIL; a frame of
``Runner.run`` alone is uvloop's own C code (its event loop: polling, socket I/O, callbacks)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# (component, pattern on a frame's "function (file:line)"), first match from the innermost frame outwards
COMPONENTS = [
    ("PyMySQL (database driver)", re.compile(r"pymysql/")),
    ("SQLAlchemy", re.compile(r"sqlalchemy/")),
    ("redis-py", re.compile(r"redis/")),
    ("aiohttp (requests to GPUs)", re.compile(r"aiohttp/")),
    ("uvicorn / ASGI (callbacks)", re.compile(r"uvicorn/|httptools|starlette/|fastapi/")),
    ("pydantic", re.compile(r"pydantic")),
    ("logging", re.compile(r"logging/")),
    ("gpuq dispatcher", re.compile(r"dispatcher/")),
    ("gpuq producer (job parsing)", re.compile(r"producer/")),
    ("asyncio / threads", re.compile(r"asyncio/|uvloop|threading\.py|concurrent/")),
]
RATE = 250  # samples per second
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*):\d+\)$")
_THREAD = re.compile(r"^thread \(\d+\): ?(?P<name>.*)$")


class Profiler:
    def __init__(self, raw: Path) -> None:
        self.raw = raw
        # the venv's bin first: `.venv/bin/python -m bench` does not put it on PATH
        self.exe = shutil.which(
            "py-spy", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.seconds = 0.0

    def attach(self, pid: int) -> None:
        if self.exe is None:
            return
        argv = [self.exe, "record", "-p", str(pid), "-f", "raw", "-o", str(self.raw), "-r", str(RATE)]
        argv += ["--nonblocking", "--threads", "--gil"]
        self.started = time.monotonic()
        log = self.raw.with_suffix(".log").open("wb")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def detach(self) -> None:
        """py-spy writes its file when interrupted."""
        if self.proc is not None and self.proc.poll() is None:
            self.seconds = time.monotonic() - self.started
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _thread_kind(name: str) -> str:
    if name == "MainThread":
        return "event loop (main thread)"
    if name.startswith(("asyncio_", "uvloop_")) or not name:
        return "asyncio.to_thread workers (database)"
    return f"other threads ({name.split('_', maxsplit=1)[0]})"


def summarize(raw: Path, seconds: float, top: int = 15) -> dict[str, Any]:
    threads: Counter[str] = Counter()
    components: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = _THREAD.match(frames[0])
        if thread:
            frames = frames[1:] or ["(no Python frame)"]
        total += count
        threads[_thread_kind(thread["name"].strip() if thread else "")] += count
        functions[frames[-1]] += count
        components[_component(frames)] += count

    def share(counter: Counter[str], n: int | None = None) -> list[dict[str, Any]]:
        return [{"name": k, "share": round(v / total, 4)} for k, v in counter.most_common(n)] if total else []

    return {
        "samples": total,
        "gil_busy": round(total / (RATE * seconds), 3) if seconds else None,
        "threads": share(threads),
        "components": share(components),
        "self_time": share(functions, top),
    }


def print_profile(console: Console, summary: dict[str, Any]) -> None:
    table = Table(
        title=f"dispatcher profile: {summary['samples']:,} samples of the thread holding the GIL (py-spy), "
        f"GIL held {summary['gil_busy'] * 100:.0f} % of the time, dispatcher process "
        f"{summary['dispatcher_cores']:.2f} cores busy, {summary['jobs_per_s_while_profiled']:,.0f} jobs/s",
        title_justify="left",
    )
    table.add_column("where the dispatcher's CPU goes")
    table.add_column("share", justify="right")
    for section in ("threads", "components", "self_time"):
        table.add_section()
        for item in summary[section][:12]:
            table.add_row(f"[dim]{section}:[/] {item['name']}", f"{item['share'] * 100:.1f} %")
    console.print(table)


def _component(frames: list[str]) -> str:
    for frame in reversed(frames):
        match = _FRAME.match(frame)
        where = match["file"] if match else frame
        for name, pattern in COMPONENTS:
            if pattern.search(where):
                return name
    return "other (stdlib, C extensions)"
