"""A database made with the seed README's DDL is adopted at start: its narrow and case-insensitive columns are
converted, its rows get readable values in gpuq's new columns, and a second start changes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from dispatcher.db.attempts import Backoff, finish_attempt
from dispatcher.db.engine import init_schema, make_engine, transaction, utcnow
from dispatcher.db.listing import TaskFilter, list_tasks
from dispatcher.db.migrations import add_missing
from dispatcher.db.reads import get_task
from dispatcher.states import Outcome
from tests.dispatcher.helpers import add_gpu, fleet_engine, job, place

ROOT = Path(__file__).resolve().parents[2]

SEED_DDL = [
    # as the seed's README has it, on a server whose default collation is case-insensitive
    "CREATE TABLE tasks (task_id VARCHAR(255) PRIMARY KEY, queue VARCHAR(100), state VARCHAR(20),"
    " type VARCHAR(50), gpu_id VARCHAR(10), slot_index INT)"
    " DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_general_ci",
    "CREATE INDEX idx_tasks_state ON tasks(state)",
    "CREATE INDEX idx_tasks_gpu_id ON tasks(gpu_id)",
    "CREATE INDEX idx_tasks_type ON tasks(type)",
    "INSERT INTO tasks VALUES ('old-1', 'task_queue_1', 'finished', 'start_transcribe', 'gpu-1', 0)",
]


def _seed(database_url: str, in_flight: tuple[str, str] | None = None, more: list[str] | None = None) -> Any:
    """A database made with the seed's DDL; ``in_flight``: the ids of a task its dispatcher sent to a GPU
    (``processing`` on g0) and of one still waiting in Redis (``pending``); ``more``: statements after."""
    engine = create_engine(database_url)
    with engine.begin() as conn:
        for statement in SEED_DDL:
            conn.exec_driver_sql(statement)
        if in_flight is not None:
            sent, waiting = in_flight
            conn.exec_driver_sql(
                f"INSERT INTO tasks VALUES ('{sent}', 'task_queue_1', 'processing', 'start_transcribe', 'g0', 2),"
                f" ('{waiting}', 'task_queue_1', 'pending', 'start_transcribe', NULL, NULL)"
            )
        for statement in more or []:
            conn.exec_driver_sql(statement)
    return engine


def test_a_seed_database_is_adopted(database_url):
    engine = _seed(database_url)
    # WHEN a dispatcher (or gpuq db init) starts on it
    init_schema(engine)
    # THEN the old row reads back with real times, as a task and in a listing
    old = transaction(engine, get_task, task_id="old-1")
    assert old is not None and old["state"] == "finished" and old["created_at"] is not None
    page = transaction(engine, list_tasks, where=TaskFilter(), limit=10)
    assert [t["task_id"] for t in page["tasks"]] == ["old-1"]
    with engine.connect() as conn:
        cols = {
            r.name: r
            for r in conn.execute(
                text(
                    "SELECT COLUMN_NAME AS name, CHARACTER_MAXIMUM_LENGTH AS length, COLLATION_NAME AS coll"
                    " FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'tasks'"
                )
            )
        }
        assert (
            conn.execute(text("SELECT COUNT(*) FROM tasks WHERE created_at < '1971-01-01'")).scalar_one() == 0
        )
    assert cols["gpu_id"].length == 64 and cols["task_id"].coll == "utf8mb4_bin"
    # and a second start finds nothing to change
    with engine.begin() as conn:
        assert add_missing(conn) == []
    # and tasks whose ids differ only in case, on a GPU whose name is longer than 10 characters, both run
    fleet = fleet_engine(database_url, {"transcribe-gpu-01": 4})
    placed = place(fleet, [job(task_id="Case2"), job(task_id="case2")])
    assert sorted(p.job.task_id for p in placed.placed) == ["Case2", "case2"]
    assert {p.gpu_id for p in placed.placed} == {"transcribe-gpu-01"}


def _finish_with_a_unicode_error(engine) -> str:
    add_gpu(engine, "g0", 4)
    assert place(engine, [job(task_id="u1", data={"text": "Привет 👋"})]).placed
    fin = transaction(
        engine,
        finish_attempt,
        task_id="u1",
        attempt=1,
        outcome=Outcome.FAILED,
        now=utcnow(),
        backoff=Backoff(),
        error="ошибка модели 💥",
        reported="failed",
    )
    return fin.code


def test_a_latin1_seed_table_is_converted_to_utf8mb4(database_url):
    # GIVEN the seed's table on a server whose default character set is latin1
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(SEED_DDL[0].replace("utf8mb4 COLLATE=utf8mb4_general_ci", "latin1"))
    # WHEN a dispatcher adopts it
    init_schema(engine)
    # THEN a job's data and a GPU's error in any script are stored (they were refused: 1366 incorrect string)
    assert _finish_with_a_unicode_error(make_engine(database_url)) == "applied"


def test_a_fresh_schema_on_a_latin1_database_takes_any_text(database_url):
    engine = create_engine(database_url)
    with engine.begin() as conn:
        name = conn.exec_driver_sql("SELECT DATABASE()").scalar_one()
        conn.exec_driver_sql(f"ALTER DATABASE `{name}` CHARACTER SET latin1 COLLATE latin1_swedish_ci")
    init_schema(engine)
    assert _finish_with_a_unicode_error(make_engine(database_url)) == "applied"


@pytest.mark.parametrize("case_twins", [False, True])
def test_a_gpuq_schema_made_on_a_latin1_server_starts_and_takes_any_text(database_url, case_twins):
    # GIVEN gpuq's schema as versions before utf8mb4 tables made it (sql/schema.sql without the table
    # character set) on a database whose default is latin1; with tasks whose ids differ only in case
    engine = create_engine(database_url)
    ddl = (ROOT / "sql" / "schema.sql").read_text().replace(" CHARSET=utf8mb4", "")
    statements = [s for s in "\n".join(li for li in ddl.splitlines() if not li.startswith("--")).split(";")]
    with engine.begin() as conn:
        name = conn.exec_driver_sql("SELECT DATABASE()").scalar_one()
        conn.exec_driver_sql(f"ALTER DATABASE `{name}` CHARACTER SET latin1 COLLATE latin1_swedish_ci")
    with engine.begin() as conn:
        for statement in statements:
            if statement.strip():
                conn.exec_driver_sql(statement)
        if case_twins:
            for tid in ("Case2", "case2"):
                conn.exec_driver_sql(
                    "INSERT INTO attempts (task_id, attempt, ended_at, outcome)"
                    f" VALUES ('{tid}', 1, NOW(), 'finished')"
                )
    # WHEN this version starts on it, twice
    init_schema(engine)
    with engine.begin() as conn:
        assert add_missing(conn) == []
    # THEN any text is stored, and the twins are still two
    assert _finish_with_a_unicode_error(make_engine(database_url)) == "applied"
    with engine.connect() as conn:
        twins = conn.exec_driver_sql("SELECT COUNT(*) FROM attempts WHERE task_id IN ('Case2', 'case2')")
        assert twins.scalar_one() == (2 if case_twins else 0)


def test_the_seeds_tasks_in_flight_get_states_gpuq_acts_on(database_url):
    # GIVEN the seed's table with a task its dispatcher sent to a GPU and one still waiting in Redis
    engine = _seed(database_url, in_flight=("sent-1", "waiting-1"))
    # WHEN gpuq adopts the database
    init_schema(engine)
    # THEN the seed's GPU-load query no longer counts a task nothing will ever end
    with engine.connect() as conn:
        load = conn.execute(
            text(
                "SELECT gpu_id, COUNT(*) AS active_tasks FROM tasks WHERE state = 'processing' GROUP BY gpu_id"
            )
        ).all()
    assert load == []
    sent = transaction(engine, get_task, task_id="sent-1")
    assert sent["state"] == "failed" and "system gpuq replaced" in sent["error"]
    assert sent["finished_at"] is not None
    # and the old finished task is untouched
    assert transaction(engine, get_task, task_id="old-1")["state"] == "finished"
    # and the waiting task's job, still in Redis, runs instead of being dropped as already handled
    fleet = fleet_engine(database_url, {"g0": 4})
    placed = place(fleet, [job(task_id="waiting-1")], check_existing=True)
    assert [p.job.task_id for p in placed.placed] == ["waiting-1"] and not placed.dropped
    # and a second start changes nothing more: not the tasks gpuq runs now either
    with engine.begin() as conn:
        assert add_missing(conn) == []
    init_schema(engine)
    assert transaction(engine, get_task, task_id="sent-1")["error"] == sent["error"]
    assert transaction(engine, get_task, task_id="waiting-1")["state"] == "processing"


def test_an_adoption_interrupted_between_its_alters_settles_the_seeds_tasks_at_the_next_start(database_url):
    # GIVEN the seed's table, its tasks in flight, and an earlier start that died after adding one column
    engine = _seed(
        database_url,
        in_flight=("s1", "s2"),
        more=["ALTER TABLE tasks ADD COLUMN created_at DATETIME(6) NULL"],
    )
    # WHEN gpuq starts on it
    init_schema(engine)
    # THEN the seed's tasks get their states all the same
    assert transaction(engine, get_task, task_id="s1")["state"] == "failed"
    assert transaction(engine, get_task, task_id="s2")["state"] == "queued"


def test_a_version_4_database_gets_dispatcher_ids_compared_byte_for_byte(database_url):
    # GIVEN a gpuq database of schema version 4: its dispatcher id columns in the server's default collation
    engine = make_engine(database_url)
    init_schema(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "ALTER TABLE slots MODIFY dispatcher_id VARCHAR(128) COLLATE utf8mb4_general_ci NULL,"
            " MODIFY next_dispatcher_id VARCHAR(128) COLLATE utf8mb4_general_ci NULL"
        )
        conn.exec_driver_sql(
            "ALTER TABLE tasks MODIFY dispatcher_id VARCHAR(128) COLLATE utf8mb4_general_ci NULL"
        )
    add_gpu(engine, "g0", 2)
    place(engine, [job()], dispatcher_id="gpu-box-x")
    # WHEN a dispatcher of this version starts on it
    init_schema(engine)
    # THEN the three columns compare byte for byte: another case is another dispatcher
    with engine.connect() as conn:
        coll = {
            (r.tbl, r.col): r.coll
            for r in conn.execute(
                text(
                    "SELECT TABLE_NAME AS tbl, COLUMN_NAME AS col, COLLATION_NAME AS coll FROM information_schema.COLUMNS"
                    " WHERE TABLE_SCHEMA = DATABASE() AND COLUMN_NAME LIKE '%dispatcher_id'"
                )
            )
        }
        upper = conn.execute(
            text("SELECT COUNT(*) FROM slots WHERE dispatcher_id = 'GPU-BOX-X'")
        ).scalar_one()
        same = conn.execute(text("SELECT COUNT(*) FROM slots WHERE dispatcher_id = 'gpu-box-x'")).scalar_one()
    assert coll == {
        ("slots", "dispatcher_id"): "utf8mb4_bin",
        ("slots", "next_dispatcher_id"): "utf8mb4_bin",
        ("tasks", "dispatcher_id"): "utf8mb4_bin",
    }
    assert (upper, same) == (0, 1)
    engine.dispose()
