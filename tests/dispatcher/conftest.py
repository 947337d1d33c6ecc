"""Fixtures for end-to-end dispatcher scenarios: a fleet, dispatchers (in this process, or real processes),
the stores."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from sqlalchemy import Engine

from dispatcher.db.engine import make_engine
from simgpu.fleet import SimFleet
from tests.dispatcher.harness import BEARER, DispatcherProc, InProcess
from tests.redis_cluster import Cluster


@dataclass
class Stack:
    database_url: str
    redis_url: str
    prefix: str
    rds: redis.Redis
    engine: Engine
    queues: list[str] = field(default_factory=list)
    procs: list[DispatcherProc | InProcess] = field(default_factory=list)
    fleets: list[SimFleet] = field(default_factory=list)
    cluster: bool = False  # the Redis is a Redis Cluster (REDIS_CLUSTER=true)

    def fleet(self, **options: Any) -> SimFleet:
        options.setdefault("token", BEARER)
        options.setdefault("seed", 7)
        fleet = SimFleet(**options).start()
        self.fleets.append(fleet)
        return fleet

    def env(self, fleet: SimFleet | None = None, **extra: str) -> dict[str, str]:
        env = {
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "REDIS_KEY_PREFIX": self.prefix,
            "TASK_QUEUES": ",".join(self.queues),
            "TASK_TIMEOUT_SECONDS": "30",
            "RETRY_BACKOFF_SECONDS": "0.05",
            "GPU_PROBE_SECONDS": "0.5",
        }
        if os.environ.get("GPUQ_TEST_STANDBY_JOBS"):  # the whole suite with standby jobs on (or off)
            env["STANDBY_JOBS"] = os.environ["GPUQ_TEST_STANDBY_JOBS"]
        if self.cluster:
            env["REDIS_CLUSTER"] = "true"
        if fleet is not None:
            env["GPU_ENDPOINTS"] = fleet.gpu_endpoints()
        env.update(extra)
        return env

    def dispatcher(self, fleet: SimFleet | None = None, name: str = "d", **extra: str) -> InProcess:
        """A dispatcher in this process (dispatcher/inproc.py): the real server and loop in a thread."""
        d = InProcess(self.env(fleet, **extra), name=name)
        self.procs.append(d)
        return d.start()

    def process(self, fleet: SimFleet | None = None, name: str = "d", **extra: str) -> DispatcherProc:
        """A real ``python -m dispatcher``: for what only a process can show (kill -9, signals, restarts,
        clock skew, its environment); the tests that use it are marked slow."""
        proc = DispatcherProc(self.env(fleet, **extra), name=name)
        self.procs.append(proc)
        return proc.start()


@pytest.fixture
def stack(database_url: str, redis_url: str, key_prefix: str) -> Iterator[Stack]:
    """The stores on MariaDB (the production target)."""
    yield from _stack(database_url, redis_url, key_prefix)


@pytest.fixture
def any_stack(any_database_url: str, redis_url: str, key_prefix: str) -> Iterator[Stack]:
    """The test runs twice: on MariaDB, then on SQLite (embedded mode: one dispatcher process at a time). The
    core scenarios use it, so that both databases answer to one set of scenarios that cannot drift apart."""
    yield from _stack(any_database_url, redis_url, key_prefix)


def _stack(
    database_url: str, redis_url: str, key_prefix: str, rds: Any = None, *, cluster: bool = False
) -> Iterator[Stack]:
    """The stores for one test, cleaned up after it; ``rds``: a client of the test's own (a cluster's)."""
    rds = rds if rds is not None else redis.Redis.from_url(redis_url)
    engine = make_engine(database_url, pool_size=2)
    tag = uuid.uuid4().hex[:6]
    s = Stack(database_url, redis_url, key_prefix, rds, engine, queues=[f"q1-{tag}", f"q2-{tag}"])
    s.cluster = cluster
    yield s
    for proc in s.procs:
        proc.stop_quietly()
    for fleet in s.fleets:
        fleet.stop()
    for q in s.queues:
        for key in (q, f"{{{q}}}:high", f"{{{q}}}:low"):  # one by one: a cluster refuses cross-slot deletes
            rds.delete(key)
    for key in rds.scan_iter(f"{key_prefix}*"):
        rds.delete(key)
    rds.close()
    engine.dispose()


StackFactory = Callable[..., Stack]


@pytest.fixture
def cluster_stack(database_url: str, redis_cluster: Cluster, key_prefix: str) -> Iterator[Stack]:
    """A stack whose Redis is the run's Redis Cluster (REDIS_CLUSTER=true for every process it starts)."""
    yield from _stack(database_url, redis_cluster.url, key_prefix, redis_cluster.client(), cluster=True)
