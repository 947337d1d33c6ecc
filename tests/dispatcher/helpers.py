"""Small helpers for dispatcher tests: building jobs, engines, ending attempts and waiting on conditions."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Engine

from dispatcher.db.attempts import Backoff, finish_attempt
from dispatcher.db.engine import init_schema, make_engine, transaction, utcnow
from dispatcher.db.gpus import register_gpu
from dispatcher.states import Outcome
from producer.job import Job
from simgpu.testing import poll_until

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


def finish(engine: Engine, task_id: str, attempt: int = 1) -> None:
    """Attempt ``attempt`` of the task ends ``finished``, as its callback would end it."""
    transaction(
        engine,
        finish_attempt,
        task_id=task_id,
        attempt=attempt,
        outcome=Outcome.FINISHED,
        now=utcnow(),
        backoff=Backoff(base=0.0, cap=0.0),
    )


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float = 20.0,
    interval: float = 0.02,
    what: str | Callable[[], str] = "",
) -> T:
    """``simgpu.testing.poll_until`` failing the test (AssertionError); a callable ``what`` says how things
    stand at the end."""
    try:
        return poll_until(predicate, timeout, interval=interval, what=what or repr(predicate))
    except TimeoutError as exc:
        raise AssertionError(f"timed out: {exc}") from None
