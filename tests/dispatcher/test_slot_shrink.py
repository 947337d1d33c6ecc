"""A GPU given fewer slots while busy (``gpuq gpu add`` with ``--slots``, or a smaller ``SLOTS_PER_GPU`` at a
dispatcher's start) must from then on get no more jobs than its new count.

Registration deletes only the free slot rows beyond the count; the busy ones stay until their jobs end, and
nothing deletes them after that. A freed row past the count, or a free row below it while rows past it are
still busy, would otherwise be offered: the GPU would keep running its old number of jobs.
"""

from __future__ import annotations

from typing import Any

from dispatcher.db.attempts import Backoff, finish_attempt
from dispatcher.db.dispatch import dispatch
from dispatcher.db.engine import transaction, utcnow
from dispatcher.db.gpus import register_gpu
from dispatcher.db.snapshot import snapshot
from dispatcher.loop.placement import GpuFree
from dispatcher.states import Outcome
from tests.dispatcher.helpers import fleet_engine, job

#: The URLs the helpers register GPUs with: a view must name them, as a snapshot would (a claim checks).
URL = {g: f"http://127.0.0.1:1/{g}" for g in ("g0", "g1")}


def _place(engine: Any, jobs: list[Any], view: list[GpuFree] | None = None) -> Any:
    return transaction(
        engine,
        dispatch,
        items=[(j, "default") for j in jobs],
        dispatcher_id="d1",
        lease_seconds=60,
        max_attempts=5,
        now=utcnow(),
        view=view,
    )


def _finish(engine: Any, placed: Any) -> None:
    transaction(
        engine,
        finish_attempt,
        task_id=placed.job.task_id,
        attempt=placed.attempt,
        outcome=Outcome.FINISHED,
        now=utcnow(),
        backoff=Backoff(0.0, 0.0),
    )


def _offered(engine: Any) -> list[tuple[str, tuple[int, ...]]]:
    with engine.connect() as conn:
        return [(g.gpu_id, g.free) for g in snapshot(conn)]


def test_a_gpu_shrunk_while_busy_never_gets_more_jobs_than_its_new_count(any_database_url):
    # GIVEN g0 with 2 slots, both busy (a on slot 0, b on slot 1)
    engine = fleet_engine(any_database_url, {"g0": 2})
    (a,) = _place(engine, [job()], view=[GpuFree("g0", URL["g0"], "default", 0, (0,))]).placed
    (b,) = _place(engine, [job()], view=[GpuFree("g0", URL["g0"], "default", 1, (1,))]).placed
    # WHEN the operator gives it 1 slot, and b (on the slot past the new count) ends
    now = utcnow()
    transaction(engine, register_gpu, gpu_id="g0", url="u", pool="default", slot_count=1, now=now)
    _finish(engine, b)
    # THEN a alone fills the GPU: nothing is offered, and a new job waits
    assert _offered(engine) == []
    assert [p.job.task_id for p in _place(engine, [job()]).placed] == []
    # AND once a ends, exactly one slot (slot 0) is offered again
    _finish(engine, a)
    assert _offered(engine) == [("g0", (0,))]


def test_a_gpu_shrunk_while_busy_past_its_count_gets_nothing_until_those_end(any_database_url):
    # GIVEN g0 with 2 slots, both busy
    engine = fleet_engine(any_database_url, {"g0": 2})
    (a,) = _place(engine, [job()], view=[GpuFree("g0", URL["g0"], "default", 0, (0,))]).placed
    _place(engine, [job()], view=[GpuFree("g0", URL["g0"], "default", 1, (1,))])
    # WHEN it is given 1 slot and a (on slot 0, within the new count) ends first
    now = utcnow()
    transaction(engine, register_gpu, gpu_id="g0", url="u", pool="default", slot_count=1, now=now)
    _finish(engine, a)
    # THEN the job still on slot 1 fills the GPU's one slot: nothing is offered
    assert _offered(engine) == []
