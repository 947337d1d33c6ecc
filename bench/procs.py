"""The processes a run starts, each in its own process group with its own log file, and what /proc says.

The simulator runs as its own process (``python -m simgpu``) so that its CPU is neither the driver's nor the
system's under test; the dispatcher is the real ``python -m dispatcher``; the Celery worker is the real
``celery worker``. CPU time and peak RSS are read from /proc before a process is stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from bench.workloads import Workload

# The environment of every process a run starts, shared with the tests and the demo (dispatcher/testing.py):
# the inherited one minus every variable the dispatcher reads (a developer's DATABASE_URL must not point a
# run at a real database), the repository on PYTHONPATH.
from dispatcher.testing import process_env, stop_process

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")


class ProcError(Exception):
    """A process the benchmark needs did not start or died; the message holds the end of its log."""


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads (Linux /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mb(pid: int) -> float:
    """The process's high-water mark of resident memory (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all cores (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user/nice
    return (total - idle) / CLK_TCK, total / CLK_TCK


def pid_of(*names: str) -> int | None:
    """The first process whose command name is one of ``names`` (read only: for CPU readings)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() in names:
                    return int(entry.name)
            except OSError:
                continue
    return None


class Proc:
    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], workdir: Path) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                argv, cwd=workdir, env=dict(env), stdout=out, stderr=subprocess.STDOUT, process_group=0
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_until(self, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise ProcError(f"{self.name} exited with code {self.popen.returncode}:\n{self.tail()}")
            if ready():
                return
            time.sleep(0.05)
        raise ProcError(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise ProcError(f"{self.name} died with code {self.popen.returncode}:\n{self.tail()}")

    def stop(self, grace: float = 15.0) -> int:
        """SIGTERM (each of ours stops gracefully on it), SIGKILL after ``grace``."""
        return stop_process(self.popen, grace)


class Sim(Proc):
    """``python -m simgpu``: the workload's GPUs and slots at /g0.. on one port; stats at /_stats."""

    #: ``--cold-callbacks`` (bench's option): no callback connection opened ahead (simgpu/callbacks.py)
    cold_callbacks = False

    def __init__(
        self,
        workdir: Path,
        workload: Workload,
        *,
        mode: str,
        token: str,
        pull: str | None = None,
        agents: dict[str, str] | None = None,
    ) -> None:
        """``pull``: the GPUs are pull agents of the dispatcher at that URL, named and authenticated by
        ``agents`` (name -> agent token); their tokens go through the environment, not the command line."""
        gpus, slots, service = workload.gpus, workload.slots, workload.service
        endpoints = workdir / "endpoints"
        endpoints.unlink(missing_ok=True)  # the file says "listening": never an earlier run's
        argv = [sys.executable, "-m", "simgpu", "--port", "0", "--gpus", str(gpus), "--slots", str(slots)]
        argv += ["--service-time", f"fixed:{service:g}", "--mode", mode, f"--token={token}", "--seed", "1"]
        argv += ["--log-level", "WARNING", "--endpoints-file", str(endpoints)]
        if self.cold_callbacks:
            argv.append("--cold-callbacks")
        env: dict[str, str] = {}
        if pull is not None:
            argv += ["--pull", pull]
            env["SIMGPU_AGENTS"] = ",".join(f"{name}={t}" for name, t in (agents or {}).items())
        super().__init__(f"simgpu-{mode}", argv, process_env(env), workdir)
        self.wait_until(endpoints.exists, 30)
        self.endpoints = endpoints.read_text().strip()
        self.urls = [item.split("=", 1)[1] for item in self.endpoints.split(",")]
        self.control_url = self.urls[0].rsplit("/", 1)[0]
        self.http = httpx.Client(timeout=30)

    def stats(self, *, jobs: bool = False) -> dict[str, Any]:
        answer = self.http.get(f"{self.control_url}/_stats", params={"jobs": "1" if jobs else "0"})
        answer.raise_for_status()
        result: dict[str, Any] = answer.json()
        return result

    def stop(self, grace: float = 15.0) -> int:
        self.http.close()
        return super().stop(grace)


class Usage:
    """CPU spent from construction to ``finish()`` by the system under test (``consumer``: the dispatcher or
    the Celery worker), the simulator, Redis and MariaDB (server-wide: other users of them count too), this
    driver, and the machine as a whole (the share of all cores that was busy, whoever used it).

    Per-job figures are taken over the middle of the run, between the samples at which 10 % and 90 % of the
    jobs were done (``sample()`` is called as the run goes): the consumer's start-up (imports, schema) and
    the tail of the run do not count. Short runs with too few samples fall back to the whole run."""

    def __init__(self, consumer: int, sim: int, redis_cpu: Callable[[], float]) -> None:
        self.pids = {"consumer": consumer, "sim": sim}
        mariadb = pid_of("mariadbd", "mysqld")
        if mariadb is not None:
            self.pids["mariadb"] = mariadb
        self.redis_cpu = redis_cpu
        self.samples: list[tuple[int, dict[str, float]]] = [(0, self._read())]

    def _read(self) -> dict[str, float]:
        reading = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        busy, total = machine_cpu()
        return reading | {
            "redis": self.redis_cpu(),
            "driver": time.process_time(),
            "busy": busy,
            "total": total,
            "wall": time.monotonic(),
        }

    def sample(self, done: int) -> None:
        self.samples.append((done, self._read()))

    def finish(self, jobs: int) -> dict[str, float]:
        self.sample(jobs)
        window = [(n, r) for n, r in self.samples if jobs * 0.1 <= n <= jobs * 0.9]
        (n0, a), (n1, b) = (
            (window[0], window[-1])
            if len(window) >= 2 and window[-1][0] > window[0][0]
            else (
                self.samples[0],
                self.samples[-1],
            )
        )
        d = {key: b[key] - a[key] for key in b}
        n = n1 - n0
        per_job = {f"{name}_cpu_ms_per_job": round(d[name] / n * 1000, 3) for name in (*self.pids, "redis")}
        return {
            "consumer_cores": round(d["consumer"] / d["wall"], 3),
            **per_job,
            "driver_cpu_ms_per_job": round(d["driver"] / n * 1000, 3),
            "machine_busy": round(d["busy"] / d["total"], 3) if d["total"] else float("nan"),
            "cpu_window_jobs": n,
            "cores": float(os.cpu_count() or 1),  # what machine_busy and the CPU ceiling are shares of
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }
