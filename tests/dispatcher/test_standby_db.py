"""Standby jobs in the store (``db/standby.py``, ``db/promote.py``, docs/standby.md), on MariaDB and SQLite.

A standby is recorded on a busy slot of its dispatcher before it is sent; whatever frees that slot (a callback
through any process, a batch of callbacks, a hand-off, a confirmed cancel, a lease) gives it to the standby
instead, so the slot is never free in between and nothing else can be placed on it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import IntegrityError

from dispatcher.db.attempts import Backoff, cancel_task, finish_many, slot_drift
from dispatcher.db.cancels import release_cancelled
from dispatcher.db.engine import transaction, utcnow
from dispatcher.db.gpus import set_gpu_state
from dispatcher.db.handoff import end_and_hand_off
from dispatcher.db.pipeline import hot_engine
from dispatcher.db.schema import slots, tasks
from dispatcher.db.standby import NextBind, bind, bind_next_statements, next_bound, unbind
from dispatcher.states import GpuState, Outcome
from producer.job import Job
from tests.dispatcher.helpers import NO_BACKOFF, end_attempt, fleet_engine, job, place

LOAD = "SELECT gpu_id, COUNT(*) AS n FROM tasks WHERE state = 'processing' GROUP BY gpu_id"


@pytest.fixture
def engine(any_database_url: str) -> Any:
    e = fleet_engine(any_database_url, {"g0": 2, "g1": 2})
    yield e
    e.dispose()


def _running(engine: Engine, n: int = 4, dispatcher_id: str = "d1") -> list[str]:
    res = place(engine, [job() for _ in range(n)], dispatcher_id=dispatcher_id)
    assert len(res.placed) == n
    return [p.job.task_id for p in sorted(res.placed, key=lambda p: (p.gpu_id, p.slot_index))]


def _bind(engine: Engine, jobs: list[Job], dispatcher_id: str = "d1", now: Any = None) -> Any:
    return transaction(
        engine,
        bind,
        candidates=[(j, "default") for j in jobs],
        dispatcher_id=dispatcher_id,
        max_attempts=3,
        now=now or utcnow(),
    )


def _slots(engine: Engine) -> dict[tuple[str, int], Any]:
    with engine.connect() as conn:
        rows = conn.execute(select(slots)).all()
    return {(r.gpu_id, r.slot_index): r for r in rows}


def _task(engine: Engine, task_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(tasks).where(tasks.c.task_id == task_id)).one()


def _load(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {r.gpu_id: r.n for r in conn.execute(text(LOAD))}


def _finished(*task_ids: Any) -> list[dict[str, Any]]:
    """Group-commit items: attempt 1 of each task (or of each task in a list) finished, as its callback says."""
    ids = [t for x in task_ids for t in (x if isinstance(x, list) else [x])]
    out = {"attempt": 1, "outcome": Outcome.FINISHED, "result": None, "error": None, "reported": None}
    return [{"task_id": t} | out for t in ids]


def _invariant(engine: Engine) -> None:
    """A standby only on a busy slot; every standby row is bound or holds its slot; no drift."""
    with engine.connect() as conn:
        stranded = conn.execute(
            text("SELECT COUNT(*) FROM slots WHERE next_task_id IS NOT NULL AND task_id IS NULL")
        ).scalar_one()
        unbound = conn.execute(
            text(
                "SELECT COUNT(*) FROM tasks t WHERE t.state = 'standby' AND NOT EXISTS"
                " (SELECT 1 FROM slots s WHERE s.next_task_id = t.task_id)"
            )
        ).scalar_one()
    assert stranded == 0
    assert unbound == 0
    assert transaction(engine, slot_drift) == []


def test_a_standby_is_recorded_on_a_busy_slot_and_takes_it_when_its_holder_ends(engine: Engine) -> None:
    # GIVEN four running jobs of d1 on two GPUs of two slots
    holders = _running(engine)
    # WHEN d1 binds two fresh jobs
    a, b = job(), job()
    res = _bind(engine, [a, b])
    # THEN both are recorded as standbys of d1's busy slots, the GPUs still show two jobs each
    assert [x.job.task_id for x in res.bound] == [a.task_id, b.task_id]
    assert {x.holder for x in res.bound} <= set(holders)
    assert _task(engine, a.task_id).state == "standby"
    assert _load(engine) == {"g0": 2, "g1": 2}
    _invariant(engine)
    # WHEN the holder of a's slot finishes (one callback, its own transaction)
    bound_a = res.bound[0]
    later = utcnow() + timedelta(seconds=5)
    assert end_attempt(engine, bound_a.holder, now=later).code == "applied"
    # THEN a holds that slot, running, with a lease from now, and the GPU still shows two jobs
    slot = _slots(engine)[(bound_a.gpu_id, bound_a.slot_index)]
    assert (slot.task_id, slot.attempt, slot.dispatcher_id, slot.next_task_id) == (a.task_id, 1, "d1", None)
    assert slot.claimed_at == later
    assert slot.lease_expires_at > later + timedelta(seconds=60)
    row = _task(engine, a.task_id)
    assert (row.state, row.attempt, row.gpu_id, row.slot_index) == (
        "processing",
        1,
        slot.gpu_id,
        slot.slot_index,
    )
    assert row.started_at == later
    assert _load(engine) == {"g0": 2, "g1": 2}
    _invariant(engine)


def test_a_batch_of_callbacks_gives_each_slot_to_its_standby(engine: Engine) -> None:
    holders = _running(engine)
    standbys = [job() for _ in range(3)]
    res = _bind(engine, standbys)
    assert len(res.bound) == 3
    # WHEN every holder finishes in one group-commit batch (the set-based end and FREE_MANY)
    items = _finished(holders)
    fins = transaction(engine, finish_many, items=items, now=utcnow(), backoff=NO_BACKOFF)
    assert all(f.code == "applied" for f in fins)
    # THEN the three standbys run, the fourth slot is free
    slots = _slots(engine)
    assert sorted(s.task_id for s in slots.values() if s.task_id) == sorted(j.task_id for j in standbys)
    assert all(_task(engine, j.task_id).state == "processing" for j in standbys)
    _invariant(engine)


@pytest.mark.parametrize("fold", [True, False])
def test_a_hand_off_never_takes_over_a_slot_that_has_a_standby(engine: Engine, fold: bool) -> None:
    holders = _running(engine)
    [bound] = _bind(engine, [job()]).bound
    # WHEN the holder with the standby and another end in one hand-off batch with two candidates
    other = next(h for h in holders if h != bound.holder)
    items = _finished(bound.holder, other)
    c1, c2 = job(), job()
    out = transaction(
        engine,
        end_and_hand_off,
        items=items,
        now=utcnow(),
        backoff=NO_BACKOFF,
        candidates=[(c1, "default"), (c2, "default")],
        check_existing=False,
        dispatcher_id="d1",
        lease_seconds=60,
        max_attempts=3,
        rng=random.Random(1),
        fold=fold,
    )
    # THEN the standby has its holder's slot, one candidate the other freed slot, the second waits
    assert out.result is not None
    assert [p.job.task_id for p in out.result.placed] == [c1.task_id]
    slots = _slots(engine)
    assert slots[(bound.gpu_id, bound.slot_index)].task_id == bound.job.task_id
    assert sum(1 for s in slots.values() if s.task_id) == 4
    assert _task(engine, bound.job.task_id).state == "processing"
    _invariant(engine)


def test_a_hand_off_batch_with_no_candidate_promotes_the_standby(engine: Engine) -> None:
    holders = _running(engine)
    [bound] = _bind(engine, [job()]).bound
    items = _finished(holders)
    out = transaction(
        engine,
        end_and_hand_off,
        items=items,
        now=utcnow(),
        backoff=NO_BACKOFF,
        candidates=[],
        check_existing=False,
        dispatcher_id="d1",
        lease_seconds=60,
        max_attempts=3,
        rng=random.Random(1),
    )
    # THEN three slots are free (and counted as the room left), the standby runs on the fourth
    assert sum(out.free.values()) == 3
    assert _slots(engine)[(bound.gpu_id, bound.slot_index)].task_id == bound.job.task_id
    assert _task(engine, bound.job.task_id).state == "processing"
    _invariant(engine)


def test_a_lease_expiry_and_a_confirmed_cancel_promote_too(engine: Engine) -> None:
    holders = _running(engine)
    res = _bind(engine, [job(), job()])
    first, second = res.bound
    # a lease sweep ends the first holder
    after = utcnow() + timedelta(seconds=120)  # the 60 s lease ran out
    fin = end_attempt(
        engine, first.holder, outcome=Outcome.EXPIRED, backoff=Backoff(), error="lease", now=after
    )
    assert fin.code == "applied"
    assert _slots(engine)[(first.gpu_id, first.slot_index)].task_id == first.job.task_id
    # the second holder is cancelled: its slot stays held until the GPU confirms, then goes to the standby
    assert transaction(engine, cancel_task, task_id=second.holder, now=utcnow(), backoff=Backoff()).held
    assert _slots(engine)[(second.gpu_id, second.slot_index)].task_id == second.holder
    assert transaction(engine, release_cancelled, task_id=second.holder, attempt=1)
    assert _slots(engine)[(second.gpu_id, second.slot_index)].task_id == second.job.task_id
    assert _task(engine, second.job.task_id).state == "processing"
    assert len(holders) == 4
    _invariant(engine)


def test_bind_takes_only_its_own_busy_slots_of_eligible_gpus_once_each(engine: Engine) -> None:
    # GIVEN g0's slots run d1's jobs, g1's run d2's
    _running(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE slots SET dispatcher_id = 'd2' WHERE gpu_id = 'g1'"))
    # WHEN d1 binds three jobs
    res = _bind(engine, [job() for _ in range(3)])
    # THEN two are bound, both on g0, and the third is left to the caller
    assert sorted(b.gpu_id for b in res.bound) == ["g0", "g0"]
    # and a second bind finds no slot left
    assert _bind(engine, [job()]).bound == []
    # a drained GPU gets no standby: d2's slots are on g1
    transaction(engine, set_gpu_state, gpu_id="g1", state=GpuState.DRAINING, now=utcnow())
    assert _bind(engine, [job()], dispatcher_id="d2").bound == []
    transaction(engine, set_gpu_state, gpu_id="g1", state=GpuState.ACTIVE, now=utcnow())
    assert len(_bind(engine, [job()], dispatcher_id="d2").bound) == 1
    _invariant(engine)


def test_bind_refuses_a_known_task_id_and_binds_no_younger_job_of_its_pool(engine: Engine) -> None:
    holders = _running(engine)
    known = Job(task_id=holders[0], type="t", queue="q")
    older, younger = job(), job()
    res = _bind(engine, [older, known, younger])
    assert [j.task_id for j in res.known] == [holders[0]]
    # the younger job is left to the caller with the known one: bound, it would start before that one is
    # looked up (and placed, if it is a copy of a job waiting again)
    assert [b.job.task_id for b in res.bound] == [older.task_id]
    _invariant(engine)


def test_bind_loses_to_a_free_committed_first(engine: Engine) -> None:
    # A bind read its targets, then the holder ended: the conditional UPDATE binds nothing there.
    holders = _running(engine, 1)
    with engine.begin() as conn:
        conn.execute(text("UPDATE slots SET dispatcher_id = 'd1'"))
    end_attempt(engine, holders[0])
    assert _bind(engine, [job()]).bound == []
    _invariant(engine)


def test_unbind_puts_the_job_back_to_be_placed_once(engine: Engine) -> None:
    _running(engine)
    a, b = job(), job()
    res = _bind(engine, [a, b])
    # b's holder ends first: b is promoted, a is still a standby
    end_attempt(engine, res.bound[1].holder)
    out = transaction(engine, unbind, task_ids=[a.task_id, b.task_id], dispatcher_id="d1", now=utcnow())
    assert out == {a.task_id: ("queued", 0), b.task_id: ("processing", 1)}
    row = _task(engine, a.task_id)
    assert (row.state, row.attempt, row.gpu_id, row.slot_index) == ("queued", 0, None, None)
    assert all(s.next_task_id is None for s in _slots(engine).values())
    _invariant(engine)
    # the job's copy is then placed by the usual path, as a first attempt, once
    end_attempt(engine, res.bound[0].holder)
    placed = place(engine, [a], dispatcher_id="d1", check_existing=True)
    assert [(p.job.task_id, p.attempt) for p in placed.placed] == [(a.task_id, 1)]
    again = place(engine, [a], dispatcher_id="d1", check_existing=True)
    assert again.placed == []


def test_a_cancelled_standby_keeps_its_binding_and_holds_the_slot_like_a_cancelled_job(
    engine: Engine,
) -> None:
    _running(engine)
    [bound] = _bind(engine, [job()]).bound
    fin = transaction(engine, cancel_task, task_id=bound.job.task_id, now=utcnow(), backoff=Backoff())
    assert fin.state == "cancelled"
    end_attempt(engine, bound.holder)
    slot = _slots(engine)[(bound.gpu_id, bound.slot_index)]
    assert slot.task_id == bound.job.task_id  # its owner may have sent it: the slot waits for the GPU's word
    assert _task(engine, bound.job.task_id).state == "cancelled"
    _invariant(engine)
    assert transaction(engine, release_cancelled, task_id=bound.job.task_id, attempt=1)
    assert _slots(engine)[(bound.gpu_id, bound.slot_index)].task_id is None


def _end_binding(
    engine: Engine,
    items: list[dict[str, Any]],
    binds: list[NextBind],
    hot: bool,
    candidates: Sequence[Job] = (),
    **extra: Any,
) -> Any:
    """One group-commit batch that binds ``binds`` (with no candidates unless given); on a hot connection
    (several statements per query, MariaDB) the binding goes out in the end's own round trip."""
    args: dict[str, Any] = {
        "items": items,
        "now": utcnow(),
        "backoff": NO_BACKOFF,
        "candidates": [(c, "default") for c in candidates],
        "check_existing": False,
        "dispatcher_id": "d1",
        "lease_seconds": 60,
        "max_attempts": 3,
        "rng": random.Random(1),
        "binds": binds,
    } | extra
    if not hot:
        return transaction(engine, end_and_hand_off, **args)
    h = hot_engine(engine, pool_size=1)
    try:
        with h.connect() as conn, conn.begin():
            return end_and_hand_off(conn, **args)
    finally:
        if h is not engine:
            h.dispose()


@pytest.mark.parametrize("hot", [False, True], ids=["plain", "hot"])
def test_the_transaction_that_promotes_a_standby_binds_the_next_one_on_its_slot(
    engine: Engine, hot: bool
) -> None:
    # GIVEN d1's four running jobs, a standby on one of them
    holders = _running(engine)
    [s] = _bind(engine, [job()]).bound
    nxt, other = job(), job()
    elsewhere = next(h for h in holders if h != s.holder)
    on_s = NextBind(nxt, "default", s.gpu_id, s.slot_index, s.job.task_id, s.url)
    # ... and a next job for a slot whose holder is not promoted by this batch (it is not the slot's holder)
    wrong = NextBind(other, "default", s.gpu_id, s.slot_index, elsewhere, s.url)
    # WHEN the standby's holder ends in a batch with no candidates
    out = _end_binding(engine, _finished(s.holder), [on_s, wrong], hot)
    # THEN the standby holds the slot and the next job is bound on it, recorded as a standby of that slot
    assert [(b.job.task_id, b.holder, b.holder_attempt) for b in out.bound] == [
        (nxt.task_id, s.job.task_id, 1)
    ]
    slot = _slots(engine)[(s.gpu_id, s.slot_index)]
    assert (slot.task_id, slot.next_task_id, slot.next_dispatcher_id) == (s.job.task_id, nxt.task_id, "d1")
    row = _task(engine, nxt.task_id)
    assert (row.state, row.attempt, row.gpu_id, row.slot_index) == ("standby", 1, s.gpu_id, s.slot_index)
    assert _task(engine, s.job.task_id).state == "processing"
    with engine.connect() as conn:
        assert conn.execute(select(tasks).where(tasks.c.task_id == other.task_id)).first() is None
    _invariant(engine)
    # and when the standby ends in turn, the next one takes the slot
    out = _end_binding(engine, _finished(s.job.task_id), [], hot)
    assert _slots(engine)[(s.gpu_id, s.slot_index)].task_id == nxt.task_id
    assert _task(engine, nxt.task_id).state == "processing"
    _invariant(engine)


@pytest.mark.parametrize(
    ("hot", "extra"),
    [
        (True, {}),  # the binding in the placement's own round trip
        (False, {}),
        (False, {"fold": False}),  # placed by ``dispatch``: the binding after it
        (True, {"fold_bytes": 1}),  # the candidate's data too large to fold: ``dispatch`` too
    ],
    ids=["hot", "plain", "unfolded", "too-large-to-fold"],
)
def test_a_batch_that_hands_off_binds_the_next_standby_too(engine: Engine, hot: bool, extra: Any) -> None:
    # Bound only in batches with no candidate (as was done), the early standbys of a batch that also handed
    # a slot off got no next standby: once some slots lacked one, every batch had candidates, and the 100 ms
    # benchmark lost its standby chain for seconds at a time.
    # GIVEN d1's four running jobs, a standby on one of them
    holders = _running(engine)
    [s] = _bind(engine, [job()]).bound
    other = next(h for h in holders if h != s.holder)
    nxt, candidate = job(), job()
    on_s = NextBind(nxt, "default", s.gpu_id, s.slot_index, s.job.task_id, s.url)
    # WHEN the standby's holder and another job end in one batch, with a buffered job to hand off
    out = _end_binding(engine, _finished(s.holder, other), [on_s], hot, [candidate], **extra)
    # THEN the candidate takes the freed slot, the standby its holder's, and the next job is bound behind it
    assert [p.job.task_id for p in out.result.placed] == [candidate.task_id]
    assert [(b.job.task_id, b.holder) for b in out.bound] == [(nxt.task_id, s.job.task_id)]
    slot = _slots(engine)[(s.gpu_id, s.slot_index)]
    assert (slot.task_id, slot.next_task_id) == (s.job.task_id, nxt.task_id)
    assert _task(engine, nxt.task_id).state == "standby"
    assert _task(engine, candidate.task_id).state == "processing"
    assert sum(_load(engine).values()) == 4
    _invariant(engine)


def test_a_batch_run_again_after_its_commit_reports_the_next_standby_the_first_run_bound(
    engine: Engine,
) -> None:
    # The hot thread runs a batch again when its COMMIT's answer was lost; that run meets the first run's
    # rows (IntegrityError) and the loop runs it a third time, at a new ``now``, looking first
    # (check_existing): nothing ends there. That run must report the next standby the first one bound: given
    # back, it was dropped as known, never sent, and its slot idled for a lease once it was promoted.
    holders = _running(engine)
    [s] = _bind(engine, [job()]).bound
    other = next(h for h in holders if h != s.holder)
    nxt, candidate = job(), job()
    on_s = NextBind(nxt, "default", s.gpu_id, s.slot_index, s.job.task_id, s.url)
    now = utcnow()
    items = _finished(s.holder, other)
    first = _end_binding(engine, items, [on_s], False, [candidate], now=now)
    assert [b.job.task_id for b in first.bound] == [nxt.task_id]
    with pytest.raises(IntegrityError):  # the hot thread's rerun, at the same ``now``
        _end_binding(engine, items, [on_s], False, [candidate], now=now)
    again = _end_binding(engine, items, [on_s], False, [candidate], check_existing=True)
    assert [(b.job.task_id, b.holder) for b in again.bound] == [(nxt.task_id, s.job.task_id)]
    assert _slots(engine)[(s.gpu_id, s.slot_index)].next_task_id == nxt.task_id
    assert _task(engine, nxt.task_id).state == "standby"
    assert sum(_load(engine).values()) == 4
    _invariant(engine)


@pytest.mark.parametrize("hot", [False, True], ids=["plain", "hot"])
def test_no_next_standby_for_a_known_id_a_drained_gpu_or_a_holder_not_promoted(
    engine: Engine, hot: bool
) -> None:
    holders = _running(engine)
    standbys = _bind(engine, [job(), job(), job()]).bound
    by_gpu = {b.gpu_id: b for b in standbys}
    # a known id (a task that is running) for the first standby's slot
    a = standbys[0]
    known = NextBind(
        Job(task_id=holders[-1], type="t", queue="q"), "default", a.gpu_id, a.slot_index, a.job.task_id, a.url
    )
    # g1 drained before the batch: its standby is promoted, but gets no next one
    transaction(engine, set_gpu_state, gpu_id="g1", state=GpuState.DRAINING, now=utcnow())
    b = by_gpu["g1"]
    drained = NextBind(job(), "default", b.gpu_id, b.slot_index, b.job.task_id, b.url)
    # the third standby's holder does not end in this batch: its standby is not promoted
    c = next(x for x in standbys if x not in (a, b))
    early = NextBind(job(), "default", c.gpu_id, c.slot_index, c.job.task_id, c.url)
    out = _end_binding(engine, _finished(a.holder, b.holder), [known, drained, early], hot)
    assert out.bound == []
    assert all(s.next_task_id is None for k, s in _slots(engine).items() if k != (c.gpu_id, c.slot_index))
    assert _task(engine, holders[-1]).state == "processing"  # the known task is untouched
    with engine.connect() as conn:
        ids = [drained.job.task_id, early.job.task_id]
        assert conn.execute(select(tasks).where(tasks.c.task_id.in_(ids))).first() is None
    _invariant(engine)


def test_a_next_standby_whose_id_gets_a_row_in_between_is_not_left_bound(engine: Engine) -> None:
    # The binding and the task rows' INSERT are two statements: an id that gets a row between them (a cancel's
    # tombstone, a copy placed elsewhere) was skipped by the INSERT and left bound, its slot then given to a job
    # that is not ours to send (an outside review). The binding is undone in the same round trip.
    holders = _running(engine)
    [s] = _bind(engine, [job()]).bound
    end_attempt(engine, s.holder)  # s holds the slot now
    x = job()
    nb = NextBind(x, "default", s.gpu_id, s.slot_index, s.job.task_id, s.url)
    with engine.begin() as conn:
        stmts, _ = bind_next_statements(conn, [nb], dispatcher_id="d1", max_attempts=3, now=utcnow())
        assert conn.execute(*stmts[0]).rowcount == 1  # bound
        conn.execute(  # the tombstone of a cancel that came in between
            text(
                "INSERT INTO tasks (task_id, queue, type, pool, priority, data, max_attempts, created_at, state,"
                " attempt, updated_at) VALUES (:t, 'q', 't', 'default', 'normal', '{}', 3, :now, 'cancelled',"
                " 0, :now)"
            ),
            {"t": x.task_id, "now": utcnow()},
        )
        won = [conn.execute(*st) for st in stmts[1:]][-1].all()
    assert next_bound([nb], won) == []
    assert _slots(engine)[(s.gpu_id, s.slot_index)].next_task_id is None
    assert _task(engine, x.task_id).state == "cancelled"
    assert holders
    _invariant(engine)
