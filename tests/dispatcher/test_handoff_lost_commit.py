"""A hand-off whose COMMIT went through but whose answer was lost (the connection died right after it): the
hot thread opens a new connection and runs the batch again. The first run did record the buffered job on
the freed slot; its request was never sent. The job must go back to the buffer marked to be looked up first
(``HandOffs``: after a rerun, or a failed hand-off), so the next hand-off finds it recorded as this dispatcher's
own and sends it, once, instead of leaving it to its lease. MariaDB (the connection is killed), in process.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Connection, text

import dispatcher.loop.handoff as handoff_module
from dispatcher.db.pipeline import MAY_COMMIT
from dispatcher.loop.core import Dispatcher
from dispatcher.testing import settle
from tests.dispatcher.helpers import kill_connection, wait_for
from tests.dispatcher.test_handoff import World, finish, primed, run, world  # noqa: F401 - world: a fixture


def test_a_job_whose_handoff_committed_unanswered_is_looked_up_and_sent_once(
    world: World,  # noqa: F811 - the imported fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w = world
    if w.engine.dialect.name == "sqlite":
        pytest.skip("the connection is killed: MariaDB")
    real = handoff_module.end_and_hand_off
    runs: list[int] = []

    def committed_then_lost(conn: Connection, **kwargs: Any) -> Any:
        runs.append(1)
        if len(runs) > 1:
            return real(conn, **kwargs)
        conn_id = int(conn.execute(text("SELECT CONNECTION_ID()")).scalar_one())
        conn.info.pop(MAY_COMMIT, None)  # the COMMIT below is ours: sent, then its answer lost
        out = real(conn, **kwargs)
        conn.connection.dbapi_connection.commit()  # type: ignore[union-attr]
        kill_connection(conn_id)
        return out  # SQLAlchemy's COMMIT then meets the dead connection: the hot thread runs it again

    async def body(d: Dispatcher) -> None:
        ids = await primed(w, d, 4)  # g0 x 2: ids[1], ids[2] running; ids[3] buffered
        monkeypatch.setattr(handoff_module, "end_and_hand_off", committed_then_lost)
        # the rerun (same clock reading) takes the first run's end for its own, tries the hand-off again and
        # meets the job's row; a third run looks first (as a pass does): the attempt was ended already, no
        # slot is freed, the job is given back to be looked up
        assert await finish(d, ids[1]) in ("applied", "repeat")
        monkeypatch.setattr(handoff_module, "end_and_hand_off", real)
        assert len(runs) == 3 and d.rt.hot.reconnects == 1
        assert w.state(ids[3]) == "processing"  # recorded by the first run, never sent
        assert ids[3] not in w.received()
        assert d.handoffs.buffer.count("default") == 1  # given back, marked to be looked up
        # g0 is full (ids[2], and ids[3] on the slot the first run gave it), so the job waits for the next
        # freed slot: that hand-off looks it up, finds it recorded as this dispatcher's own, and sends it
        assert await finish(d, ids[2]) == "applied"
        await settle(d)
        wait_for(lambda: ids[3] in w.received(), timeout=10)
        assert w.received().count(ids[3]) == 1
        assert await finish(d, ids[3]) == "applied"
        assert w.state(ids[3]) == "finished"

    run(w, w.settings(["g0"]), body)
