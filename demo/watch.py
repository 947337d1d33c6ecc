"""The live view: overall progress, and per GPU its busy slots (the dispatcher's ``GET /gpus``) and the jobs
it finished (the database). Every tick also runs the seed's load query and keeps the busiest answer: at the
end nothing is processing any more, so the mid-run snapshot is the one worth showing."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from demo.db import DemoDb
from demo.services import DemoError
from demo.submit import Submitted
from dispatcher.states import TERMINAL

TICK = 0.1


@dataclass
class Snapshot:
    at: float  # seconds since the first submission
    finished: int
    rows: list[tuple[str, int]]

    @property
    def running(self) -> int:
        return sum(n for _, n in self.rows)


@dataclass
class Watch:
    """Drives the view until every submitted job has reached a final state."""

    api: str
    db: DemoDb
    jobs: int
    slots: int
    submitted: Submitted = field(default_factory=Submitted)
    busiest: Snapshot | None = None
    started: float = field(default_factory=time.monotonic)
    done_at: float | None = None
    _http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=2))

    def run(
        self, console: Console, submitter: threading.Thread, failure: list[BaseException], timeout: float
    ) -> None:
        progress = Progress(
            TextColumn("[bold]jobs"),
            BarColumn(bar_width=40),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=console,
        )
        bar = progress.add_task("jobs", total=self.jobs, rate="")
        deadline = self.started + timeout
        with Live(console=console, auto_refresh=False) as live:
            while True:
                if failure:
                    raise DemoError(f"submitting failed: {failure[0]}")
                states, gpus = self.db.states(), self._gpus()
                self._sample(states["finished"])
                ended = sum(states[s] for s in TERMINAL)
                elapsed = time.monotonic() - self.started
                rate = f"{states['finished'] / elapsed:6.0f} jobs/s" if elapsed > 0.5 else ""
                progress.update(bar, completed=ended, rate=rate)
                live.update(Group(progress, self._status(states), self._gpu_table(gpus)), refresh=True)
                if not submitter.is_alive() and ended >= self.submitted.tasks:
                    self.done_at = time.monotonic()
                    return
                if time.monotonic() > deadline:
                    raise DemoError(f"not done after {timeout:.0f} s: {dict(states)}")
                time.sleep(TICK)

    def _gpus(self) -> list[dict[str, Any]]:
        try:
            rows: list[dict[str, Any]] = self._http.get(f"{self.api}/gpus").json()
        except (httpx.HTTPError, ValueError):
            return []  # a missed tick; the next one will do
        return rows

    def _sample(self, finished: int) -> None:
        snap = Snapshot(time.monotonic() - self.started, finished, self.db.seed_load())
        if self.busiest is None or snap.running > self.busiest.running:
            self.busiest = snap

    def _status(self, states: Counter[str]) -> Text:
        s = self.submitted
        running = states.get("processing", 0)
        waiting = s.tasks - running - sum(states[f] for f in TERMINAL)
        return Text.assemble(
            ("submitted ", "dim"),
            f"{s.tasks}",
            (f" ({s.api_requests} API requests, {s.sqs_events} SQS events)   ", "dim"),
            ("waiting ", "dim"),
            f"{max(waiting, 0)}   ",
            ("running ", "dim"),
            f"{running}   ",
            ("finished ", "dim"),
            f"{states.get('finished', 0)}",
        )

    def _gpu_table(self, gpus: list[dict[str, Any]]) -> Table:
        done = dict(self.db.finished_per_gpu())
        table = Table(box=None, pad_edge=False, header_style="bold")
        table.add_column("GPU")
        table.add_column("busy slots")
        table.add_column("running", justify="right")
        table.add_column("finished", justify="right")
        for g in gpus:
            busy, slots = int(g["busy"]), int(g["slots"])
            cells = Text("■" * busy, style="green") + Text("□" * max(slots - busy, 0), style="dim")
            table.add_row(g["gpu_id"], cells, f"{busy}/{slots}", str(done.get(g["gpu_id"], 0)))
        return table

    def close(self) -> None:
        self._http.close()
