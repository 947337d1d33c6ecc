"""Dispatchers sharing one database with different SLOTS_PER_GPU: the GPUs keep the slot count they were
registered with (a dispatcher never rewrites a registration, SPEC §6), and a dispatcher whose SLOTS_PER_GPU
differs used to say nothing about it. Now it warns at start naming both values, and ``/readyz`` lists it
(still ready: the dispatcher works, with the registered counts)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from dispatcher.db.gpus import list_gpus
from dispatcher.http import routes
from dispatcher.settings import DispatcherSettings
from dispatcher.testing import in_process
from tests.dispatcher.harness import BEARER, SECRET


def _settings(url: str, redis_url: str, prefix: str, slots: int) -> DispatcherSettings:
    options: dict[str, Any] = {
        "database_url": url,
        "redis_url": redis_url,
        "redis_key_prefix": prefix,
        "task_queues": f"q-{uuid.uuid4().hex[:6]}",
        "gpu_endpoints": "g0=http://127.0.0.1:9/g0,g1=http://127.0.0.1:9/g1,embed:g2=http://127.0.0.1:9/g2",
        "callback_secret": SECRET,
        "bearer_token": BEARER,
        "slots_per_gpu": slots,
        "dispatcher_id": f"t-{uuid.uuid4().hex[:6]}",
    }
    return DispatcherSettings(**options)


def test_a_dispatcher_with_another_slots_per_gpu_says_so_and_rewrites_nothing(
    any_database_url: str, redis_url: str, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> dict[str, Any]:
        async with in_process(_settings(any_database_url, redis_url, key_prefix, 4)) as first:
            assert first.warnings == {}
        caplog.clear()
        # WHEN a second dispatcher starts on the same database with SLOTS_PER_GPU=8
        with caplog.at_level(logging.WARNING):
            async with in_process(_settings(any_database_url, redis_url, key_prefix, 8)) as second:
                answer = await routes.readyz(second, SimpleNamespace(redis=second.redis))
                gpus = await second.db(list_gpus)
                return {
                    "warnings": second.warnings,
                    "ready": answer,
                    "slots": {g.gpu_id: g.slots for g in gpus},
                }

    seen = asyncio.run(main())
    # THEN it warns at start, naming both values and the GPUs
    [line] = [r.getMessage() for r in caplog.records if "SLOTS_PER_GPU" in r.getMessage()]
    assert "SLOTS_PER_GPU=8" in line and "4 slots" in line and "g0" in line and "g2" in line, line
    # AND /readyz lists it while staying ready
    assert seen["ready"].status_code == 200
    body = orjson.loads(seen["ready"].body)
    assert body["status"] == "ready" and "SLOTS_PER_GPU=8" in body["problems"]["slots_per_gpu"], body
    # AND the GPUs keep the slots they were registered with
    assert seen["slots"] == {"g0": 4, "g1": 4, "g2": 4}
