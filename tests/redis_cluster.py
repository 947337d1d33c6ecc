"""A real Redis Cluster on loopback for the suite: 3 masters and 3 replicas started from ``redis-server``.

Session-scoped (forming a cluster takes a few seconds) and torn down at the end; skipped with its reason
only when ``redis-server`` or ``redis-cli`` is not installed. The ports are picked free at start. Tests that
kill a master (failover) get the node handles to do it and restart it afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

_NODES = 6
_FORM_SECONDS = 60.0


def _until(done: Callable[[], bool], timeout: float, failure: str) -> None:
    """Ask ``done`` every 0.2 s (a node still forming may refuse: that is "not yet") until it says yes;
    RuntimeError(``failure``) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if done():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(failure)
        time.sleep(0.2)


@dataclass
class Node:
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000",
                "--appendonly", "no",
                "--save", "",
                "--dir", str(self.workdir),
                "--logfile", "redis.log",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def kill(self) -> None:
        """kill -9: no chance to hand anything over."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def role(self) -> str:
        with self.client() as c:
            return str(c.execute_command("ROLE")[0], "ascii")


@dataclass
class Cluster:
    nodes: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def client(self) -> RedisCluster:
        return RedisCluster.from_url(self.url)

    def wait_ok(self, timeout: float = _FORM_SECONDS) -> None:
        """Until every live node says the cluster is ok (all slots served)."""

        def ok() -> bool:
            states = []
            for n in self.nodes:
                if n.proc is not None and n.proc.poll() is None:
                    with n.client() as c:
                        info = c.execute_command("CLUSTER INFO")
                        if isinstance(info, dict):  # parsed by redis-py
                            states.append(str(info.get("cluster_state")) == "ok")
                        else:
                            states.append("cluster_state:ok" in str(info))
            return bool(states) and all(states)

        _until(ok, timeout, "the Redis cluster did not become ok")

    def wait_replicated(self, timeout: float = _FORM_SECONDS) -> None:
        """Until every live master has an online replica (WAIT 1 would time out before that)."""

        def replicated() -> bool:
            masters = [n for n in self.nodes if n.alive() and n.role() == "master"]
            synced = []
            for n in masters:
                with n.client() as c:
                    info = c.info("replication")
                synced.append(
                    any(str(v).find("online") >= 0 for k, v in info.items() if k.startswith("slave"))
                )
            return len(masters) == _NODES // 2 and all(synced)

        _until(replicated, timeout, "the Redis cluster's replicas did not come online")

    def master_of(self, key: str) -> Node:
        with self.client() as c:
            node = c.get_node_from_key(key)
            port = int(node.port)
        return next(n for n in self.nodes if n.port == port)


def _free_ports(count: int) -> list[int]:
    """Ports free now whose cluster bus port (+10000) is free too."""
    ports: list[int] = []
    candidate = 17100 + (os.getpid() % 200) * 20
    while len(ports) < count and candidate < 40000:
        if all(_is_free(p) for p in (candidate, candidate + 10000)):
            ports.append(candidate)
        candidate += 1
    return ports


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_cluster(root: Path) -> Cluster:
    cluster = Cluster([Node(p, root / str(p)) for p in _free_ports(_NODES)])
    try:
        for node in cluster.nodes:
            node.start()
        _form(cluster)
    except BaseException:
        for node in cluster.nodes:
            node.kill()
        raise
    return cluster


def _form(cluster: Cluster) -> None:
    def answering() -> bool:
        for node in cluster.nodes:
            with node.client() as c:
                c.ping()
        return True

    _until(answering, 20, "the Redis cluster's nodes did not answer")
    subprocess.run(
        [
            "redis-cli",
            "--cluster",
            "create",
            *(f"127.0.0.1:{n.port}" for n in cluster.nodes),
            "--cluster-replicas",
            "1",
            "--cluster-yes",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    cluster.wait_ok()
    cluster.wait_replicated()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Cluster]:
    """A 3 masters + 3 replicas Redis Cluster of this run's own."""
    if not shutil.which("redis-server") or not shutil.which("redis-cli"):
        pytest.skip("redis-server / redis-cli not installed: cannot start a Redis Cluster")
    root = Path(tempfile.mkdtemp(prefix="gpuq-cluster-"))
    cluster = start_cluster(root)
    try:
        yield cluster
    finally:
        for node in cluster.nodes:
            node.kill()
        shutil.rmtree(root, ignore_errors=True)
