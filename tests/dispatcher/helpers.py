"""Small helpers for dispatcher tests: building jobs, engines, ending attempts and waiting on conditions."""

from __future__ import annotations

import asyncio
import random
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import pymysql
from sqlalchemy import Connection, Engine, text

from dispatcher.db.attempts import Backoff, Finish, finish_attempt
from dispatcher.db.dispatch import DispatchResult, dispatch
from dispatcher.db.engine import init_schema, make_engine, transaction, utcnow
from dispatcher.db.gpus import register_gpu
from dispatcher.db.handoff import HandOff, end_and_hand_off
from dispatcher.db.hot import HotThread
from dispatcher.states import Outcome
from producer.job import Job
from simgpu.testing import poll_until
from tests.conftest import MYSQL_HOST, MYSQL_PASSWORD, MYSQL_PORT, MYSQL_USER

T = TypeVar("T")


def job(task_type: str = "start_transcribe", queue: str = "q", **fields: object) -> Job:
    return Job(task_id=str(fields.pop("task_id", uuid.uuid4())), type=task_type, queue=queue, **fields)  # type: ignore[arg-type]


def fleet_engine(url: str, gpus: dict[str, int], pool: str = "default") -> Engine:
    engine = make_engine(url)
    init_schema(engine)
    for gpu_id, n in gpus.items():
        add_gpu(engine, gpu_id, n, pool=pool)
    return engine


@contextmanager
def fleet(url: str, gpus: dict[str, int], pool: str = "default") -> Iterator[Engine]:
    """``fleet_engine`` for a fixture: the engine is disposed when the test is done, failed or not."""
    engine = fleet_engine(url, gpus, pool)
    try:
        yield engine
    finally:
        engine.dispose()


def add_gpu(
    engine: Engine,
    gpu_id: str,
    slots: int,
    *,
    url: str | None = None,
    pool: str = "default",
    now: datetime | None = None,
) -> None:
    """A GPU joins the fleet (as ``gpuq gpu add`` would), at ``url`` (a closed port unless said), at ``now``
    (the present unless said: a test on the dispatcher's clock passes ``d.now()``)."""
    transaction(
        engine,
        register_gpu,
        gpu_id=gpu_id,
        url=url or f"http://127.0.0.1:1/{gpu_id}",
        pool=pool,
        slot_count=slots,
        now=now or utcnow(),
    )


#: Retries due at once: what a store test wants unless it is about the backoff.
NO_BACKOFF = Backoff(base=0.0, cap=0.0)


def end_attempt(
    engine: Engine,
    task_id: str,
    attempt: int = 1,
    outcome: Outcome = Outcome.FINISHED,
    *,
    now: datetime | None = None,
    backoff: Backoff = NO_BACKOFF,
    **more: Any,
) -> Finish:
    """Attempt ``attempt`` of the task ends with ``outcome`` (finished unless said), as its callback or its
    lease would end it: ``finish_attempt`` in a transaction of its own, at ``now`` (the present unless said);
    ``more``: its result, error, reported status."""
    return transaction(
        engine,
        finish_attempt,
        task_id=task_id,
        attempt=attempt,
        outcome=outcome,
        now=now or utcnow(),
        backoff=backoff,
        **more,
    )


def place(
    engine: Engine,
    jobs: list[Job],
    pool: str = "default",
    *,
    dispatcher_id: str = "d",
    max_attempts: int = 1,
    now: datetime | None = None,
    lease_seconds: float = 60,
    **more: Any,
) -> DispatchResult:
    """The store's side of a dispatch pass for ``jobs`` (one slot each, least-loaded first), in a transaction
    of its own, with a 60 s lease unless said; ``more``: ``check_existing`` and the like."""
    return transaction(
        engine,
        dispatch,
        items=[(j, pool) for j in jobs],
        dispatcher_id=dispatcher_id,
        lease_seconds=lease_seconds,
        max_attempts=max_attempts,
        now=now or utcnow(),
        **more,
    )


@contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` answering on a free loopback port, in a thread; yields its base URL, shut down after."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


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


def start(engine: Engine, ids: list[str]) -> None:
    """Puts one job of type ``t`` per id on the fleet (dispatcher ``d1``, 600 s lease, 3 attempts) and fails
    unless every one got a slot: the hand-off tests build on all of them running."""
    res = place(
        engine, [job("t", task_id=i) for i in ids], dispatcher_id="d1", max_attempts=3, lease_seconds=600
    )
    assert sorted(p.job.task_id for p in res.placed) == sorted(ids)


def hand_off(conn: Any, items: list[dict[str, Any]], candidates: list[str], **more: Any) -> HandOff:
    """One group-commit batch as ``HandOffs.end_many`` sends it, with the settings ``start`` used: ``items``
    end their attempts and ``candidates`` (jobs of type ``t`` in pool ``default``) wait for the freed slots;
    ``more``: ``fold`` and the like."""
    return end_and_hand_off(
        conn,
        items=items,
        now=utcnow(),
        backoff=Backoff(),
        candidates=[(job("t", task_id=c), "default") for c in candidates],
        check_existing=False,
        dispatcher_id="d1",
        lease_seconds=600,
        max_attempts=3,
        rng=random.Random(1),
        **more,
    )


def finished(task_id: str, attempt: int = 1) -> dict[str, Any]:
    """The ``finished`` callback of ``task_id``'s attempt, as the group commit hands it to a batch."""
    return {
        "task_id": task_id,
        "attempt": attempt,
        "outcome": Outcome.FINISHED,
        "result": None,
        "error": None,
        "reported": "finished",
    }


def on_hot_thread(engine: Engine, fn: Callable[[Connection], T], workers: int = 1) -> tuple[T, int]:
    """``fn`` in one transaction on a hot thread, as the group commit runs a batch (its last pipeline may
    send the COMMIT); its result and the round trips it took."""

    async def main() -> tuple[T, int]:
        thread = HotThread(engine, workers=workers)
        thread.start()
        try:
            return await thread.run(fn), thread.last_round_trips
        finally:
            await thread.close()

    return asyncio.run(main())


def slot_holders(engine: Engine) -> dict[tuple[str, int], str | None]:
    """Who holds each slot: (gpu_id, slot_index) -> task_id or None."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT gpu_id, slot_index, task_id FROM slots")).all()
    return {(r.gpu_id, int(r.slot_index)): r.task_id for r in rows}


def kill_connection(conn_id: int) -> None:
    """Kills MariaDB connection ``conn_id`` from an admin connection of its own, as a server restart or a
    network cut would look to its owner."""
    admin = pymysql.connect(
        host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, password=MYSQL_PASSWORD, autocommit=True
    )
    try:
        with admin.cursor() as cur:
            cur.execute(f"KILL CONNECTION {int(conn_id)}")
    finally:
        admin.close()
