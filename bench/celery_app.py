"""The Celery baseline, written as a user of Celery would write it for a fleet of GPU services.

One worker, ``--pool threads --concurrency <total slots>``: one thread per GPU slot. Prefork with 64
processes does not fit 2 cores and 64 interpreters' memory, and the task is I/O bound (it waits on the GPU),
which is what the threads pool is for; gevent would need monkey-patching ``requests``. Each task takes a
GPU slot from an in-process pool (a queue holding each GPU's URL ``slots`` times), POSTs the job to the GPU
synchronously (the simulator in sync mode answers when the job is done) and gives the slot back; with
concurrency equal to the slot count no task ever waits for one. Broker: Redis; ``acks_late`` and
``worker_prefetch_multiplier = 1``, the documented settings for long tasks that must not be lost; no result
backend (gpuq stores every result in MariaDB, so this makes Celery's job lighter, not heavier).

The worker reads its settings from ``BENCH_CELERY_*`` variables when it imports this module
(``celery -A bench.celery_app worker``); the driver calls ``configure()`` instead.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Any

import requests
from celery import Celery
from celery.signals import worker_ready

app = Celery("bench")
TASK = "bench.gpu_job"

_local = threading.local()
_slots: list[queue.Queue[str]] = []  # the one pool, made on the first task (the worker knows its GPUs then)
_slots_lock = threading.Lock()


def configure(broker_url: str) -> None:
    app.conf.update(
        broker_url=broker_url,
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
    )


def _slot_pool() -> queue.Queue[str]:
    with _slots_lock:
        if not _slots:
            pool: queue.Queue[str] = queue.Queue()
            urls = os.environ["BENCH_CELERY_GPUS"].split(",")
            for _ in range(int(os.environ["BENCH_CELERY_SLOTS"])):
                for url in urls:
                    pool.put(url)
            _slots.append(pool)
        return _slots[0]


def _session() -> requests.Session:
    """One keep-alive session per worker thread (a Session is not thread-safe)."""
    session: requests.Session | None = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
        session.headers["Authorization"] = f"Bearer {os.environ['BENCH_CELERY_TOKEN']}"
    return session


@app.task(name=TASK, acks_late=True, ignore_result=True)  # type: ignore[untyped-decorator]
def gpu_job(task_id: str, data: dict[str, Any]) -> None:
    slots = _slot_pool()
    url = slots.get()
    try:
        body = {"task_id": task_id, "type": "bench", "data": data, "attempt": 1}
        answer = _session().post(url, json=body, timeout=60)
        answer.raise_for_status()
        if answer.json().get("status") != "finished":
            raise RuntimeError(f"GPU answered {answer.text[:200]}")
    finally:
        slots.put(url)


@worker_ready.connect  # type: ignore[untyped-decorator]
def _announce(**_: Any) -> None:
    ready = os.environ.get("BENCH_CELERY_READY_FILE")
    if ready:
        Path(ready).write_text("ready\n")


if os.environ.get("BENCH_CELERY_BROKER"):
    configure(os.environ["BENCH_CELERY_BROKER"])
