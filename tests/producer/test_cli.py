"""`python -m producer`: the seed's `python producer.py`, run as a user would (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ProducerEnv
from .helpers import EVENTS


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow  # 3 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_a_task_on_the_command_line(producer_env: ProducerEnv, tmp_path: Path) -> None:
    # GIVEN the seed's single-task event as an argument WHEN run THEN the answer on stdout, exit 0
    proc = run(tmp_path, json.dumps({"type": "send_email", "data": {"user_id": 123}}))
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert [j["task_id"] for j in producer_env.jobs()] == answer["task_ids"]


def test_an_event_file_with_a_bad_record_exits_1_and_logs_to_stderr(
    producer_env: ProducerEnv, tmp_path: Path
) -> None:
    proc = run(tmp_path, "--file", str(EVENTS / "sqs_mixed.json"))
    assert proc.returncode == 1
    assert json.loads(proc.stdout) == {
        "batchItemFailures": [{"itemIdentifier": "db37c0e4-0c7a-4b0a-a1c5-0b6a8b2a1f00"}]
    }
    assert '"reason":"type: Field required"' in proc.stderr
    assert len(producer_env.jobs()) == 4


@pytest.mark.slow  # 4 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_settings_come_from_dot_env_too(producer_env: ProducerEnv, tmp_path: Path) -> None:
    # GIVEN TASK_QUEUES only in ./.env (the environment has none)
    producer_env.monkeypatch.delenv("TASK_QUEUES")
    (tmp_path / ".env").write_text(f"TASK_QUEUES={producer_env.queues[1]}\n")
    proc = run(tmp_path, '{"type": "cleanup", "data": {"user_id": 789}}')
    assert proc.returncode == 0, proc.stderr
    assert [j["type"] for j in producer_env.jobs(producer_env.queues[1])] == ["cleanup"]


def test_unreadable_input_exits_2(producer_env: ProducerEnv, tmp_path: Path) -> None:
    assert run(tmp_path, "{not json").returncode == 2
    proc = run(tmp_path, "--file", str(tmp_path / "missing.json"))
    assert proc.returncode == 2
    assert "cannot read the event" in proc.stderr


@pytest.mark.slow  # 4 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_redis_down_exits_1_with_the_error(
    producer_env: ProducerEnv, tmp_path: Path, closed_port: int
) -> None:
    producer_env.monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{closed_port}/0")
    proc = run(tmp_path, "--file", str(EVENTS / "s3_put.json"))
    assert proc.returncode == 1
    assert json.loads(proc.stdout) == {"error": "The job queue (Redis) is unreachable."}
