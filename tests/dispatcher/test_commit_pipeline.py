"""Two group-commit batches in flight at once (``COMMIT_PIPELINE``, ``dispatcher/db/hot.py``): each ends its
attempts and hands the freed slots to the next jobs on a connection of its own, so the database alone keeps
them apart. Real MariaDB.

The interleaving that could oversubscribe a GPU is forced, not hoped for: batch A runs all its statements
and stops before its COMMIT; batch B then runs on a snapshot that does not show A's claims (READ COMMITTED),
counts the GPU's free slot A just took as free, and tries to claim it; only then does A commit. B must not
get that slot, and nothing may be lost: every callback of both batches applied, every job either placed or
handed back unplaced.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, text

from dispatcher.db.attempts import slot_drift
from dispatcher.db.engine import transaction
from dispatcher.db.handoff import HandOff
from dispatcher.db.pipeline import hot_engine
from tests.dispatcher.helpers import finished, fleet, hand_off, start, wait_for

SLOTS = 4


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    with fleet(database_url, {"g0": SLOTS}) as e:
        yield e


@pytest.fixture(params=["pool", "hot"])
def batches(request: pytest.FixtureRequest, engine: Engine) -> Iterator[Engine]:
    """Where the batches run: the pool's connections (one statement per round trip) or the hot threads'
    kind (``hot_engine``: the end, history and snapshot of a batch in one round trip)."""
    if request.param == "pool":
        yield engine
        return
    h = hot_engine(engine, pool_size=2)
    yield h
    h.dispose()


def _batch(task_id: str, candidates: list[str]) -> Callable[[Any], HandOff]:
    """One group-commit batch as ``HandOffs.end_many`` sends it: the ``finished`` callback of ``task_id``,
    with ``candidates`` buffered for its pool."""

    def fn(conn: Any) -> HandOff:
        return hand_off(conn, [finished(task_id)], candidates)

    return fn


class Held:
    """A transaction run in a thread of its own that stops before its COMMIT until ``commit`` is set."""

    def __init__(self, engine: Engine, fn: Callable[[Any], HandOff], hold: bool) -> None:
        self.engine, self.fn = engine, fn
        self.ran = threading.Event()  # all statements done, COMMIT not yet sent
        self.commit = threading.Event()
        if not hold:
            self.commit.set()
        self.out: HandOff | None = None
        self.error: BaseException | None = None
        self.connection_id = 0
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        try:
            with self.engine.connect() as conn, conn.begin():
                self.connection_id = int(conn.execute(text("SELECT CONNECTION_ID()")).scalar_one())
                self.out = self.fn(conn)
                self.ran.set()
                self.commit.wait()
        except BaseException as exc:  # handed to the test
            self.error = exc
            self.ran.set()

    def start(self) -> Held:
        self.thread.start()
        return self

    def done(self) -> HandOff:
        self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.out is not None
        return self.out


def _claiming(engine: Engine, connection_id: int) -> bool:
    """Is that connection inside its claim (``UPDATE slots …``)? B's snapshot is read by then, and the claim
    cannot finish before A commits (A holds the slot's row). PROCESSLIST, not INNODB_TRX: the latter is a
    cache that showed a waiting transaction as RUNNING for seconds on a loaded server."""
    with engine.connect() as conn:
        return bool(
            conn.execute(
                text(
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST"
                    " WHERE id = :id AND command = 'Query' AND info LIKE 'UPDATE slots%'"
                ),
                {"id": connection_id},
            ).scalar_one()
        )


def _processing(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT task_id, slot_index FROM tasks WHERE state = 'processing'")).all()
    return {r.task_id: int(r.slot_index) for r in rows}


def test_two_batches_in_flight_never_put_a_fifth_job_on_a_four_slot_gpu(
    engine: Engine, batches: Engine
) -> None:
    start(engine, ["t1", "t2", "t3"])  # g0: 3 of 4 slots busy, one free
    a = Held(batches, _batch("t1", ["n1", "n2"]), hold=True).start()
    a.ran.wait()
    assert a.error is None, a.error
    # A took t1's slot and the free one, uncommitted. B's snapshot still shows the free slot.
    b = Held(batches, _batch("t2", ["m1", "m2"]), hold=False).start()
    waited = wait_for(
        lambda: "claims" if _claiming(engine, b.connection_id) else (not b.thread.is_alive() and "ended"),
        timeout=25,  # within the connection's 30 s read timeout
        what="batch B finished or claiming",
    )
    assert waited == "claims", "batch B finished without waiting for batch A: this test tests nothing"
    a.commit.set()
    out_a, out_b = a.done(), b.done()

    assert [f.code for f in out_a.finishes + out_b.finishes] == ["applied", "applied"]
    assert out_a.result is not None and out_b.result is not None
    placed = [p.job.task_id for p in out_a.result.placed + out_b.result.placed]
    unplaced = [j.task_id for j, _ in out_a.result.unplaced + out_b.result.unplaced]
    assert sorted(placed + unplaced) == ["m1", "m2", "n1", "n2"]  # every job placed or handed back
    assert len(placed) == 3, (placed, unplaced)  # t1's slot, t2's slot and the one free slot
    running = _processing(engine)
    assert sorted(running) == sorted(["t3", *placed])
    assert len(running) == SLOTS
    assert len(set(running.values())) == SLOTS  # one job per slot
    assert transaction(engine, slot_drift) == []


def test_two_batches_ending_attempts_on_one_gpu_at_once_hand_off_both_slots(
    engine: Engine, batches: Engine
) -> None:
    """The common case at saturation: no free slot, each batch takes over the slot it frees. They meet on no
    row, so neither waits for the other; both hand off, the GPU stays exactly full."""
    start(engine, ["t1", "t2", "t3", "t4"])
    a = Held(batches, _batch("t1", ["n1"]), hold=True).start()
    a.ran.wait()
    b = Held(batches, _batch("t2", ["m1"]), hold=False).start()
    out_b = b.done()  # B completes while A is still open: no lock of A's is in its way
    a.commit.set()
    out_a = a.done()
    assert out_a.result is not None and out_b.result is not None
    assert [p.job.task_id for p in out_a.result.placed] == ["n1"]
    assert [p.job.task_id for p in out_b.result.placed] == ["m1"]
    running = _processing(engine)
    assert sorted(running) == ["m1", "n1", "t3", "t4"]
    assert len(set(running.values())) == SLOTS
    assert transaction(engine, slot_drift) == []
