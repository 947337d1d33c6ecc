"""Operators' surface tests reuse the dispatcher scenarios' ``stack`` (real dispatchers, a simulated fleet,
MariaDB and Redis) and add a CLI runner wired to the same stores."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from typer.testing import CliRunner

from dispatcher.cli import app
from tests.dispatcher.conftest import stack  # noqa: F401 - the fixture, shared

Gpuq = Callable[..., "Result"]


class Result:
    def __init__(self, exit_code: int, stdout: str, stderr: str) -> None:
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr

    def __repr__(self) -> str:
        return f"<exit {self.exit_code}\nstdout: {self.stdout}\nstderr: {self.stderr}>"


@pytest.fixture
def gpuq_env(
    database_url: str, redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """The environment an operator's shell would have: stores and queues, and no CALLBACK_SECRET."""
    monkeypatch.delenv("CALLBACK_SECRET", raising=False)
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": key_prefix,
        "TASK_QUEUES": f"{key_prefix}qa,{key_prefix}qb",
        "TASK_ROUTES": "",
        "COLUMNS": "160",
    }


@pytest.fixture
def gpuq(gpuq_env: dict[str, str]) -> Callable[..., Result]:
    """Run ``gpuq ARGS`` in-process (typer's CliRunner) against this test's stores."""
    runner = CliRunner()

    def run(*args: str, **env: str) -> Result:
        res = runner.invoke(app, list(args), env={**gpuq_env, **env}, catch_exceptions=False)
        return Result(res.exit_code, res.stdout, res.stderr)

    return run
