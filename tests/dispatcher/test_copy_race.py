"""Two copies of one task placed by two dispatchers at once: the loser must never free the winner's slot.

Copies are normal: both dispatchers requeue a due retry (Redis first, then the database), and a killed
dispatcher's processing list is swept back with jobs it had already placed. The database lets one copy win;
this is about what the loser does next. It found the task still runnable, proposed a slot someone else had
just taken, and then asked which of its tasks now held a slot. Under READ COMMITTED that look also saw the
winner's committed slot of the same task, so the loser believed it had claimed the task, failed to record
it (the winner had), and undid "its" claim by freeing the winner's slot. The winner's GPU kept working while
the slot went to the next job: the soak's oversubscription (issue 17), or, when the winner died before
sending, a task stuck in ``processing`` with no slot and so no lease to expire.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, select, text

from dispatcher.db.attempts import slot_drift
from dispatcher.db.batch import claim_slots
from dispatcher.db.engine import make_engine, transaction, utcnow
from dispatcher.db.schema import slots
from dispatcher.loop.placement import GpuFree
from dispatcher.states import Outcome
from tests.dispatcher.helpers import end_attempt, fleet_engine, job, place

#: The URLs the helpers register GPUs with: a view must name them, as a snapshot would (a claim checks).
URL = {g: f"http://127.0.0.1:1/{g}" for g in ("g0", "g1")}


def _holder(engine: Any, gpu_id: str, slot_index: int) -> tuple[str | None, int | None, str | None]:
    with engine.connect() as conn:
        row = conn.execute(
            select(slots.c.task_id, slots.c.attempt, slots.c.dispatcher_id).where(
                slots.c.gpu_id == gpu_id, slots.c.slot_index == slot_index
            )
        ).one()
    return row.task_id, row.attempt, row.dispatcher_id


def _processing_without_slot(engine: Any) -> list[str]:
    sql = text(
        "SELECT t.task_id FROM tasks t LEFT JOIN slots s ON s.task_id = t.task_id"
        " WHERE t.state = 'processing' AND s.task_id IS NULL"
    )
    with engine.connect() as conn:
        return list(conn.execute(sql).scalars())


def _place(engine: Any, jobs: list[Any], dispatcher_id: str, view: list[GpuFree] | None = None) -> Any:
    return place(engine, jobs, dispatcher_id=dispatcher_id, max_attempts=5, view=view, check_existing=True)


def test_a_claim_never_counts_a_slot_another_dispatcher_holds_for_the_same_task(any_database_url):
    # GIVEN task X on g0/1, placed by d1, and g0/0 taken by Y; g1/0 is free
    engine = fleet_engine(any_database_url, {"g0": 2, "g1": 1})
    x, y = job(), job()
    _place(engine, [y], "d1", view=[GpuFree("g0", URL["g0"], "default", 0, (0,))])
    _place(engine, [x], "d1", view=[GpuFree("g0", URL["g0"], "default", 1, (1,))])
    assert _holder(engine, "g0", 1)[0] == x.task_id
    # WHEN d2, with another copy of X, proposes the taken g0/0 for it and the free g1/0 for Z
    z = job()
    now = utcnow()
    picks = [
        {"gpu_id": "g0", "slot_index": 0, "task_id": x.task_id, "attempt": 1},
        {"gpu_id": "g1", "slot_index": 0, "task_id": z.task_id, "attempt": 1},
    ]
    got = transaction(engine, claim_slots, picks=picks, now=now, lease=now, dispatcher_id="d2")
    # THEN only Z's claim is d2's: X's slot is d1's
    assert got == {z.task_id}


def test_the_losing_copy_leaves_the_winners_slot_alone(database_url):
    # GIVEN task X waiting for its second attempt, and two GPUs with one slot each
    engine = fleet_engine(database_url, {"g0": 1, "g1": 1})
    first = job()
    # its first attempt on g1: a retry passes over the GPU of its last attempt, and X is to race for g0
    placed = _place(engine, [first], "d0", view=[GpuFree("g1", URL["g1"], "default", 0, (0,))]).placed[0]
    assert placed.gpu_id == "g1"
    end_attempt(engine, first.task_id, placed.attempt, Outcome.FAILED_RETRY)
    copy_1 = first.model_copy(update={"attempt": 1})
    copy_2 = first.model_copy(update={"attempt": 1})
    z = job()
    # d2 read X as runnable; right before its claim statement, d1 places the other copy on g0/0 and commits
    loser = make_engine(database_url, pool_size=1)
    winner: list[Any] = []

    @event.listens_for(loser, "before_cursor_execute")
    def d1_wins_first(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE SLOTS") and not winner:
            winner.append(_place(engine, [copy_1], "d1", view=[GpuFree("g0", URL["g0"], "default", 0, (0,))]))

    # d2's (stale) view: X goes to g0/0 (least loaded), Z to g1/0
    view = [GpuFree("g0", URL["g0"], "default", 0, (0,)), GpuFree("g1", URL["g1"], "default", 3, (0,))]
    # WHEN d2 places its copy of X together with Z
    result = _place(loser, [copy_2, z], "d2", view=view)
    loser.dispose()
    # THEN d1's placement stands: X keeps g0/0 at attempt 2, and d2 did not place X
    assert [(p.job.task_id, p.gpu_id) for p in winner[0].placed] == [(first.task_id, "g0")]
    assert _holder(engine, "g0", 0) == (first.task_id, 2, "d1")
    assert [p.job.task_id for p in result.placed] == [z.task_id]
    assert first.task_id not in [p.job.task_id for p in result.placed + result.mine]
    assert _processing_without_slot(engine) == []
    with engine.connect() as conn:
        assert slot_drift(conn) == []
