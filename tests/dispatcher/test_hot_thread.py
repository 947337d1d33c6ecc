"""The hot path's database thread (``dispatcher/db/hot.py``): its connection killed mid-transaction is opened
again and the transaction run again, once; errors go to the caller and the thread lives on; a store that stays
down is ``StoreUnavailable`` (the callback's 503), never a hang. Real MariaDB (``KILL``) and SQLite.

Deterministic: the kill happens inside the transaction, between its two statements, from the thread itself
(through a second connection), so there is no timing to win or lose.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import Connection, Engine, text

from dispatcher.db.engine import StoreUnavailable, make_engine
from dispatcher.db.hot import STATEMENTS_DONE, HotThread
from dispatcher.db.pipeline import pipeline
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
