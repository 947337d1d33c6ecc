"""Figures from the simulator's job log and the driver's enqueue times (all on CLOCK_MONOTONIC, which every
process on the machine shares).

Slot occupancy per GPU is rebuilt from the log: a GPU has ``slots`` slots; a job takes, on arrival
(``received_mono``), the slot that has been free the longest, and frees it when it hands its result over
(``callback_sent_mono`` in async mode: the callback starts going out; ``answered_mono`` in sync mode: the
answer goes out). Which physical slot a job holds does not matter to a GPU; when one of them became free
does. For each job then:

    dispatch latency = received - max(enqueued, slot freed)   (a never-used slot counts as free forever)
    slot turnaround  = received - slot freed                  (only jobs already waiting when it was freed)

A job found no free slot on arrival only if the GPU was oversubscribed: counted as ``anomalies``. In async
mode a turnaround is split at ``callback_answered_mono`` (the dispatcher's answer to the callback came back,
so it had recorded the ending and freed the slot): "callback recorded" + "then next request".
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.workloads import Workload

PERCENTILES = (50, 90, 99, 99.9)


def percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on an already sorted sequence."""
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary_ms(values: Iterable[float]) -> dict[str, float | int]:
    ordered = sorted(v * 1000 for v in values)
    out: dict[str, float | int] = {"n": len(ordered)}
    for q in PERCENTILES:
        out[f"p{q:g}"] = round(percentile(ordered, q), 3)
    out["mean"] = round(sum(ordered) / len(ordered), 3) if ordered else math.nan
    out["max"] = round(ordered[-1], 3) if ordered else math.nan
    return out


def freed_at(job: Mapping[str, Any]) -> float | None:
    value = job.get("callback_sent_mono")
    if value is None:
        value = job.get("answered_mono")
    return None if value is None else float(value)


@dataclass
class Samples:
    """Seconds per job; ``recorded`` and ``pickup`` split a turnaround (async mode only): the callback's
    answer came back (the dispatcher has recorded the ending) and then the next job arrived."""

    latencies: list[float] = field(default_factory=list)
    turnarounds: list[float] = field(default_factory=list)
    freed: list[float] = field(default_factory=list)  # when each turnaround's slot became free
    recorded: list[float] = field(default_factory=list)
    pickup: list[float] = field(default_factory=list)
    anomalies: int = 0


def slot_samples(jobs: Sequence[Mapping[str, Any]], enqueued: Mapping[str, float], slots: int) -> Samples:
    """See the module docstring."""
    by_gpu: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for job in jobs:
        by_gpu[job["gpu"]].append(job)
    out = Samples()
    for gpu_jobs in by_gpu.values():
        # heap of (when the slot became free, when the ending that freed it was answered)
        free: list[tuple[float, float | None]] = [(-math.inf, None)] * slots
        for job in sorted(gpu_jobs, key=lambda j: float(j["received_mono"])):
            received = float(job["received_mono"])
            slot_free, answered = heapq.heappop(free)
            if slot_free > received:
                out.anomalies += 1
            queued = enqueued.get(job["task_id"])
            if queued is not None:
                out.latencies.append(received - max(queued, slot_free))
                if math.isfinite(slot_free) and queued <= slot_free:
                    out.turnarounds.append(received - slot_free)
                    out.freed.append(slot_free)
                    if answered is not None:
                        out.recorded.append(answered - slot_free)
                        out.pickup.append(received - answered)
            done = freed_at(job)
            answer = job.get("callback_answered_mono")
            heapq.heappush(
                free, (math.inf if done is None else done, None if answer is None else float(answer))
            )
    return out


#: Turnarounds of slots freed this long after the clock started: the driver's one burst of enqueues (~0.4 s
#: of a core for 6,400 jobs, on the same two cores) and the fleet's first fill are over.
SETTLED_S = 1.0

BURST_GAP_S = 0.002


def bursts(jobs: Sequence[Mapping[str, Any]], gap: float = BURST_GAP_S) -> dict[str, float | int]:
    """Requests to the fleet grouped into bursts (no gap over ``gap`` between two requests): gpuq sends the
    jobs of one pass of its dispatch loop back to back, so the bursts show the loop's pace: how many jobs
    one pass places, and how long a pass takes from one burst's start to the next's. (Celery's threads
    each take their own job: its bursts say little.)"""
    times = sorted(float(job["received_mono"]) for job in jobs)
    if not times:
        return {"count": 0}
    starts, sizes = [times[0]], [1]
    for prev, t in itertools.pairwise(times):
        if t - prev > gap:
            starts.append(t)
            sizes.append(1)
        else:
            sizes[-1] += 1
    intervals = sorted((b - a) * 1000 for a, b in itertools.pairwise(starts))
    return {
        "count": len(sizes),
        "jobs_mean": round(sum(sizes) / len(sizes), 2),
        "interval_ms_p50": round(percentile(intervals, 50), 2),
        "interval_ms_p90": round(percentile(intervals, 90), 2),
    }


def measure(
    workload: Workload, jobs: Sequence[Mapping[str, Any]], enqueued: Mapping[str, float], started: float
) -> dict[str, Any]:
    """Everything that comes from the job log; ``started`` is the driver's clock before the first enqueue."""
    ended = sorted(t for t in (freed_at(job) for job in jobs) if t is not None)
    received = Counter(job["task_id"] for job in jobs)
    samples = slot_samples(jobs, enqueued, workload.slots)
    makespan = (ended[-1] - started) if ended else math.nan
    n = len(ended)
    i0, i1 = int(n * 0.1), int(n * 0.9)
    span = ended[i1] - ended[i0] if n else 0.0
    result: dict[str, Any] = {
        "completed": len({job["task_id"] for job in jobs if freed_at(job) is not None}),
        "unknown_jobs": sum(1 for task_id in received if task_id not in enqueued),
        "duplicates": sum(count - 1 for count in received.values()),
        "makespan_s": round(makespan, 4),
        "jobs_per_s": round(n / makespan, 1) if makespan > 0 else math.nan,
        # completions between the 10th and the 90th percentile: the rate without ramp-up and tail
        "steady_jobs_per_s": round((i1 - i0) / span, 1) if span > 0 else math.nan,
        "dispatch_latency_ms": summary_ms(samples.latencies),
        "turnaround_ms": summary_ms(samples.turnarounds),
        "turnaround_settled_ms": summary_ms(
            t
            for t, freed in zip(samples.turnarounds, samples.freed, strict=True)
            if freed >= started + SETTLED_S
        ),
        # How many turnarounds passed the p99 target (15 ms), of slots freed in the first second (the first
        # waves: all slots start together, inside the driver's enqueue burst) and after: what sets the p99.
        "turnarounds_over_15ms": {
            "first_s": sum(
                1
                for t, freed in zip(samples.turnarounds, samples.freed, strict=True)
                if t > 0.015 and freed < started + SETTLED_S
            ),
            "settled": sum(
                1
                for t, freed in zip(samples.turnarounds, samples.freed, strict=True)
                if t > 0.015 and freed >= started + SETTLED_S
            ),
        },
        "turnaround_split_ms": {
            "callback_recorded": summary_ms(samples.recorded),
            "then_next_request": summary_ms(samples.pickup),
        },
        # Requests that reached the GPU before the callback that freed their slot was answered: standby jobs
        # (docs/standby.md), sent before the callback's transaction. Part 2 is negative for those.
        "sent_before_answer_share": _share(samples.pickup, lambda p: p < 0),
        "slot_anomalies": samples.anomalies,
        "request_bursts": bursts(jobs),
    }
    if workload.service > 0:
        result["efficiency"] = round(workload.ideal_makespan / makespan, 4) if makespan > 0 else math.nan
    return result


def _share(values: Sequence[float], pred: Callable[[float], bool]) -> float | None:
    return round(sum(1 for v in values if pred(v)) / len(values), 4) if values else None


def cdf_points(values_ms: Sequence[float], points: int = 200) -> list[tuple[float, float]]:
    """A thinned CDF for the plot: (latency ms, fraction of jobs at or below it)."""
    ordered = sorted(values_ms)
    if not ordered:
        return []
    step = max(1, len(ordered) // points)
    return [(ordered[i], (i + 1) / len(ordered)) for i in range(0, len(ordered), step)]
