"""The free-slot reads (``db/snapshot.py``): the same rows as the rule they implement, on any fleet, and on a
saturated fleet a cost of its few free slots, not of all its slots. The promotion of the standbys a free
gave their slots to (``db/promote.py``): a cost of those slots, not of every standby.

The rule, written out here in Python (the oracle): a GPU is offered when it is active and healthy, has fewer
busy slots than its slot count, and has a free slot row under its count; its picks are its free slots under
the count, lowest first, as many as its room. In the hand-off's read (``snapshot_ending``) the slots held by
the ending attempts count as free, unless a standby waits on them (the standby takes them).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest
from sqlalchemy import Connection, Engine, text

from dispatcher.db.attempts import FREE_MANY, free_slots
from dispatcher.db.batch import claim_slots
from dispatcher.db.engine import utcnow
from dispatcher.db.promote import promote_params, promote_tasks
from dispatcher.db.snapshot import EndingView, snapshot, snapshot_ending
from dispatcher.loop.placement import GpuFree
from tests.dispatcher.helpers import fleet

NOW = "2026-12-05 00:00:00"


@dataclass(frozen=True)
class Gpu:
    gpu_id: str
    pool: str
    slots: int
    state: str
    healthy: bool


@dataclass(frozen=True)
class Slot:
    gpu_id: str
    index: int
    task_id: str | None
    next_task_id: str | None


def _load(conn: Connection, gpus: list[Gpu], slots: list[Slot]) -> None:
    conn.execute(
        text(
            "INSERT INTO gpus (gpu_id, url, pool, slots, state, healthy, created_at, updated_at)"
            " VALUES (:gpu_id, :url, :pool, :slots, :state, :healthy, :now, :now)"
        ),
        [
            {"gpu_id": g.gpu_id, "url": f"http://127.0.0.1:1/{g.gpu_id}", "pool": g.pool, "slots": g.slots}
            | {"state": g.state, "healthy": g.healthy, "now": NOW}
            for g in gpus
        ],
    )
    conn.execute(
        text(
            "INSERT INTO slots (gpu_id, slot_index, task_id, attempt, next_task_id, next_attempt)"
            " VALUES (:gpu_id, :index, :task_id, :attempt, :next_task_id, :next_attempt)"
        ),
        [
            {"gpu_id": s.gpu_id, "index": s.index, "task_id": s.task_id, "next_task_id": s.next_task_id}
            | {"attempt": 1 if s.task_id else None, "next_attempt": 1 if s.next_task_id else None}
            for s in slots
        ],
    )


def _add_tasks(conn: Connection, states: Sequence[tuple[str | None, str]]) -> None:
    """Task rows (first attempts) for the ids of ``(task_id, state)``."""
    conn.execute(
        text(
            "INSERT INTO tasks (task_id, queue, state, type, data, attempt, max_attempts, created_at,"
            " updated_at) VALUES (:task_id, 'q', :state, 'x', '{}', 1, 3, :now, :now)"
        ),
        [{"task_id": task_id, "state": state, "now": NOW} for task_id, state in states],
    )


def _random_fleet(rnd: random.Random, free_share: float) -> tuple[list[Gpu], list[Slot]]:
    """GPUs of two pools, some drained or unhealthy, some with slot rows past their count (a GPU given fewer
    slots while busy), busy slots of which some have a standby waiting."""
    gpus, slots = [], []
    for i in range(rnd.choice([3, 12, 40])):
        gpu = Gpu(
            f"g{i}",
            rnd.choice(["default", "p2"]),
            rnd.choice([1, 2, 4, 4, 6]),
            rnd.choice(["active"] * 5 + ["drained"]),
            rnd.random() > 0.15,
        )
        gpus.append(gpu)
        for j in range(gpu.slots + rnd.choice([0, 0, 0, 1, 2])):
            busy = rnd.random() >= free_share
            standby = busy and rnd.random() < 0.3
            slots.append(Slot(gpu.gpu_id, j, f"t{i}-{j}" if busy else None, f"n{i}-{j}" if standby else None))
    return gpus, slots


def _expected(gpus: list[Gpu], slots: list[Slot], ending: set[str] | None = None) -> EndingView:
    """The rule of the module docstring; ``ending`` None: the plain read (no attempt ending)."""
    ending = ending or set()
    offered, ending_slots = [], set()
    for gpu in sorted(gpus, key=lambda g: g.gpu_id):
        if gpu.state != "active" or not gpu.healthy:
            continue
        rows = [s for s in slots if s.gpu_id == gpu.gpu_id]
        freed = {s.index for s in rows if s.task_id in ending and s.next_task_id is None}
        busy = sum(1 for s in rows if s.task_id is not None and s.index not in freed)
        free = sorted(
            s.index for s in rows if (s.task_id is None or s.index in freed) and s.index < gpu.slots
        )
        if busy < gpu.slots and free:
            picks = tuple(free[: gpu.slots - busy])
            offered.append(GpuFree(gpu.gpu_id, f"http://127.0.0.1:1/{gpu.gpu_id}", gpu.pool, busy, picks))
            ending_slots |= {(gpu.gpu_id, i) for i in freed if i < gpu.slots}
    total = sum(1 for s in slots if s.task_id in ending)
    return EndingView(offered, ending_slots, total)


@pytest.fixture
def engine(any_database_url: str) -> Iterator[Engine]:
    with fleet(any_database_url, {}) as engine:
        yield engine


@pytest.fixture
def maria(database_url: str) -> Iterator[Engine]:
    """For the tests that count MariaDB's row reads or take its row locks."""
    with fleet(database_url, {}) as engine:
        yield engine


@pytest.mark.parametrize("seed", range(12))
def test_the_reads_offer_exactly_what_the_rule_says(engine: Engine, seed: int) -> None:
    rnd = random.Random(seed)
    gpus, slots = _random_fleet(rnd, free_share=rnd.choice([0.0, 0.05, 0.3, 1.0]))
    busy_ids = [s.task_id for s in slots if s.task_id is not None]
    ending = set(rnd.sample(busy_ids, min(len(busy_ids), rnd.choice([1, 3, 8])))) | {"not-running"}
    with engine.begin() as conn:
        _load(conn, gpus, slots)
    with engine.connect() as conn:
        plain = sorted(snapshot(conn), key=lambda g: g.gpu_id)
        view = snapshot_ending(conn, ending=sorted(ending))
    assert plain == _expected(gpus, slots).gpus
    want = _expected(gpus, slots, ending)
    assert sorted(view.gpus, key=lambda g: g.gpu_id) == want.gpus
    assert (view.ending_slots, view.ending_total) == (want.ending_slots, want.ending_total)


def _rows_read(conn: Connection) -> int:
    return sum(int(r[1]) for r in conn.execute(text("SHOW SESSION STATUS LIKE 'Handler_read%'")))


def test_on_a_saturated_fleet_the_reads_cost_its_free_slots_not_all_its_slots(maria: Engine) -> None:
    """256 GPUs x 4, every slot busy but one: reading all 1,024 slots (as it was) took ~3,000 row reads and
    8 ms of MariaDB per read in the scale-out run; the GPUs without a candidate slot are not to be read."""
    gpus = [Gpu(f"g{i:03d}", "default", 4, "active", True) for i in range(256)]
    slots = [
        Slot(g.gpu_id, j, None if (g.gpu_id, j) == ("g100", 2) else f"t{g.gpu_id}-{j}", None)
        for g in gpus
        for j in range(4)
    ]
    with maria.begin() as conn:
        _load(conn, gpus, slots)
        conn.execute(text("ANALYZE TABLE slots, gpus"))
    with maria.connect() as conn:
        before = _rows_read(conn)
        plain = snapshot(conn)
        plain_reads = _rows_read(conn) - before
        before = _rows_read(conn)
        view = snapshot_ending(conn, ending=["tg007-1"])
        ending_reads = _rows_read(conn) - before
    assert [(g.gpu_id, g.free) for g in plain] == [("g100", (2,))]
    assert sorted((g.gpu_id, g.free) for g in view.gpus) == [("g007", (1,)), ("g100", (2,))]
    assert plain_reads < 100 and ending_reads < 200, (
        f"row reads: {plain_reads} for the plain read, {ending_reads} for the hand-off's (1,024 slots)"
    )


def test_a_free_promotes_its_standbys_reading_their_slots_not_every_standby(maria: Engine) -> None:
    """256 GPUs x 4, every slot busy with a standby bound behind it; two slots are freed. Their two standbys
    are promoted (processing, holding the slots), the 1,022 others stay standby, and the promotion does not
    read every standby row: it read ~3,000 rows per free here (as many as 400 per free in the efficiency run,
    MariaDB's largest statement)."""
    gpus = [Gpu(f"g{i:03d}", "default", 4, "active", True) for i in range(256)]
    slots = [Slot(g.gpu_id, j, f"t{g.gpu_id}-{j}", f"n{g.gpu_id}-{j}") for g in gpus for j in range(4)]
    with maria.begin() as conn:
        _load(conn, gpus, slots)
        _add_tasks(
            conn, [(s.task_id, "processing") for s in slots] + [(s.next_task_id, "standby") for s in slots]
        )
        conn.execute(text("ANALYZE TABLE slots, tasks"))
    ending = ["tg010-0", "tg200-3"]
    with maria.connect() as conn:
        before = _rows_read(conn)
        free_slots(conn, task_ids=ending, now=utcnow())
        reads = _rows_read(conn) - before
        conn.commit()
        rows = conn.execute(
            text("SELECT task_id, state FROM tasks WHERE task_id IN (SELECT task_id FROM slots)")
        )
        holders: dict[str, str] = {r.task_id: r.state for r in rows}
        standby = conn.execute(text("SELECT COUNT(*) FROM tasks WHERE state = 'standby'")).scalar_one()
    assert holders["ng010-0"] == holders["ng200-3"] == "processing"
    assert "standby" not in holders.values() and standby == 1022
    assert reads < 100, f"{reads} rows read to free two slots and promote their standbys (1,024 standbys)"


def test_a_hand_off_promoting_beside_another_dispatchers_free_waits_and_does_not_deadlock(
    maria: Engine,
) -> None:
    """An outside review's reproduction. Dispatcher B has freed a slot (its standby n-b now holds it) and not yet
    promoted; dispatcher A's hand-off claims nine fresh slots with the same lease as its free, then frees its
    ended attempt. Left to the planner, A's promotion started from the tasks (more slots with its lease than
    standby rows), locked n-b and waited for B's slot: B's promotion then deadlocked. Slots first, A's
    promotion touches only its own slots, and both commit."""
    now = datetime(2026, 12, 5, 0, 0, 0, 123456)
    lease = now + timedelta(seconds=900)
    # and a busy fleet beside them (800 slots, each with its own lease), as MariaDB's plans need
    gpus = [Gpu("g0", "default", 10, "active", True), Gpu("gB", "default", 1, "active", True)]
    gpus += [Gpu(f"x{i:03d}", "default", 4, "active", True) for i in range(200)]
    slots = [Slot("g0", 0, "HA", None), *(Slot("g0", i, None, None) for i in range(1, 10))]
    slots.append(Slot("gB", 0, "HB", "n-b"))
    slots += [Slot(f"x{k // 4:03d}", k % 4, f"busy{k}", None) for k in range(800)]
    states = [("HA", "finished"), ("HB", "finished"), ("n-b", "standby")]
    states += [(f"busy{k}", "processing") for k in range(800)]
    with maria.begin() as conn:
        _load(conn, gpus, slots)
        conn.execute(
            text("UPDATE slots SET lease_expires_at = :lease WHERE task_id IN ('HA', 'HB')"),
            {"lease": now},
        )
        conn.execute(
            text(
                "UPDATE slots SET lease_expires_at = TIMESTAMPADD(SECOND, slot_index + 4 *"
                " CAST(SUBSTRING(gpu_id, 2) AS UNSIGNED), :now) WHERE gpu_id LIKE 'x%'"
            ),
            {"now": now},
        )
        _add_tasks(conn, states)
        conn.execute(text("ANALYZE TABLE slots, tasks"))
    a, b = maria.connect(), maria.connect()
    outcome: dict[str, object] = {}
    try:
        for conn in (a, b):
            conn.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 10")
            conn.commit()
        b_params = promote_params(now + timedelta(microseconds=7), 900)
        b.execute(FREE_MANY, {"ids": ["HB"]} | b_params)  # B: the free, its promotion not yet sent
        picks = [{"gpu_id": "g0", "slot_index": i, "task_id": f"new{i}", "attempt": 1} for i in range(9)]
        claimed = claim_slots(a, picks=picks, now=now, lease=lease, dispatcher_id="A", takeover=["HA"])
        assert len(claimed) == 9

        def a_frees() -> None:
            try:
                free_slots(a, task_ids=["HA"], now=now, lease_seconds=900)
                a.commit()
                outcome["A"] = "committed"
            except Exception as exc:  # the deadlock victim, or a lock wait timeout
                outcome["A"] = exc

        worker = threading.Thread(target=a_frees)
        worker.start()
        worker.join(0.5)  # A's promotion runs (or, as it was, waits on B's slot holding n-b's lock)
        try:
            b.execute(*promote_tasks(b, b_params))
            b.commit()
            outcome["B"] = "committed"
        except Exception as exc:
            outcome["B"] = exc
        worker.join(15)
    finally:
        for conn in (a, b):
            conn.invalidate()  # whatever failed, no lock outlives the test (the database is dropped next)
    assert outcome == {"A": "committed", "B": "committed"}, outcome
    with maria.connect() as conn:
        assert (
            conn.execute(text("SELECT state FROM tasks WHERE task_id = 'n-b'")).scalar_one() == "processing"
        )
