"""Operating with ``gpuq`` where it used to fail (issue 14): Redis down, the systemd env file, an installed
package without a checkout's sql/."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.dispatcher.harness import ROOT, free_port
from tests.operators.test_cli import stores  # noqa: F401 - the fixture, shared


@pytest.mark.slow  # 3 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_status_with_redis_down_still_shows_the_gpus(gpuq, stores):  # noqa: F811
    res = gpuq("status", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert res.exit_code == 3, res
    assert "pool default" in res.stdout and "g0" in res.stdout and "pool embed" in res.stdout
    assert "queues unknown: Redis is unreachable" in res.stdout
    assert res.stderr.startswith("gpuq: Redis at 127.0.0.1:") and res.stderr.count("\n") == 1


@pytest.mark.slow  # 4 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_env_file_replaces_dot_env(gpuq, gpuq_env, stores, tmp_path):  # noqa: F811
    env_file = tmp_path / "dispatcher.env"
    env_file.write_text(f"DATABASE_URL={gpuq_env['DATABASE_URL']}\n")
    # the shell has no DATABASE_URL (empty counts as unset): without the file gpuq would use SQLite
    res = gpuq("--env-file", str(env_file), "gpu", "list", DATABASE_URL="")
    assert res.exit_code == 0 and "g1" in res.stdout, res
    res = gpuq("gpu", "list", DATABASE_URL="", GPUQ_ENV_FILE=str(env_file))
    assert res.exit_code == 0 and "g1" in res.stdout, res
    missing = gpuq("--env-file", str(tmp_path / "nope.env"), "gpu", "list")
    assert missing.exit_code == 2 and "no such file" in missing.stderr


@pytest.mark.slow  # 6 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_the_wheel_carries_the_operator_queries(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("gpuq-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = zf.read("dispatcher/cli/queries.sql").decode()
    assert shipped == (Path(ROOT) / "sql" / "queries.sql").read_text()


@pytest.mark.slow  # 4 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_tables_fit_80_columns_and_shorten_ids_in_the_middle(gpuq, stores):  # noqa: F811
    url = "http://gpu-host-with-a-long-name.internal.example.com:9000/v1/models/whisper-large/infer"
    assert gpuq("gpu", "add", "g7", url, "--no-probe").exit_code == 0
    res = gpuq("gpu", "list", COLUMNS="80")
    assert res.exit_code == 0, res
    lines = res.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), res.stdout
    (row,) = [line for line in lines if "g7" in line]
    assert "http://" in row and "…" in row and "infer" in row  # both ends of the URL kept
