"""Pull GPUs (SPEC §9): real dispatcher processes, simulated GPUs and the reference MiniLM service running
as agents, MariaDB and Redis; helpers to register pull GPUs and call the agents' endpoint."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import Engine

from dispatcher.db.agents import register_pull
from dispatcher.db.engine import init_schema, transaction, utcnow
from tests.dispatcher.conftest import stack  # noqa: F401 - the fixture, shared
from tests.operators.conftest import gpuq, gpuq_env  # noqa: F401 - the fixtures, shared
from tests.reference.conftest import service  # noqa: F401 - the reference service fixture's module


def add_pull(engine: Engine, gpu_id: str, pool: str = "default", slots: int = 4) -> str:
    """What ``gpuq gpu add NAME --pull`` does; returns the agent token."""
    init_schema(engine)
    token = transaction(engine, register_pull, gpu_id=gpu_id, pool=pool, slot_count=slots, now=utcnow())
    assert token is not None
    return token


def poll(base: str, gpu_id: str, token: str | None, body: Any = None, timeout: float = 40) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.post(
        f"{base}/agents/{gpu_id}/jobs",
        json={"max": 4, "wait_seconds": 0} if body is None else body,
        headers=headers,
        timeout=timeout,
    )
