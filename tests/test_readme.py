"""The README's commands run as written (issue 14: its systemd steps and model example did not).

Blocks preceded by ``<!-- readme: run -->`` run, in README order, with bash (``-eo pipefail``) from the
checkout, the venv's ``bin`` first on PATH, against this test's own Redis prefix, queue and MariaDB database
(made with ``gpuq db init`` first, as an operator would). Every ``bash`` block, run or not, must parse.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- readme: run -->"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def blocks() -> list[tuple[int, str, str, bool]]:
    """(line, language, body, marked to run) of every fenced block."""
    text = (ROOT / "README.md").read_text()
    out = []
    for m in _FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2), before.strip() == MARK))
    return out


def test_marked_blocks_are_bash():
    marked = [(line, lang) for line, lang, _, run in blocks() if run]
    assert len(marked) >= 3, marked
    assert all(lang == "bash" for _, lang in marked), marked


@pytest.mark.parametrize(("line", "body"), [(b[0], b[2]) for b in blocks() if b[1] == "bash"])
def test_bash_blocks_parse(line, body):
    res = subprocess.run(["bash", "-n"], input=body, text=True, capture_output=True, check=False)
    assert res.returncode == 0, f"README line {line}: {res.stderr}"


@pytest.mark.slow  # the README's commands in real processes (a dispatcher, the CLI, SQL)
def test_runnable_blocks_run(database_url, redis_url, key_prefix):
    queue = f"readme-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": key_prefix,
        "TASK_QUEUES": queue,
        "COLUMNS": "100",
    }
    env.pop("CALLBACK_SECRET", None)

    def bash(script: str, where: str) -> None:
        res = subprocess.run(
            ["bash", "-eo", "pipefail", "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert res.returncode == 0, (
            f"{where} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        )

    bash("gpuq db init", "setup")
    ran = 0
    for line, _, body, run in blocks():
        if run:
            bash(body, f"README block at line {line}")
            ran += 1
    assert ran >= 3
