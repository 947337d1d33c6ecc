"""``python -m simgpu`` as a process: it serves, logs JSON lines, and stops cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from simgpu import poll_until
from tests.simgpu.helpers import job


def start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    endpoints_file = tmp_path / "endpoints"
    proc = subprocess.Popen(
        [sys.executable, "-m", "simgpu", "--port", "0", "--endpoints-file", str(endpoints_file), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        poll_until(
            lambda: endpoints_file.exists() or proc.poll() is not None, timeout=15, what="simgpu start"
        )
    except TimeoutError:
        proc.kill()
        proc.communicate()
        raise
    assert proc.poll() is None, proc.communicate()
    text = endpoints_file.read_text().strip()
    return proc, dict(item.split("=", 1) for item in text.split(","))


def stop(proc: subprocess.Popen[str], sig: signal.Signals) -> list[dict[str, object]]:
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    return [json.loads(line) for line in stderr.splitlines()]


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.slow
def test_serves_and_stops_on_sigterm(tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    proc, endpoints = start(tmp_path, "--gpus", "2", "--mode", "sync", "--service-time", "fixed:0.01")
    procs.append(proc)

    with httpx.Client() as client:
        answer = client.post(endpoints["g1"], json=job("cli-1"))
    logs = stop(proc, signal.SIGTERM)

    assert list(endpoints) == ["g0", "g1"]
    assert answer.json()["status"] == "finished"
    actions = [line.get("action") for line in logs]
    assert actions[0] == "started"
    assert actions[-2:] == ["stopping", "stopped"]
    assert logs[0]["gpu_endpoints"] == ",".join(f"{k}={v}" for k, v in endpoints.items())
    assert logs[-1]["totals"]["received"] == 1


@pytest.mark.slow
def test_port_per_gpu_with_a_gpu_down_and_sigint(tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    proc, endpoints = start(
        tmp_path, "--gpus", "2", "--gpu-ports", "0", "--fault", "g1=down", "--token", "tk"
    )
    procs.append(proc)

    with httpx.Client() as client:
        probe = client.get(endpoints["g0"])
        with pytest.raises(httpx.ConnectError):
            client.get(endpoints["g1"])
    stop(proc, signal.SIGINT)

    assert probe.status_code == 200  # a probe needs no token
    assert endpoints["g0"].endswith("/")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--service-time", "gamma:1"], "unknown distribution 'gamma'"),
        (["--fault", "melt"], "unknown fault 'melt'"),
        (["--fault", "g7=down"], "unknown GPU"),
        (["--gpus", "0"], "gpus"),
    ],
)
def test_bad_arguments_exit_2_with_one_clear_line(args: list[str], says: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "simgpu", *args], capture_output=True, text=True, timeout=15, check=False
    )

    assert done.returncode == 2
    assert says in done.stderr
    assert "Traceback" not in done.stderr


def test_loadtest_runs_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    from simgpu import loadtest

    code = loadtest.main(["--seconds", "0.3", "--warmup", "0.1", "--concurrency", "4", "--gpus", "2"])

    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["jobs"] > 0
    assert result["errors"] == 0
