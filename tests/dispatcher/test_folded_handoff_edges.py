"""The folded hand-off (claim + INSERT + free + COMMIT in one query, ``db/handoff_claims.py``) attacked: a
query over max_allowed_packet, writes after the folded COMMIT, a COMMIT that never ran, two hot threads and a
rival dispatcher racing for slots, a connection killed right after the COMMIT, drained GPUs, lease expiries.
From an outside review of the change; the ones that broke it are fixed. Real MariaDB, batches driven on a
HotThread as the group commit runs them.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from dispatcher.db.attempts import Backoff, slot_drift
from dispatcher.db.engine import StoreUnavailable, transaction, utcnow
from dispatcher.db.handoff import end_and_hand_off
from dispatcher.db.hot import HotThread
from dispatcher.db.pipeline import MAY_COMMIT, hot_engine, pipeline
from dispatcher.limits import Limits
from dispatcher.states import Outcome
from tests.dispatcher.helpers import finished, fleet, hand_off, job, on_hot_thread, slot_holders, start

# -- 1. one INSERT carrying every candidate's data: bigger than max_allowed_packet ----------------------------

N_BIG = 72


@pytest.fixture
def big_fleet(database_url: str) -> Iterator[Engine]:
    with fleet(database_url, {"g0": N_BIG // 2, "g1": N_BIG // 2}) as e:
        yield e


def _big_batch(fold: bool) -> Callable[[Connection], Any]:
    # Each job is within the job limit the dispatcher enforces for the default 16 MiB packet (256 KiB);
    # PyMySQL's executemany (dispatch's INSERT) splits rows at ~1 MB, the folded INSERT ... SELECT does not.
    per_job = Limits.for_packet(16 * 1024 * 1024, max_job_bytes=256 * 1024, max_result_bytes=1).job_bytes
    blob = "a" * (per_job - 1024)

    def batch(conn: Connection) -> Any:
        return end_and_hand_off(
            conn,
            items=[finished(f"t{i}") for i in range(N_BIG)],
            now=utcnow(),
            backoff=Backoff(),
            candidates=[(job("t", task_id=f"n{i}", data={"x": blob}), "default") for i in range(N_BIG)],
            check_existing=False,
            dispatcher_id="d1",
            lease_seconds=600,
            max_attempts=3,
            rng=random.Random(1),
            fold=fold,
        )

    return batch


def test_unfolded_big_jobs_hand_off_fine(big_fleet: Engine) -> None:
    start(big_fleet, [f"t{i}" for i in range(N_BIG)])
    out, _ = on_hot_thread(big_fleet, _big_batch(fold=False))
    assert out.result is not None and len(out.result.placed) == N_BIG


def test_folded_big_jobs_stay_under_max_allowed_packet(big_fleet: Engine) -> None:
    """A group-commit batch of 72 callbacks with 72 buffered jobs of ~255 KB each: one folded query would be
    ~18 MB > 16 MiB max_allowed_packet (the server drops the connection, the hot thread retried it 6 times and
    every callback of the batch failed as StoreUnavailable). Over FOLD_BYTES of data, dispatch places them."""
    start(big_fleet, [f"t{i}" for i in range(N_BIG)])
    out = None
    try:
        out, _ = on_hot_thread(big_fleet, _big_batch(fold=True))
    except (StoreUnavailable, DBAPIError) as exc:
        pytest.fail(f"folded hand-off failed where dispatch() succeeds: {type(exc).__name__}: {exc}"[:400])
    assert out.result is not None and len(out.result.placed) == N_BIG


# -- 2. a statement after a pipeline that committed is refused ---------------------------------------------------


@pytest.fixture
def small_fleet(database_url: str) -> Iterator[Engine]:
    with fleet(database_url, {"g0": 2, "g1": 2}) as e:
        yield e


def test_a_write_after_the_folded_commit_is_refused_loudly(small_fleet: Engine) -> None:
    """A function run on a hot thread that writes after a hand-off whose pipeline sent the COMMIT: that write
    would run in a transaction nobody commits (SQLAlchemy skips its COMMIT), lost or riding along with the
    connection's next transaction. It is refused with an error instead; what was committed stays."""
    start(small_fleet, ["t1", "t2", "t3", "t4"])

    def batch(conn: Connection) -> Any:
        out = hand_off(conn, [finished("t1")], [])  # nothing to hand off: end+free+snapshot+COMMIT in one
        conn.execute(text("UPDATE gpus SET last_error = 'written after' WHERE gpu_id = 'g0'"))
        return out

    with pytest.raises(RuntimeError, match="after the COMMIT"):
        on_hot_thread(small_fleet, batch)
    with small_fleet.connect() as conn:
        assert conn.execute(text("SELECT last_error FROM gpus WHERE gpu_id = 'g0'")).scalar_one() is None
        assert conn.execute(text("SELECT state FROM tasks WHERE task_id = 't1'")).scalar_one() == "finished"
    assert transaction(small_fleet, slot_drift) == []

    def next_one(conn: Connection) -> Any:  # the thread's connection serves the next transaction as before
        conn.execute(text("UPDATE gpus SET last_error = 'next' WHERE gpu_id = 'g0'"))

    on_hot_thread(small_fleet, next_one)
    with small_fleet.connect() as conn:
        assert conn.execute(text("SELECT last_error FROM gpus WHERE gpu_id = 'g0'")).scalar_one() == "next"


# -- 3. a pipeline COMMIT with an empty statement list ------------------------------------------------------------


def test_pipeline_commit_with_no_statements(small_fleet: Engine) -> None:
    hot = hot_engine(small_fleet, pool_size=1)
    try:
        with hot.connect() as conn, conn.begin():
            conn.info[MAY_COMMIT] = True
            try:
                assert pipeline(conn, [], commit=True) == []
            finally:
                conn.info.pop(MAY_COMMIT, None)
    finally:
        hot.dispose()


# -- 4. two hot threads, many concurrent hand-offs: no slot twice, no drift ------------------------------------


def test_two_hot_threads_and_a_rival_never_oversubscribe(small_fleet: Engine) -> None:
    engine = small_fleet
    start(engine, ["t1", "t2", "t3", "t4"])
    running = ["t1", "t2", "t3", "t4"]
    rng = random.Random(5)

    async def main() -> None:
        thread = HotThread(engine, workers=2)
        thread.start()
        try:
            nonlocal running
            k = 0
            for _round in range(15):
                # two batches at once, each ending two running tasks, each with 2 fresh candidates
                rng.shuffle(running)
                a, b, rest = running[:2], running[2:4], running[4:]
                cands_a = [f"n{k}", f"n{k + 1}"]
                cands_b = [f"n{k + 2}", f"n{k + 3}"]
                k += 4
                ra, rb = await asyncio.gather(
                    thread.run(lambda c, a=a, ca=cands_a: hand_off(c, [finished(t) for t in a], ca)),
                    thread.run(lambda c, b=b, cb=cands_b: hand_off(c, [finished(t) for t in b], cb)),
                )
                placed = [p.job.task_id for r in (ra, rb) if r.result for p in r.result.placed]
                running = rest + placed
                assert transaction(engine, slot_drift) == []
                held = [v for v in slot_holders(engine).values() if v is not None]
                assert len(held) == len(set(held)) <= 4
                assert sorted(held) == sorted(running)
        finally:
            await thread.close()

    asyncio.run(main())


# -- 5. the connection is killed right after the folded COMMIT ran (its answer lost) ---------------------------


def test_connection_killed_after_the_folded_commit(
    small_fleet: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server committed claim + INSERT; the client never learns it and the hot thread reruns the batch.
    Nothing may run twice or sit on two slots; what the rerun tells the caller decides what happens to n1."""
    import dispatcher.db.handoff_claims as hc
    from tests.dispatcher.helpers import kill_connection

    engine = small_fleet
    start(engine, ["t1", "t2", "t3", "t4"])
    real = hc.pipeline
    calls: list[bool] = []

    def flaky(conn: Connection, statements: Any, *, commit: bool = False) -> Any:
        out = real(conn, statements, commit=commit)
        if commit and not calls:
            calls.append(True)
            kill_connection(conn.connection.dbapi_connection.thread_id())  # type: ignore[union-attr]
            conn.execute(text("SELECT 1"))  # the lost connection shows: invalidated DBAPIError, rerun
        return out

    monkeypatch.setattr(hc, "pipeline", flaky)
    out, _ = on_hot_thread(engine, lambda conn: hand_off(conn, [finished("t1")], ["n1"]))
    print("rerun finishes", [f.code for f in out.finishes], "result", out.result)
    held = [v for v in slot_holders(engine).values() if v is not None]
    assert sorted(held) == ["n1", "t2", "t3", "t4"]
    assert transaction(engine, slot_drift) == []
    # the rerun saw the attempt over and handed nothing off: n1 is recorded, on a slot, but the caller is
    # told nothing about it (result None -> HandOffs._return(candidates) with suspect=False)
    assert out.result is None
    # the next batch offers n1 again (check=False): it must not land on a second slot
    with pytest.raises(DBAPIError):
        on_hot_thread(engine, lambda conn: hand_off(conn, [finished("t2")], ["n1"]))
    held = [v for v in slot_holders(engine).values() if v is not None]
    assert sorted(held) == ["n1", "t2", "t3", "t4"]


# -- 6. the ended attempt's GPU is drained: its slot is freed, the job goes to the other GPU ----------------------


def test_ended_slot_on_a_drained_gpu_is_freed_and_the_job_goes_elsewhere(small_fleet: Engine) -> None:
    engine = small_fleet
    start(engine, ["t1", "t2"])  # one per GPU
    slots = slot_holders(engine)
    g_t1 = next(k for k, v in slots.items() if v == "t1")[0]
    with engine.begin() as conn:
        conn.execute(text("UPDATE gpus SET state = 'draining' WHERE gpu_id = :g"), {"g": g_t1})
    out, _ = on_hot_thread(engine, lambda conn: hand_off(conn, [finished("t1")], ["n1", "n2"]))
    assert out.result is not None
    placed = {p.job.task_id: p.gpu_id for p in out.result.placed}
    assert all(g != g_t1 for g in placed.values())
    held = {k: v for k, v in slot_holders(engine).items() if v is not None}
    assert "t1" not in held.values()
    assert transaction(engine, slot_drift) == []
    assert len(held) == len(set(held.values()))
    print("placed", placed, "held", held)


# -- 7. task ids that differ only in case (utf8mb4_bin ids) in one folded INSERT ... SELECT ----------------------


def test_case_variant_task_ids_in_one_folded_batch(small_fleet: Engine) -> None:
    engine = small_fleet
    start(engine, ["t1", "t2", "t3", "t4"])
    out, _ = on_hot_thread(
        engine, lambda conn: hand_off(conn, [finished("t1"), finished("t2")], ["Job-1", "job-1"])
    )
    assert out.result is not None
    assert sorted(p.job.task_id for p in out.result.placed) == ["Job-1", "job-1"]
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT task_id, gpu_id, slot_index FROM tasks WHERE state='processing'")
        ).all()
    assert sorted(r.task_id for r in rows) == ["Job-1", "job-1", "t3", "t4"]
    assert transaction(engine, slot_drift) == []


# -- 8. two dispatchers' hand-offs racing for the same free slots -------------------------------------------------


@pytest.fixture
def six_slots(database_url: str) -> Iterator[Engine]:
    with fleet(database_url, {"g0": 3, "g1": 3}) as e:
        yield e


def test_rival_dispatchers_race_for_free_slots(six_slots: Engine) -> None:
    engine = six_slots
    start(engine, ["t1", "t2", "t3", "t4"])  # 2 free
    running = ["t1", "t2", "t3", "t4"]
    rng = random.Random(11)

    def batch(dispatcher_id: str, ending: list[str], cands: list[str]) -> Callable[[Connection], Any]:
        def fn(conn: Connection) -> Any:
            return end_and_hand_off(
                conn,
                items=[finished(t) for t in ending],
                now=utcnow(),
                backoff=Backoff(),
                candidates=[(job("t", task_id=c), "default") for c in cands],
                check_existing=False,
                dispatcher_id=dispatcher_id,
                lease_seconds=600,
                max_attempts=3,
                rng=random.Random(rng.random()),
            )

        return fn

    async def main() -> None:
        nonlocal running
        a, b = HotThread(engine), HotThread(engine)
        losses: list[int] = []
        a.start()
        b.start()
        try:
            k = 0
            for _ in range(25):
                rng.shuffle(running)
                ea, eb, rest = running[:1], running[1:2], running[2:]
                ca = [f"a{k}", f"a{k + 1}", f"a{k + 2}"]
                cb = [f"b{k}", f"b{k + 1}", f"b{k + 2}"]
                k += 3
                ra, rb = await asyncio.gather(a.run(batch("d1", ea, ca)), b.run(batch("d2", eb, cb)))
                placed = [p.job.task_id for r in (ra, rb) if r.result for p in r.result.placed]
                unplaced = [j.task_id for r in (ra, rb) if r.result for j, _ in r.result.unplaced]
                running = rest + placed
                held = [v for v in slot_holders(engine).values() if v is not None]
                assert len(held) == len(set(held)) <= 6
                assert sorted(held) == sorted(running)
                assert transaction(engine, slot_drift) == []
                with engine.connect() as conn:
                    known = set(conn.execute(text("SELECT task_id FROM tasks")).scalars())
                assert not (set(unplaced) & known), "a job whose claim lost got a task row"
                losses.append(len(unplaced))
                # keep 2 free for the next round
                while len(running) > 4:
                    t = running.pop()
                    await a.run(batch("d1", [t], []))
            print("unplaced per round", losses)
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


# -- 9. a failed pipeline COMMIT whose error is handled inside the transaction ------------------------------------


@pytest.mark.parametrize("savepoint", [False, True])
def test_a_failed_commit_pipeline_caught_in_the_transaction_keeps_its_commit(
    small_fleet: Engine, savepoint: bool
) -> None:
    """A caller that handles a committing pipeline's error (a savepoint, or MariaDB's statement-level
    rollback) and goes on writing: its COMMIT never ran, so SQLAlchemy's must not be skipped (it was, when
    the flag was set before the query ran: every write of the transaction was lost)."""
    from sqlalchemy.exc import IntegrityError

    failing = [
        (text("UPDATE gpus SET url = 'http://first' WHERE gpu_id = 'g1'"), {}),
        (text("INSERT INTO slots SELECT * FROM slots"), {}),  # every key taken
    ]

    def fn(conn: Connection) -> None:
        conn.execute(text("UPDATE gpus SET last_error = 'before' WHERE gpu_id = 'g0'"))
        try:
            if savepoint:
                with conn.begin_nested():
                    pipeline(conn, failing, commit=True)
            else:
                pipeline(conn, failing, commit=True)
        except IntegrityError:
            pass
        conn.execute(text("UPDATE gpus SET url = 'http://after' WHERE gpu_id = 'g0'"))

    on_hot_thread(small_fleet, fn)
    with small_fleet.connect() as conn:
        row = conn.execute(text("SELECT url, last_error FROM gpus WHERE gpu_id = 'g0'")).one()
    assert (row.url, row.last_error) == ("http://after", "before"), "the transaction's COMMIT was skipped"


# -- 10. a lease-expiry batch hands its slot off through the folded claim ---------------------------------------


def test_lease_expiry_batch_hands_off_folded(small_fleet: Engine) -> None:
    engine = small_fleet
    start(engine, ["t1", "t2", "t3", "t4"])
    with engine.begin() as conn:
        conn.execute(text("UPDATE slots SET lease_expires_at = '2000-01-01' WHERE task_id IN ('t1', 't2')"))
    items = [
        dict(finished("t1"), outcome=Outcome.EXPIRED, reported=None),
        dict(finished("t2"), outcome=Outcome.EXPIRED, reported=None),
    ]
    out, _ = on_hot_thread(engine, lambda conn: hand_off(conn, items, ["n1"]))
    print([f.code for f in out.finishes], out.result)
    assert out.result is not None and [p.job.task_id for p in out.result.placed] == ["n1"]
    held = sorted(v for v in slot_holders(engine).values() if v is not None)
    assert held == ["n1", "t3", "t4"]
    assert transaction(engine, slot_drift) == []
    with engine.connect() as conn:
        states = dict(
            conn.execute(text("SELECT task_id, state FROM tasks WHERE task_id IN ('t1','t2')")).all()
        )
    assert all(s != "processing" for s in states.values()), states


def test_jobs_over_the_fold_budget_the_limits_allow_go_through_dispatch(small_fleet: Engine) -> None:
    """The budget comes from ``Limits`` (half what a statement may carry, from max_allowed_packet): jobs whose
    data is over it are placed by ``dispatch`` (more round trips), not sent in one query the server drops."""
    start(small_fleet, ["t1", "t2", "t3", "t4"])
    blob = "b" * 3000

    def batch(conn: Connection) -> Any:
        return end_and_hand_off(
            conn,
            items=[finished("t1"), finished("t2")],
            now=utcnow(),
            backoff=Backoff(),
            candidates=[(job("t", task_id=f"n{i}", data={"x": blob}), "default") for i in range(2)],
            check_existing=False,
            dispatcher_id="d1",
            lease_seconds=600,
            max_attempts=3,
            rng=random.Random(1),
            fold_bytes=4000,  # two jobs of ~3 KB: over it
        )

    out, trips = on_hot_thread(small_fleet, batch)
    assert out.result is not None and sorted(p.job.task_id for p in out.result.placed) == ["n0", "n1"]
    assert trips > 2  # not the folded two
    assert transaction(small_fleet, slot_drift) == []
