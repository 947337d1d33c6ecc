"""Prometheus metrics of one dispatcher process (its own registry, so several can live in one test process).

Counters and histograms are updated where things happen; the gauges (queue depths, slots, GPU health) are
refreshed from Redis and the database when ``/metrics`` is scraped, so they show the fleet, not a process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.dispatched = Counter("gpuq_jobs_dispatched", "Jobs sent to a GPU slot", ["pool"], registry=r)
        self.attempts = Counter("gpuq_attempts", "Attempts ended, by outcome", ["outcome"], registry=r)
        self.callbacks = Counter("gpuq_callbacks", "Callbacks received, by answer code", ["code"], registry=r)
        self.gpu_requests = Counter(
            "gpuq_gpu_requests", "Requests to GPUs by verdict", ["verdict"], registry=r
        )
        self.handoffs = Counter(
            "gpuq_handoffs", "Jobs started in the transaction that ended the attempt before them", registry=r
        )
        self.returned = Counter(
            "gpuq_jobs_returned",
            "Jobs taken from Redis and returned unstarted: to the head of their queue, or parked",
            ["pool", "to"],
            registry=r,
        )
        self.db_commits = Counter("gpuq_db_commits", "Database transactions committed", registry=r)
        self.lease_expiries = Counter("gpuq_lease_expiries", "Attempts ended by their lease", registry=r)
        self.dead_letters = Counter("gpuq_dead_letters", "Jobs moved to the dead-letter list", registry=r)
        self.task_ids_reused = Counter(
            "gpuq_task_ids_reused",
            "New jobs dead-lettered because a different task already has their task id",
            registry=r,
        )
        self.events_dropped = Counter(
            "gpuq_task_events_dropped",
            "Task events not published: Redis did not take them and the process's buffer was full",
            registry=r,
        )
        self.dispatch_latency = Histogram(
            "gpuq_dispatch_latency_seconds",
            "From taking a job off Redis to its request leaving for the GPU",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.turnaround = Histogram(
            "gpuq_job_seconds", "From dispatch to the attempt's end", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "gpuq_queue_depth", "Jobs waiting in Redis", ["queue", "priority"], registry=r
        )
        self.queue_oldest = Gauge(
            "gpuq_queue_oldest_age_seconds",
            "How long the oldest waiting job has waited (0 when empty)",
            ["queue", "priority"],
            registry=r,
        )
        self.unserved = Gauge(
            "gpuq_unserved_jobs",
            "Jobs and scheduled or retrying tasks of a queue no running dispatcher serves (a minute or more)",
            ["queue"],
            registry=r,
        )
        self.parked = Gauge("gpuq_parked_jobs", "Jobs taken while their pool was full", ["pool"], registry=r)
        self.dead_letter_jobs = Gauge(
            "gpuq_dead_letter_jobs",
            "Jobs in the dead-letter list (each with the reason it cannot run)",
            registry=r,
        )
        self.tasks = Gauge(
            "gpuq_tasks", "Tasks not yet final, by state (from the database)", ["state"], registry=r
        )
        self.slots_busy = Gauge("gpuq_slots_busy", "Busy slots", ["gpu", "pool"], registry=r)
        self.slots_total = Gauge("gpuq_slots_total", "Slots", ["gpu", "pool"], registry=r)
        self.gpu_healthy = Gauge(
            "gpuq_gpu_healthy", "1 when the GPU is in rotation", ["gpu", "pool"], registry=r
        )
        # The (gpu, pool) label sets the last scrape reported, so a GPU removed since (a KEDA-scaled pod that
        # drained and left) loses its series instead of reporting its last busy slots for ever.
        self.gpu_labels: set[tuple[str, str]] = set()
