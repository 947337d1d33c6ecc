"""A retry goes to another GPU of its pool when one has room (``Placer.take(avoid=)``), against the real
database.

Found by an outside trial: a GPU answering 500 to every job, whose probe (a GET of its URL) answered 200, was
back in rotation every GPU_PROBE_SECONDS and, being the least loaded, won at once the retries of the jobs it
had just failed: two tasks failed every attempt on it while seven healthy GPUs were free.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from dispatcher.db.engine import transaction, utcnow
from dispatcher.db.gpus import set_gpu_state
from dispatcher.loop.placement import GpuFree, Placer
from dispatcher.states import GpuState, Outcome
from tests.dispatcher.helpers import add_gpu, end_attempt, fleet, job, place


@pytest.fixture
def engine(any_database_url: str) -> Iterator[Engine]:
    with fleet(any_database_url, {"g0": 4}) as e:
        yield e


def test_the_placer_passes_over_the_gpu_to_avoid_only_while_another_has_room() -> None:
    snapshot = [GpuFree("g0", "u0", "p", busy=0, free=(0, 1)), GpuFree("g1", "u1", "p", busy=3, free=(3,))]
    placer = Placer(snapshot, random.Random(1))
    first = placer.take("p", avoid="g0")
    assert first is not None and first.gpu_id == "g1"  # though g0 is less loaded
    second = placer.take("p", avoid="g0")
    assert second is not None and second.gpu_id == "g0"  # no other GPU has room: better there than nowhere
    plain = Placer(snapshot, random.Random(1)).take("p")
    assert plain is not None and plain.gpu_id == "g0"  # without avoid: least-loaded, as before


def test_a_retry_is_placed_off_the_gpu_that_failed_it(engine: Engine) -> None:
    x = job()
    [first] = place(engine, [x], max_attempts=3).placed
    assert first.gpu_id == "g0"
    fin = end_attempt(engine, x.task_id, 1, Outcome.FAILED_RETRY, error="GPU answered 500")
    assert fin.state == "retrying", fin
    add_gpu(engine, "g1", 4)
    transaction(engine, set_gpu_state, gpu_id="g0", state=GpuState.DRAINING, now=utcnow())
    filler = place(engine, [job()], max_attempts=3).placed  # g1 busier than g0 now (not a tie: CI)
    assert [p.gpu_id for p in filler] == ["g1"]
    transaction(engine, set_gpu_state, gpu_id="g0", state=GpuState.ACTIVE, now=utcnow())
    retry = job(task_id=x.task_id, attempt=1)
    [again] = place(engine, [retry], max_attempts=3).placed
    assert again.gpu_id == "g1"  # least-loaded would be g0, the GPU that failed it
