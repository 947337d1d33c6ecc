"""REDIS_WAIT_REPLICAS on a redelivery: the 202 still means the replicas hold the job (SPEC §10).

A master and one replica of this test's own (plain ``redis-server --replicaof``); the replica is stopped with
SIGSTOP, so it stays connected (the master still counts it online) but acknowledges nothing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer import enqueue
from producer.enqueue import push
from producer.errors import QueueUnavailable
from producer.events import plan, split_payload
from producer.settings import get_settings

from .conftest import ProducerEnv


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _server(port: int, workdir: Path, *extra: str) -> subprocess.Popen[bytes]:
    workdir.mkdir()
    return subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _caught_up(master_port: int, timeout: float = 60) -> None:
    """Wait until the replica has acknowledged everything the master wrote (its offset = the master's)."""
    deadline = time.monotonic() + timeout
    with redis.Redis(port=master_port) as c:
        while True:
            info = c.info("replication")
            replica = info.get("slave0") or {}
            if isinstance(replica, dict) and int(replica.get("offset", -1)) >= int(
                info["master_repl_offset"]
            ):
                return
            assert time.monotonic() < deadline, f"the replica did not catch up: {info}"
            time.sleep(0.05)


@pytest.fixture
def master_and_replica(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """(master's port, the replica's process), the replica online."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (make test installs it)", pytrace=False)
    master_port, replica_port = _port(), _port()
    master = _server(master_port, tmp_path / "m")
    replica = _server(replica_port, tmp_path / "r", "--replicaof", "127.0.0.1", str(master_port))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with redis.Redis(port=master_port) as c:
                    if "online" in str(c.info("replication").get("slave0", "")):
                        break
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the replica did not come online", pytrace=False)
            time.sleep(0.05)
        yield master_port, replica
    finally:
        for proc in (replica, master):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait(timeout=10)
        enqueue.close_clients()


@pytest.mark.slow  # 7 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_a_redelivery_is_acknowledged_only_once_the_replicas_hold_the_job(
    producer_env: ProducerEnv, master_and_replica: tuple[int, subprocess.Popen[bytes]]
) -> None:
    master_port, replica = master_and_replica
    producer_env.set(
        REDIS_URL=f"redis://127.0.0.1:{master_port}/0",
        REDIS_WAIT_REPLICAS="1",
        REDIS_WAIT_TIMEOUT_SECONDS="0.3",
    )
    jobs = plan(split_payload({"type": "a", "task_id": "t-wait"}), get_settings())
    # GIVEN the replica acknowledges nothing: the push is written on the master but not acknowledged
    os.kill(replica.pid, signal.SIGSTOP)
    with pytest.raises(QueueUnavailable):
        push(jobs, get_settings())
    # WHEN the caller retries from another container (a new connection: WAIT there covers only what that
    # connection wrote, and the retry only finds the idempotency mark)
    enqueue.close_clients()
    # THEN it is still not acknowledged: the replica does not hold the job. Before: 202 at once, and a
    # failover to that replica lost an acknowledged job.
    with pytest.raises(QueueUnavailable) as err:
        push(jobs, get_settings())
    assert "replicas" in err.value.detail, err.value.detail
    # what the caller is told names the replicas, not an unreachable Redis (an outside trial: "unreachable",
    # and a retry as told of a task without a task_id ran it twice)
    assert "0 of 1, REDIS_WAIT_REPLICAS" in err.value.message and "unreachable" not in err.value.message
    # and once the replica is back the retry is acknowledged, the job queued once
    os.kill(replica.pid, signal.SIGCONT)
    _caught_up(master_port)  # a woken replica catches up in its own time (seconds on a loaded machine)
    enqueue.close_clients()
    result = push(jobs, get_settings())
    assert (result.task_ids, result.duplicates) == (["t-wait"], 1)
    with redis.Redis(port=master_port) as c:
        assert c.llen(producer_env.queues[0]) == 1
