"""Small helpers for dispatcher tests: building jobs, engines and waiting on conditions."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Engine

from dispatcher.db.engine import init_schema, make_engine, transaction, utcnow
from dispatcher.db.gpus import register_gpu
from producer.job import Job

T = TypeVar("T")


def job(task_type: str = "start_transcribe", queue: str = "q", **fields: object) -> Job:
    return Job(task_id=str(fields.pop("task_id", uuid.uuid4())), type=task_type, queue=queue, **fields)  # type: ignore[arg-type]


def fleet_engine(url: str, gpus: dict[str, int], pool: str = "default") -> Engine:
    engine = make_engine(url)
    init_schema(engine)
    for gpu_id, n in gpus.items():
        transaction(
            engine,
            register_gpu,
            gpu_id=gpu_id,
            url=f"http://127.0.0.1:1/{gpu_id}",
            pool=pool,
            slot_count=n,
            now=utcnow(),
        )
    return engine


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 20.0,
    interval: float = 0.02,
    what: str | Callable[[], str] = "",
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            said = what() if callable(what) else what  # a callable says how things stand at the end
            raise AssertionError(f"timed out after {timeout}s waiting for {said or predicate}")
        time.sleep(interval)
