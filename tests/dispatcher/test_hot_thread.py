"""The hot path's database thread (``dispatcher/db/hot.py``): its connection killed mid-transaction is opened
again and the transaction run again, once; errors go to the caller and the thread lives on; a store that stays
down is ``StoreUnavailable`` (the callback's 503), never a hang; the ``STATEMENTS_DONE`` cue comes once per
transaction, as its last round trip goes out, and a late cue never releases the next batch's turn. Real
MariaDB (``KILL``) and SQLite.

Deterministic: the kill happens inside the transaction, between its two statements, from the thread itself
(through a second connection), so there is no timing to win or lose.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, text

from dispatcher.db.engine import StoreUnavailable, make_engine
from dispatcher.db.hot import STATEMENTS_DONE, HotThread
from dispatcher.db.pipeline import pipeline
from dispatcher.loop.group_commit import GroupCommit
from tests.dispatcher.helpers import kill_connection


@pytest.fixture
def engine(any_database_url: str) -> Iterator[Engine]:
    e = make_engine(any_database_url, pool_size=2)
    with e.begin() as conn:
        conn.execute(text("CREATE TABLE counter (id INT PRIMARY KEY, n INT NOT NULL)"))
        conn.execute(text("INSERT INTO counter VALUES (1, 0)"))
    yield e
    e.dispose()


def _count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT n FROM counter WHERE id = 1")).scalar_one())


class Bump:
    """A transaction of two statements; the first time it runs, its own connection is killed between them."""

    def __init__(self, kill: bool) -> None:
        self.kill = kill
        self.runs = 0
        self.threads: set[str] = set()

    def __call__(self, conn: Connection) -> int:
        self.runs += 1
        self.threads.add(threading.current_thread().name)
        conn.execute(text("UPDATE counter SET n = n + 1 WHERE id = 1"))
        if self.kill and self.runs == 1:
            kill_connection(int(conn.execute(text("SELECT CONNECTION_ID()")).scalar_one()))
        return int(conn.execute(text("SELECT n FROM counter WHERE id = 1")).scalar_one())


def test_a_connection_killed_mid_transaction_is_replaced_and_the_work_runs_again_once(
    engine: Engine, any_database_url: str
) -> None:
    kill = any_database_url.startswith("mysql")

    async def main() -> None:
        hot = HotThread(engine)
        hot.start()
        try:
            bump = Bump(kill=kill)
            assert await hot.run(bump) == 1  # the killed run was rolled back: counted once
            assert bump.runs == (2 if kill else 1)
            assert bump.threads == {"gpuq-db-hot"}
            assert hot.reconnects == (1 if kill else 0)
            assert await hot.run(Bump(kill=False)) == 2  # and the new connection serves the next one
        finally:
            await hot.close()

    asyncio.run(main())
    assert _count(engine) == 2


def test_an_error_goes_to_its_caller_and_the_thread_serves_the_next_transaction(engine: Engine) -> None:
    def broken(conn: Connection) -> None:
        conn.execute(text("UPDATE counter SET n = n + 100 WHERE id = 1"))
        raise ValueError("a bug in one store function")

    async def main() -> None:
        hot = HotThread(engine)
        hot.start()
        try:
            with pytest.raises(ValueError, match="a bug"):
                await hot.run(broken)
            assert await hot.run(Bump(kill=False)) == 1  # the +100 was rolled back
        finally:
            await hot.close()
        # closed: work still runs (through a worker thread), nobody waits on a dead queue
        assert await hot.run(Bump(kill=False)) == 2

    asyncio.run(main())


def test_a_store_that_stays_down_is_store_unavailable_not_a_hang() -> None:
    down = make_engine("mysql+pymysql://root@127.0.0.1:1/nothing", pool_size=1)

    def never(conn: Connection) -> None:
        raise AssertionError("no connection should have been made")

    async def main() -> None:
        hot = HotThread(down, attempts=2)
        hot.start()
        try:
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(hot.run(never), 60)
        finally:
            await hot.close()

    asyncio.run(main())
    down.dispose()


def test_two_workers_run_two_transactions_at_once_and_a_killed_one_runs_again(
    engine: Engine, any_database_url: str
) -> None:
    """COMMIT_PIPELINE 2: the second transaction runs while the first is still open (the first waits inside
    its transaction for the second to have run: with one thread it would wait in vain and return False);
    the first's connection is then killed before its COMMIT, and it runs again on a new connection while
    the other thread's connection lives on."""
    if not any_database_url.startswith("mysql"):
        pytest.skip("SQLite takes one writer: one thread (test_sqlite_gets_one_hot_thread_whatever_is_asked)")
    second_ran = threading.Event()

    class First:
        def __init__(self) -> None:
            self.runs = 0

        def __call__(self, conn: Connection) -> bool:
            self.runs += 1
            conn.execute(text("UPDATE counter SET n = n + 1 WHERE id = 1"))
            overlapped = second_ran.wait(60)
            if self.runs == 1:
                kill_connection(int(conn.execute(text("SELECT CONNECTION_ID()")).scalar_one()))
            return overlapped

    def second(conn: Connection) -> None:
        conn.execute(text("INSERT INTO counter VALUES (2, 1)"))  # another row: no lock of the first's
        second_ran.set()

    async def main() -> None:
        hot = HotThread(engine, workers=2)
        assert hot.workers == 2
        hot.start()
        try:
            first = First()
            overlapped = asyncio.create_task(hot.run(first))
            await asyncio.sleep(0)
            await hot.run(second)
            assert await overlapped is True
            assert first.runs == 2
            assert hot.reconnects == 1
        finally:
            await hot.close()

    asyncio.run(main())
    assert _count(engine) == 1  # the killed run rolled back, the rerun counted once


def test_sqlite_gets_one_hot_thread_whatever_is_asked(sqlite_database_url: str) -> None:
    e = make_engine(sqlite_database_url)
    assert HotThread(e, workers=4).workers == 1
    e.dispose()


def test_statements_done_is_signalled_before_the_answer_and_not_for_a_failed_transaction(
    engine: Engine,
) -> None:
    """The group commit's cue to start its next batch (``STATEMENTS_DONE``): called on the caller's loop
    once the function returned (its COMMIT going out), ahead of the answer; never when it raised."""

    def broken(conn: Connection) -> None:
        raise ValueError("a bug")

    async def main() -> list[str]:
        seen: list[str] = []
        hot = HotThread(engine)
        hot.start()
        try:
            token = STATEMENTS_DONE.set(lambda: seen.append("statements done"))
            try:
                await hot.run(Bump(kill=False))
                seen.append("answered")
                with pytest.raises(ValueError, match="a bug"):
                    await hot.run(broken)
            finally:
                STATEMENTS_DONE.reset(token)
            await hot.run(Bump(kill=False))  # nobody asked: nothing called
        finally:
            await hot.close()
        return seen

    assert asyncio.run(main()) == ["statements done", "answered"]


def test_statements_done_is_signalled_as_a_committing_pipeline_goes_out(engine: Engine) -> None:
    """When the transaction's last round trip carries its COMMIT (``pipeline(commit=True)``), the cue goes
    as that round trip is sent, not after its answer: with ``COMMIT_PIPELINE`` > 1 the next batch runs its
    statements meanwhile. The round trip waits for a lock the test releases only on the cue; had the cue
    come after the answer, the lock wait would time out (GET_LOCK gives 0) and the counter stay at 0."""
    if engine.dialect.name == "sqlite":
        pytest.skip("one statement per query on SQLite: no committing pipeline")
    held = engine.connect()
    assert held.execute(text("SELECT GET_LOCK('gpuq_test_cue', 0)")).scalar_one() == 1
    bump = text("UPDATE counter SET n = n + GET_LOCK('gpuq_test_cue', 10) WHERE id = 1")

    def waits_for_the_cue(conn: Connection) -> None:
        pipeline(conn, [(bump, {})], commit=True)

    def cue() -> None:
        seen.append("statements done")
        held.execute(text("SELECT RELEASE_LOCK('gpuq_test_cue')"))

    async def main() -> None:
        hot = HotThread(engine)
        hot.start()
        try:
            token = STATEMENTS_DONE.set(cue)
            try:
                await hot.run(waits_for_the_cue)
                seen.append("answered")
            finally:
                STATEMENTS_DONE.reset(token)
        finally:
            await hot.close()

    seen: list[str] = []
    try:
        asyncio.run(main())
    finally:
        held.close()
    assert seen == ["statements done", "answered"]
    assert _count(engine) == 1  # the lock was had while the round trip ran, and the pipeline committed it


def test_a_transaction_rerun_after_its_committing_round_trip_was_lost_cues_once(engine: Engine) -> None:
    """The committing pipeline's connection is killed from the cue itself (after the cue, before the answer):
    the hot thread reconnects and runs the function again, which must not cue a second time (it did, once per
    attempt, when the cue was made inside the retry loop). The transaction commits once."""
    if engine.dialect.name == "sqlite":
        pytest.skip("the connection is killed: MariaDB")
    runs: list[int] = []
    cues: list[str] = []

    def fn(conn: Connection) -> int:
        runs.append(int(conn.execute(text("SELECT CONNECTION_ID()")).scalar_one()))
        stall = "SLEEP(3)" if len(runs) == 1 else "0"
        pipeline(conn, [(text(f"UPDATE counter SET n = n + 1 + {stall} WHERE id = 1"), {})], commit=True)
        return len(runs)

    def cue() -> None:
        cues.append("cue")
        if len(cues) == 1:
            kill_connection(runs[0])

    async def main() -> int:
        hot = HotThread(engine)
        hot.start()
        try:
            token = STATEMENTS_DONE.set(cue)
            try:
                return await hot.run(fn)
            finally:
                STATEMENTS_DONE.reset(token)
        finally:
            await hot.close()

    assert asyncio.run(main()) == 2
    assert len(cues) == 1  # once per transaction
    assert _count(engine) == 1


def test_a_second_cue_of_a_batch_does_not_release_the_next_batchs_turn() -> None:
    """COMMIT_PIPELINE=2: batch A cues, is "retried" and cues again while batch B runs its statements; a
    third batch must not start before B cues (one batch running statements at a time, besides A's retry)."""

    async def main() -> list[str]:
        events: list[str] = []
        running: set[str] = set()
        overlap: list[set[str]] = []
        gate_a = asyncio.Event()
        gate_b = asyncio.Event()
        names = iter(["A", "B", "C"])

        async def end_many(items: list[dict[str, Any]]) -> list[Any]:
            name = next(names)
            cue = STATEMENTS_DONE.get()
            assert cue is not None
            running.add(name)
            overlap.append(set(running))
            events.append(f"{name} starts")
            await asyncio.sleep(0)
            running.discard(name)
            cue()  # statements done: the next batch may start
            events.append(f"{name} cued")
            if name == "A":
                await asyncio.sleep(0.01)  # B starts meanwhile
                cue()  # A's retry cues again, B's turn must stay held
                events.append("A cued again")
                await gate_a.wait()
            elif name == "B":
                await gate_b.wait()
            return [None for _ in items]

        tasks: set[asyncio.Task[Any]] = set()

        def spawn(coro: Any) -> None:
            t = asyncio.get_running_loop().create_task(coro)
            tasks.add(t)

        gc = GroupCommit(end_many, spawn, depth=2)
        fa = asyncio.ensure_future(gc.submit({"task_id": "a"}))
        await asyncio.sleep(0)
        fb = asyncio.ensure_future(gc.submit({"task_id": "b"}))
        await asyncio.sleep(0.05)
        fc = asyncio.ensure_future(gc.submit({"task_id": "c"}))
        await asyncio.sleep(0.05)
        gate_a.set()
        gate_b.set()
        await asyncio.gather(fa, fb, fc)
        await asyncio.gather(*tasks)
        assert all(len(s) == 1 for s in overlap), overlap
        return events

    events = asyncio.run(main())
    assert events.index("A cued again") < events.index("C starts")
    assert events.index("B cued") < events.index("C starts")


def test_the_threads_connect_at_start_so_the_first_transaction_opens_nothing(
    engine: Engine, any_database_url: str
) -> None:
    """The hot engine's first connect (and SQLAlchemy's first-connect set-up) is made before any work comes:
    made in the first callback's batch, it held the GIL beside the loop during the first wave."""
    from sqlalchemy import event

    workers = 1 if any_database_url.startswith("sqlite") else 2

    async def main() -> None:
        hot = HotThread(engine, workers=workers)
        hot.start()
        try:
            await asyncio.wait_for(hot.opened(), 30)
            assert hot.own_engine.pool.checkedout() == workers  # type: ignore[attr-defined]
            connects: list[object] = []
            event.listen(hot.own_engine, "connect", lambda *_: connects.append(1))
            assert await hot.run(Bump(kill=False)) == 1
            assert connects == []
        finally:
            await hot.close()
        assert hot.own_engine.pool.checkedout() == 0  # type: ignore[attr-defined]

    asyncio.run(main())


def test_a_store_down_at_start_does_not_hold_up_the_start(caplog: pytest.LogCaptureFixture) -> None:
    down = make_engine("mysql+pymysql://root@127.0.0.1:1/nothing", pool_size=1)

    async def main() -> None:
        hot = HotThread(down, attempts=2)
        hot.start()
        try:
            await asyncio.wait_for(hot.opened(), 30)  # tried and failed: not the 15 s wait
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(hot.run(lambda conn: None), 60)
        finally:
            await hot.close()

    with caplog.at_level("WARNING", logger="gpuq.db"):
        asyncio.run(main())
    down.dispose()
    assert any(getattr(r, "action", None) == "db_hot_connect" for r in caplog.records)
