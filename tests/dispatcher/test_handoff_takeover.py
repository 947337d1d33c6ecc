"""The lean hand-off transaction (issue 12, item 2): a slot freed by a callback goes to the next job in one
UPDATE (``claim_slots(takeover=…)``), with no free before it and no slot left to a finished task. Step by
step in-process against real MariaDB and SQLite (see test_handoff.py); the statements of the hot thread's
transactions are recorded through the engine's ``before_cursor_execute`` event.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from dispatcher.db.attempts import slot_drift
from dispatcher.db.engine import transaction, utcnow
from dispatcher.db.gpus import update_gpu
from dispatcher.db.pipeline import hot_engine
from dispatcher.loop.core import Dispatcher
from dispatcher.testing import settle
from tests.dispatcher.helpers import add_gpu, finished, fleet_engine, hand_off, start
from tests.dispatcher.test_handoff import World, finish, primed, run, world  # noqa: F401 - world: a fixture

_CLAIMING = "SET t.task_id = c.task_id"
_FREEING = "SET task_id = next_task_id"  # every free (db/promote.py)


class Statements:
    """The SQL the hot threads send, in order."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sql: list[str] = []

    def _record(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if threading.current_thread().name.startswith("gpuq-db-hot"):  # COMMIT_PIPELINE: -1, -2, ...
            self.sql.append(" ".join(statement.split()))

    def __enter__(self) -> Statements:
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._record)

    def frees(self) -> int:
        return sum(_FREEING in s for s in self.sql)

    def frees_before_the_claim(self) -> int:
        """Frees sent before the claim that takes the slot over (one after it, for ended slots that are
        still held once the claim ran, touches no slot the claim took)."""
        out = 0
        for s in self.sql:
            if _FREEING in s:
                claim = s.find(_CLAIMING)
                out += claim < 0 or s.index(_FREEING) < claim
        return out


def _busy(w: World) -> dict[tuple[str, int], str | None]:
    with w.engine.connect() as conn:
        rows = conn.execute(text("SELECT gpu_id, slot_index, task_id FROM slots")).all()
    return {(r.gpu_id, r.slot_index): r.task_id for r in rows}


@pytest.fixture
def w(world: World) -> World:  # noqa: F811 - the imported fixture
    return world


def test_a_freed_slot_goes_to_the_next_job_without_being_freed_first(w: World) -> None:
    async def body(d: Dispatcher) -> None:
        ids = await primed(w, d, 6)  # g0 x 2: ids[1], ids[2] running, ids[3:] buffered
        slot = next(k for k, v in _busy(w).items() if v == ids[1])
        with Statements(d.rt.hot.own_engine) as st:
            assert await finish(d, ids[1]) == "applied"
        assert _busy(w)[slot] == ids[3]  # the same slot, straight from ids[1] to ids[3]
        assert st.frees_before_the_claim() == 0, st.sql
        assert w.rows()[ids[3]].started_at == w.rows()[ids[1]].finished_at  # one transaction
        assert transaction(w.engine, slot_drift) == []
        await settle(d)
        assert ids[3] in w.received()

    run(w, w.settings(["g0"]), body)


def test_slots_no_buffered_job_takes_are_freed_in_the_same_transaction(w: World) -> None:
    async def body(d: Dispatcher) -> None:
        ids = await primed(w, d, 4)  # g0 x 2: ids[1], ids[2] running, ids[3] the only job buffered
        assert d.handoffs.buffer.count("default") == 1
        with Statements(d.rt.hot.own_engine) as st:
            # one batch (group commit): both end, one slot is taken over, the other freed
            codes = await asyncio.gather(finish(d, ids[1]), finish(d, ids[2]))
        assert codes == ["applied", "applied"]
        busy = _busy(w)
        assert sorted(v for v in busy.values() if v is not None) == [ids[3]]
        assert st.frees() == 1, st.sql
        assert transaction(w.engine, slot_drift) == []

    run(w, w.settings(["g0"]), body)


def test_a_freed_slot_on_a_busier_gpu_is_freed_and_the_job_goes_to_the_least_loaded(w: World) -> None:
    async def body(d: Dispatcher) -> None:
        ids = await primed(w, d, 5)  # g0 x 2 full, ids[3:] buffered
        add_gpu(w.engine, "g1", 2, url=w.fleet.url("g1"), now=d.now())
        slot = next(k for k, v in _busy(w).items() if v == ids[1])
        assert await finish(d, ids[1]) == "applied"
        busy = _busy(w)
        assert busy[slot] is None  # not taken over: g1 (0 busy) is less loaded than g0 (1 busy)
        assert w.rows()[ids[3]].gpu_id == "g1"
        assert transaction(w.engine, slot_drift) == []

    run(w, w.settings(["g0"]), body)


def _count_wakes(d: Dispatcher) -> list[str]:
    """Wake-ups this dispatcher publishes to the others (the slot-freed PUBLISH)."""
    sent: list[str] = []
    real = d.intake.wake_others

    async def wake_others(what: str) -> None:
        sent.append(what)
        await real(what)

    d.intake.wake_others = wake_others  # type: ignore[method-assign]
    return sent


def test_the_receiver_refills_the_slot_itself_and_wakes_nobody_and_wakes_others_when_it_cannot(
    w: World,
) -> None:
    """Issue 12, item 3: other dispatchers are woken only when the one that took the callback had nothing to
    hand off (their wake-up would only make them read the slots and find them full)."""

    async def body(d: Dispatcher) -> None:
        ids = await primed(w, d, 4)  # g0 x 2: ids[1], ids[2] running, ids[3] the only job buffered
        sent = _count_wakes(d)
        assert await finish(d, ids[1]) == "applied"  # handed off to ids[3]
        await settle(d)
        assert d.handoffs.handed_off == 1
        assert sent == []
        assert await finish(d, ids[2]) == "applied"  # nothing buffered: the slot is free for anyone
        await settle(d)
        assert sent == ["slot"]

    run(w, w.settings(["g0"], handoff_buffer=1), body)


def test_a_takeover_claim_that_fails_still_frees_the_ended_attempts_slot(database_url):
    """A GPU's URL changed between the hand-off's snapshot and its claim: the claim (made for the old URL)
    fails, and the ended attempt's slot was left held by a finished task for good (an outside review: the
    free counted proposals, not wins). The slot is free for the next job."""
    engine = fleet_engine(database_url, {"g0": 1})
    start(engine, ["a"])
    hot = hot_engine(engine, pool_size=1)
    changed: list[str] = []
    conn = hot.connect()

    @event.listens_for(conn, "before_cursor_execute")
    def url_changes_meanwhile(_c: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "g.url = " in statement and not changed:  # the claim goes out: `gpuq gpu set --url` just committed
            changed.append(statement)
            transaction(engine, update_gpu, gpu_id="g0", url="http://127.0.0.1:2/g0", now=utcnow())

    with conn.begin():
        out = hand_off(conn, [finished("a")], ["b"])
    conn.close()
    hot.dispose()
    assert changed and out.result is not None
    assert out.result.placed == [] and [j.task_id for j, _ in out.result.unplaced] == ["b"]
    with engine.connect() as c:
        assert c.execute(text("SELECT task_id FROM slots WHERE gpu_id = 'g0'")).scalar() is None
        assert transaction(engine, slot_drift) == []
    engine.dispose()
