"""What one benchmark run is, and the two sets of runs: the full benchmark and the smoke CI can afford."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Workload:
    name: str  # "efficiency", "short", "three", "scaleout" (fixed service time) or "overhead" (time 0)
    gpus: int
    slots: int
    service: float  # fixed service time per job, seconds
    jobs: int
    backlog: bool = False  # all jobs enqueued before the consumer starts (see bench.runner)
    dispatchers: int = 1  # gpuq only: more share the fleet, every callback goes to the first one
    pull: bool = False  # gpuq only: the GPUs are pull agents (SPEC §9) long-polling the dispatcher

    @property
    def capacity(self) -> int:
        return self.gpus * self.slots

    @property
    def ideal_makespan(self) -> float:
        """Every slot busy from the first job to the last, no gap: what a perfect dispatcher achieves."""
        return self.jobs * self.service / self.capacity

    def describe(self) -> dict[str, Any]:
        return asdict(self) | {"capacity": self.capacity, "ideal_makespan_s": self.ideal_makespan}


#: Targets on a 2-core machine (issue 4, then issue 12 for turnaround, efficiency, short jobs, several
#: dispatchers, speed-up and commits). Latencies in ms, throughput in jobs/s.
TARGETS: dict[str, float] = {
    "overhead_jobs_per_s": 800,
    "dispatch_p50_ms": 3,
    "dispatch_p99_ms": 15,
    "turnaround_p50_ms": 3,
    "turnaround_p99_ms": 15,
    "efficiency": 0.95,
    "short_efficiency": 0.90,
    "three_efficiency": 0.90,
    "speedup_vs_celery": 2.5,
    "commits_per_job": 1.2,
}


def full(
    gpus: int = 16, slots: int = 4, service: float = 0.1, jobs: int = 6400, overhead_jobs: int = 20_000
) -> list[Workload]:
    return [
        Workload("efficiency", gpus, slots, service, jobs),
        # 16 slots x 40 ms: a slot turns over 25 times a second, so every millisecond of turnaround shows
        Workload("short", 4, slots, 0.04, 4000),
        Workload("three", 4, slots, 0.04, 4000, dispatchers=3),
        Workload("overhead", gpus, slots, 0.0, overhead_jobs, backlog=True),
        # the efficiency and short runs again with every GPU a pull agent: the long poll's cost beside push
        Workload("pull", gpus, slots, service, jobs, pull=True),
        Workload("pull-short", 4, slots, 0.04, 4000, pull=True),
        *scale_out(slots),
    ]


def scale_out(slots: int = 4) -> list[Workload]:
    """SPEC §8's scale-out run: 1,024 slots (256 GPUs x 4), three dispatchers, callbacks to the first.
    4 s jobs keep the rate a 2-core machine can dispatch (~256 jobs/s keeps every slot busy) within reach,
    so the figure is about many slots and several dispatchers, not raw throughput (the overhead run's)."""
    return [Workload("scaleout", 256, slots, 4.0, 4096, dispatchers=3)]


def smoke() -> list[Workload]:
    """Small enough for ``make test``: a few seconds per system."""
    return [
        Workload("efficiency", 4, 4, 0.02, 160),
        Workload("three", 2, 4, 0.02, 160, dispatchers=3),
        Workload("overhead", 4, 4, 0.0, 400, backlog=True),
        Workload("pull", 4, 4, 0.02, 160, pull=True),
    ]
