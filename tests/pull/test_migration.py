"""A database made by gpuq before pull GPUs (schema version 1) is upgraded at start: the new columns and
index are added, its rows kept, on MariaDB and on SQLite, and a second start finds nothing to add."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import OperationalError

from dispatcher.db.engine import init_schema, utcnow
from dispatcher.db.migrations import add_missing
from dispatcher.db.schema import SCHEMA_VERSION

NEW = {"gpus": {"agent_token_hash", "agent_seen_until", "cancel_url"}, "tasks": {"fetched_attempt"}}


def _make_version_1(engine) -> None:
    """Today's schema minus what version 2 added, with a GPU and a task in it, as version 1 left it."""
    init_schema(engine)
    with engine.begin() as conn:
        conn.execute(
            text("DROP INDEX idx_gpus_agent_token" + (" ON gpus" if conn.dialect.name != "sqlite" else ""))
        )
        for table, columns in NEW.items():
            for column in sorted(columns):
                conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
        conn.execute(text("DELETE FROM gpuq_schema"))
        now = utcnow()
        conn.execute(text("INSERT INTO gpuq_schema (version, applied_at) VALUES (1, :now)"), {"now": now})
        conn.execute(
            text(
                "INSERT INTO gpus (gpu_id, url, pool, slots, state, healthy, consecutive_failures, created_at,"
                " updated_at) VALUES ('g0', 'http://h:1/x', 'default', 4, 'active', 1, 0, :now, :now)"
            ),
            {"now": now},
        )
    have = {c["name"] for c in inspect(engine).get_columns("gpus")}
    assert not NEW["gpus"] & have


@pytest.mark.parametrize("kind", ["mariadb", "sqlite"])
def test_version_1_database_is_upgraded_in_place(kind, database_url, tmp_path):
    engine = create_engine(database_url if kind == "mariadb" else f"sqlite:///{tmp_path}/v1.db")
    try:
        _make_version_1(engine)
        # WHEN a dispatcher of this version starts on it
        init_schema(engine)
        # THEN the columns and the unique index are there, the rows kept, the version recorded
        insp = inspect(engine)
        for table, columns in NEW.items():
            assert columns <= {c["name"] for c in insp.get_columns(table)}, table
        assert "idx_gpus_agent_token" in {i["name"] for i in insp.get_indexes("gpus")}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT url FROM gpus")).scalars().all() == ["http://h:1/x"]
            versions = set(conn.execute(text("SELECT version FROM gpuq_schema")).scalars())
            assert versions == {1, SCHEMA_VERSION}
            # AND another start has nothing left to add
            assert add_missing(conn) == []
    finally:
        engine.dispose()


@pytest.mark.slow  # 4 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_an_upgrade_that_times_out_says_so_without_a_traceback(database_url):
    # GIVEN a version 2 database (no cancel_url yet) and a live process in the middle of a transaction on
    # gpus (an older dispatcher still running): the ALTER TABLE waits for it
    engine = create_engine(database_url)
    init_schema(engine)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE gpus DROP COLUMN cancel_url"))
    blocker = engine.connect()
    blocker.execute(text("SELECT COUNT(*) FROM gpus")).scalar()  # holds the table's metadata lock
    impatient = create_engine(database_url, connect_args={"read_timeout": 2})
    try:
        # WHEN the upgrade's wait outlasts the connection's read timeout
        with pytest.raises(OperationalError) as err:
            init_schema(impatient)
        # THEN what is raised is the database's error (the CLI and the dispatcher say it in one line:
        # "database ... is unreachable: Lost connection ... (timed out)"), not the "invalid transaction"
        # of releasing the schema lock on the dead connection, which reached the operator as a traceback
        assert "timed out" in str(err.value.orig) or "Lost connection" in str(err.value.orig), err.value
    finally:
        blocker.rollback()
        blocker.close()
        impatient.dispose()
    # AND once the other transaction ended, the upgrade completes
    init_schema(engine)
    assert "cancel_url" in {c["name"] for c in inspect(engine).get_columns("gpus")}
    engine.dispose()


def test_gpuq_on_a_database_of_an_earlier_version_says_to_upgrade_it(database_url, gpuq):
    # GIVEN a database one version behind this gpuq (no gpus.cancel_url)
    engine = create_engine(database_url)
    init_schema(engine)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE gpus DROP COLUMN cancel_url"))
    engine.dispose()
    # WHEN an operator runs a newer gpuq against it
    res = gpuq("gpu", "list")
    # THEN it says what to do, not that the database is unreachable
    assert res.exit_code == 3, res
    assert "gpuq db init" in res.stderr and "unreachable" not in res.stderr, res
    # AND gpuq db init upgrades it
    assert gpuq("db", "init").exit_code == 0
    assert gpuq("gpu", "list").exit_code == 0
