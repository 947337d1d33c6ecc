"""The hot thread's ``STATEMENTS_DONE`` cue (``COMMIT_PIPELINE`` > 1: the next batch starts as this one's
committing round trip goes out). A transaction cues once, also when its committing round trip is lost after
the cue and the whole transaction runs again on a new connection; and a late cue of a batch can never release
the next batch's turn (the group commit's ``_Held``). From an outside review of the change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, text

from dispatcher.db.engine import make_engine
from dispatcher.db.hot import STATEMENTS_DONE, HotThread
from dispatcher.db.pipeline import pipeline
from dispatcher.loop.group_commit import GroupCommit
from tests.dispatcher.helpers import kill_connection


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    e = make_engine(database_url, pool_size=2)
    with e.begin() as conn:
        conn.execute(text("CREATE TABLE counter (id INT PRIMARY KEY, n INT NOT NULL)"))
        conn.execute(text("INSERT INTO counter VALUES (1, 0)"))
    yield e
    e.dispose()


def test_a_transaction_rerun_after_its_committing_round_trip_was_lost_cues_once(engine: Engine) -> None:
    """The committing pipeline's connection is killed from the cue itself (after the cue, before the answer):
    the hot thread reconnects and runs the function again, which must not cue a second time (it did, once per
    attempt, when the cue was made inside the retry loop). The transaction commits once."""
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
    with engine.connect() as conn:
        assert conn.execute(text("SELECT n FROM counter WHERE id = 1")).scalar_one() == 1


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
