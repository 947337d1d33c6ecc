"""``python -m demo`` end to end in a subprocess, as ``make demo`` runs it: the printed tables, its exit code,
and that nothing it started outlives it (also after Ctrl-C), whether it found Redis or started its own."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from demo.__main__ import parse_args
from tests.conftest import REDIS_HOST, REDIS_PORT
from tests.dispatcher.harness import ROOT, free_port

pytestmark = pytest.mark.slow  # the demo end to end in subprocesses, Ctrl-C included

ENV = {**os.environ, "COLUMNS": "120", "PYTHONUNBUFFERED": "1"}


def _demo(*args: str, env: dict[str, str] | None = None, timeout: float = 110) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "demo", *args],
        cwd=ROOT,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _section(out: str, start: str, end: str) -> str:
    return out[out.index(start) : out.index(end, out.index(start))]


def _pids(out: str) -> dict[str, int]:
    return {m[0]: int(m[1]) for m in re.findall(r"(redis-server|python -m dispatcher) \(pid (\d+)\)", out)}


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_demo_with_its_own_redis_server_runs_every_job_and_stops_everything():
    # GIVEN no Redis on the port the demo looks at (redis-server is installed)
    # WHEN the demo runs 60 jobs
    code, out = _demo("--jobs", "60", "--redis-port", str(free_port()))
    # THEN it exits 0 having started its own redis-server and the dispatcher on embedded SQLite
    assert code == 0, out
    assert "started redis-server" in out
    assert "embedded SQLite" in out
    assert "no DATABASE_URL or DB_HOST: embedded mode on SQLite" in out  # the dispatcher's own warning
    # the seed's load query, caught mid-run: every GPU busy, none over its 4 slots
    mid = _section(out, "GPU load mid-run", "Jobs per GPU")
    assert (
        "SELECT gpu_id, COUNT(*) AS active_tasks FROM tasks WHERE state = 'processing' GROUP BY gpu_id" in mid
    )
    load = {g: int(n) for g, n in re.findall(r"│ (g\d) +│ +(\d+) │", mid)}
    assert load, mid
    assert set(load) <= {"g0", "g1", "g2", "g3"}
    assert all(0 < n <= 4 for n in load.values()), load
    # every job finished, the GPUs saw each once and never more than their slots at once
    per_gpu = _section(out, "Jobs per GPU", "Throughput")
    rows = re.findall(r"│ (g\d) +│ +(\d+) │ +(\d+) │ +(\d) / 4 │ +(\d+) │", per_gpu)
    assert len(rows) == 4, per_gpu
    assert sum(int(r[1]) for r in rows) == 60
    assert all(r[1] == r[2] and int(r[3]) <= 4 and r[4] == "0" for r in rows), rows
    figures = out[out.index("Throughput") :]
    assert re.search(r"throughput +│ +\d+ jobs/s", figures), figures
    assert re.search(r"enqueue → finish p50 / p99 +│ +\d+ / \d+ ms", figures), figures
    assert "All 60 jobs finished" in out
    # and what it started is gone: processes and its temporary directory
    pids = _pids(out)
    assert set(pids) == {"redis-server", "python -m dispatcher"}
    assert "stopped dispatcher" in out
    assert "exit code 0" in out
    assert f"stopped redis-server (pid {pids['redis-server']})" in out
    assert all(_gone(pid) for pid in pids.values())
    db = Path(re.search(r"embedded SQLite: (\S+)", out)[1])  # type: ignore[index]
    assert not db.parents[1].exists()


def test_demo_on_a_running_redis_removes_its_keys():
    code, out = _demo("--jobs", "30", "--redis-port", str(REDIS_PORT))
    assert code == 0, out
    tag = re.search(r"keys under (gpuq-demo-\w+)", out)[1]  # type: ignore[index]
    assert "started redis-server" not in out
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0)
    try:
        assert list(client.scan_iter(f"{tag}*")) == []
    finally:
        client.close()
    assert re.search(rf"removed the demo's \d+ Redis keys \({tag}\*\)", out)


def test_no_redis_and_no_redis_server_says_how_to_install_it():
    env = {**ENV, "PATH": str(Path(sys.executable).parent)}  # no redis-server on it
    code, out = _demo("--jobs", "5", "--redis-port", str(free_port()), env=env, timeout=60)
    assert code == 1
    assert "apt-get install redis-server" in out
    assert "Traceback" not in out


def test_ctrl_c_stops_everything_it_started():
    # GIVEN a long demo that is running
    proc = subprocess.Popen(
        [sys.executable, "-m", "demo", "--jobs", "20000", "--redis-port", str(free_port())],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Submitting"):
            break
    # WHEN Ctrl-C reaches it mid-run
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    out = "".join(lines) + rest
    # THEN it stops the dispatcher (gracefully), the fleet and its redis-server, and exits 130
    assert proc.returncode == 130, out
    assert "interrupted" in out
    pids = _pids(out)
    assert set(pids) == {"redis-server", "python -m dispatcher"}, out
    assert "stopped dispatcher" in out
    assert "stopped simulated fleet" in out
    assert all(_gone(pid) for pid in pids.values()), pids


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--service-time", "bogus"], "--service-time: service time 'bogus'"),  # was a simulator traceback
        (["--jobs", "0"], "must be at least 1"),
        (["--timeout", "0"], "--timeout: 0.0 s"),  # failed at once: "not done after 0 s"
        (["--timeout", "-1"], "--timeout: -1.0 s"),
        (["--redis-port", "0"], "--redis-port: 0 is no TCP port"),  # a Redis of its own, silently
        (["--redis-port", "99999"], "--redis-port: 99999 is no TCP port"),
    ],
)
def test_bad_arguments_are_one_usage_error_before_anything_starts(args, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
