"""``python -m bench --smoke`` in a subprocess, as ``make bench-smoke`` (and so ``make test``) runs it: the
result file's shape, and that every run was sound (each job ran once, no GPU over its slots). Timings are
not checked: this machine is shared, and the smoke's numbers are too small to mean anything."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dispatcher.harness import ROOT

pytestmark = pytest.mark.slow  # the benchmark's workloads, gpuq and Celery

# Bench-only dependencies (bench/requirements.txt), which `make test` does not install.
HAS_CELERY = importlib.util.find_spec("celery") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.mark.timeout(260)  # three workloads (one of them starts three dispatchers), twice with Celery
def test_smoke_run_writes_sound_results_for_each_system_and_workload(tmp_path: Path) -> None:
    # GIVEN the real Redis and MariaDB (the bench claims a Redis db and creates a database of its own)
    argv = [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)]
    if not HAS_CELERY:
        argv.append("--no-celery")
    # WHEN the smoke benchmark runs
    proc = subprocess.run(
        argv,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = proc.stdout + proc.stderr
    # THEN it exits 0 and prints the comparison table
    assert proc.returncode == 0, out
    assert "dispatch latency p50, ms" in out
    assert "overhead-bound throughput, jobs/s" in out
    # and writes one JSON file (and the Markdown summary, and the plot when matplotlib is there)
    [result_file] = tmp_path.glob("*.json")
    assert result_file.with_suffix(".md").exists()
    assert result_file.with_suffix(".png").exists() == HAS_MATPLOTLIB
    data = json.loads(result_file.read_text())
    meta = data["meta"]
    assert meta["machine"]["nproc"] >= 1
    assert meta["machine"]["cpu_model"]
    assert "--smoke" in meta["command"]
    assert [w["name"] for w in meta["workloads"]] == ["efficiency", "three", "overhead", "pull"]
    systems = {"gpuq", "celery"} if HAS_CELERY else {"gpuq"}
    assert set(data["runs"]) == systems
    for system in systems:
        for workload in ("efficiency", "three", "overhead", "pull"):
            if system != "gpuq" and workload in ("three", "pull"):  # several dispatchers, agents: gpuq only
                assert workload not in data["runs"][system]
                continue
            run = data["runs"][system][workload]
            where = f"{system}/{workload}"
            assert run["oversubscriptions"] == 0, where
            assert run["slot_anomalies"] == 0, where
            assert run["duplicates"] == 0, where
            assert run["unknown_jobs"] == 0, where
            assert run["completed"] == run["jobs"] > 0, where
            for key in ("dispatch_latency_ms", "turnaround_ms"):
                figures = run[key]
                assert figures["n"] > 0, where
                assert 0 <= figures["p50"] <= figures["p99"] <= figures["max"], where
            assert run["makespan_s"] > 0, where
            assert run["jobs_per_s"] > 0, where
            assert run["consumer_cpu_ms_per_job"] > 0, where
            assert run["peak_rss_mb"] > 0, where
            assert run["consumer_exit_code"] == 0, where
        assert 0 < data["runs"][system]["efficiency"]["efficiency"] <= 1, system
    # every gpuq job is recorded as finished in the database, exactly once
    for workload in ("efficiency", "three", "overhead", "pull"):
        run = data["runs"]["gpuq"][workload]
        assert run["db_states"] == {"finished": run["jobs"]}
        assert run["db_commits_per_job"] > 0
    # the live run's last job is of high priority: how far it was overtaken is measured
    assert data["runs"]["gpuq"]["efficiency"]["priority_inversion_jobs"] >= 0
    if HAS_CELERY:
        assert meta["speedup_vs_celery"] > 0
