"""Producer fixtures: each test gets its own key prefix, its own queue names and a clean settings cache.

The producer reads its settings once (cached ``get_settings()``) and keeps one Redis client per address,
as a warm Lambda container does; tests change the environment, so these fixtures reset both.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import enqueue
from producer.keys import Keys
from producer.password import fetch_password
from producer.settings import get_settings

PRODUCER_VARS = (
    "REDIS_URL",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_PASSWORD",
    "REDIS_DB",
    "REDIS_KEY_PREFIX",
    "REDIS_SECRET_ARN",
    "TASK_QUEUES",
    "TASK_ROUTES",
    "S3_TASK_TYPE",
)


def reset_caches() -> None:
    get_settings.cache_clear()
    fetch_password.cache_clear()
    enqueue.close_clients()


@dataclass
class ProducerEnv:
    """The environment one test's producer runs in, and a look into what it pushed."""

    monkeypatch: pytest.MonkeyPatch
    rds: redis.Redis
    prefix: str
    queues: list[str]
    pool_queue: str  # the queue TASK_ROUTES sends type "embed" to
    extra_lists: list[str] = field(default_factory=list)

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    def set(self, **env: str) -> None:
        for name, value in env.items():
            self.monkeypatch.setenv(name, value)
        reset_caches()

    def jobs(self, queue: str | None = None) -> list[dict[str, Any]]:
        raw = self.rds.lrange(queue or self.queues[0], 0, -1)
        return [json.loads(item) for item in raw]

    def all_jobs(self) -> list[dict[str, Any]]:
        lists = [*self.queues, self.pool_queue, *self.extra_lists]
        lists += [f"{{{q}}}:{p}" for q in lists for p in ("high", "low")]
        return [job for name in lists for job in self.jobs(name)]

    def marks(self) -> list[str]:
        return sorted(k.decode() for k in self.rds.scan_iter(match=f"{self.prefix}*:idem:*"))


@pytest.fixture
def producer_env(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, key_prefix: str, rds: redis.Redis
) -> Iterator[ProducerEnv]:
    for name in PRODUCER_VARS:
        monkeypatch.delenv(name, raising=False)
    tag = key_prefix.removesuffix(":").rsplit("-", 1)[-1]
    env = ProducerEnv(
        monkeypatch=monkeypatch,
        rds=rds,
        prefix=key_prefix,
        queues=[f"tq-{tag}-a", f"tq-{tag}-b"],
        pool_queue=f"tq-{tag}-embed",
    )
    env.set(
        REDIS_URL=redis_url,
        REDIS_KEY_PREFIX=key_prefix,
        TASK_QUEUES=",".join(env.queues),
        TASK_ROUTES=f"embed={env.pool_queue}",
        POWERTOOLS_LOG_LEVEL="WARNING",
    )
    yield env
    reset_caches()
    lists = [*env.queues, env.pool_queue, *env.extra_lists]
    doomed = [*lists, *(f"{{{q}}}:{p}" for q in lists for p in ("high", "low"))]
    doomed += [k.decode() for k in rds.scan_iter(match=f"{key_prefix}*")]
    rds.delete(*doomed)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it) but not listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """moto's in-memory AWS (SQS, Secrets Manager, SSM) with fake credentials: nothing leaves the box."""
    from moto import mock_aws

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        yield


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[int]:
    """A password-protected redis-server of this test's own (password ``x``), stopped afterwards."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed (make test installs it)", pytrace=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", "x", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port, password="x")
    try:
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)
        else:
            pytest.fail(f"private redis-server on port {port} did not start", pytrace=False)
        yield port
    finally:
        client.close()
        reset_caches()
        proc.terminate()
        proc.wait(timeout=10)
