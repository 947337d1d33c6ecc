"""Upgrading a database made by an earlier gpuq: add the columns and indexes ``schema.py`` has and it lacks.

``metadata.create_all`` creates missing tables only; a table made by an earlier version keeps its columns.
Every change so far only adds (nullable columns, indexes), so the upgrade is generic: compare each table
with the live one and add what is missing, rendered for the database's own dialect (MySQL and SQLite take
the same ``ALTER TABLE … ADD COLUMN``). It runs under ``init_schema``'s lock, so dispatchers starting
together take turns, and a second run finds nothing to add. ``sql/migrations/`` holds each step as MySQL
DDL for DBAs who upgrade by hand.

A database made with the seed's README DDL (``tasks`` only: ``gpu_id VARCHAR(10)``, the server's default,
case-insensitive collation, no timestamps) is adopted the same way, plus steps no gpuq version needed
(MySQL/MariaDB only, see ``adopt_charset`` and ``adopt_columns``): a column narrower than gpuq's, a task id
not compared byte for byte, or text in another character set than utf8mb4 is widened or converted; and a
NOT NULL column added to a table that has rows is filled first (MariaDB would put zero dates in it, which
no reader can take).

Versions: 1 the first schema; 2 pull GPUs (``gpus.agent_token_hash``, ``gpus.agent_seen_until``,
``tasks.fetched_attempt``; see ``dispatcher/gpus/pull.py``); 3 a GPU's own cancel URL (``gpus.cancel_url``);
4 standby jobs (``slots.next_*``); 5 dispatcher ids compared byte for byte (``adopt_columns`` gives the three
``*dispatcher_id`` columns their binary collation).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, Connection, DateTime, Integer, Table, inspect, literal, select, text, update
from sqlalchemy.schema import CreateColumn, CreateIndex

from dispatcher.db.schema import metadata

log = logging.getLogger("gpuq.db")


def add_missing(conn: Connection) -> list[str]:
    """Add the columns and indexes of existing tables that the database lacks; returns what was added."""
    insp = inspect(conn)
    present = set(insp.get_table_names())
    mysql = conn.dialect.name in ("mysql", "mariadb")
    added: list[str] = []
    for table in metadata.sorted_tables:
        if table.name not in present:
            continue  # create_all makes it whole
        have = {c["name"] for c in insp.get_columns(table.name)}
        has_rows = conn.execute(select(literal(1)).select_from(table).limit(1)).first() is not None
        for column in table.columns:
            if column.name in have:
                continue
            spec = str(CreateColumn(column).compile(dialect=conn.dialect)).strip()
            if mysql and has_rows and not column.nullable and column.server_default is None:
                _add_filled(conn, table, column, spec)
            else:
                conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {spec}")
            added.append(f"{table.name}.{column.name}")
        if mysql:
            added += adopt_charset(conn, table)
            added += adopt_columns(conn, table)
        indexes = {i["name"] for i in insp.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                conn.execute(CreateIndex(index))
                added.append(f"{table.name}:{index.name}")
    if added:
        log.info("schema upgraded", extra={"action": "schema_upgrade", "added": added})
    return added


#: What a task left ``processing`` by the seed system becomes, and why (``tasks.error``).
SEED_PROCESSING_ERROR = (
    "left 'processing' by the system gpuq replaced when gpuq adopted this database: its GPU's answer cannot"
    " reach gpuq (the old callbacks carry no callback token) and its job's data was never stored, so gpuq"
    " cannot run it again; submit it again if it did not finish"
)


def settle_seed_rows(conn: Connection) -> list[str]:
    """Give the seed's rows a state gpuq acts on (at every start, after the tables are made: the rows tell
    themselves apart, so an adoption interrupted between its ALTERs is finished by the next start).
    ``processing`` with no dispatcher and no slot (sent to a GPU by the old dispatcher; gpuq records both with
    every attempt) would count in the GPU-load query forever, ended by nothing: it becomes ``failed`` with
    the reason. ``pending`` (a state gpuq never writes; its job still in Redis) made the job's copy look like
    a task already handled, dropped without a word: it becomes ``queued``, gpuq's state for a job waiting in
    Redis, so the copy runs. A ``pending`` row whose job is gone stays visible as ``queued``."""
    now = datetime.now(UTC).replace(tzinfo=None)
    failed = conn.execute(
        text(
            "UPDATE tasks SET state = 'failed', error = :error, finished_at = :now, updated_at = :now"
            " WHERE state = 'processing' AND dispatcher_id IS NULL"
            " AND NOT EXISTS (SELECT 1 FROM slots s WHERE s.task_id = tasks.task_id)"
        ),
        {"error": SEED_PROCESSING_ERROR, "now": now},
    ).rowcount
    queued = conn.execute(
        text("UPDATE tasks SET state = 'queued', attempt = 0, updated_at = :now WHERE state = 'pending'"),
        {"now": now},
    ).rowcount
    out = []
    if failed:
        out.append(f"tasks: {failed} left processing by the seed system marked failed")
        log.warning(
            "tasks left processing by the system gpuq replaced are marked failed (their outcome is unknown)",
            extra={"action": "seed_rows", "tasks": failed},
        )
    if queued:
        out.append(f"tasks: {queued} pending under the seed system now queued")
    return out


def _add_filled(conn: Connection, table: Table, column: Column[Any], spec: str) -> None:
    """A NOT NULL column without a default, added to a table with rows: added nullable, filled, then made
    NOT NULL. Times get the upgrade's time, numbers 0, texts '' (a task's data '{}')."""
    nullable = spec.replace(" NOT NULL", " NULL")
    conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {nullable}")
    fill: object
    if isinstance(column.type, DateTime):
        fill = datetime.now(UTC).replace(tzinfo=None)  # naive UTC, as every time gpuq stores
    elif isinstance(column.type, Integer):
        fill = 0
    else:
        fill = "{}" if column.name == "data" else ""
    conn.execute(update(table).where(column.is_(None)).values({column.name: fill}))
    conn.exec_driver_sql(f"ALTER TABLE {table.name} MODIFY {spec}")


_TABLE_COLLATION = text(
    "SELECT TABLE_COLLATION FROM information_schema.TABLES"
    " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = :table"
)


def adopt_charset(conn: Connection, table: Table) -> list[str]:
    """A table whose default character set is not utf8mb4 (the seed's, or gpuq's own made on a server whose
    default is latin1 or utf8mb3) gets utf8mb4 as its default; its text columns are converted one by one
    by ``adopt_columns``. Not ``CONVERT TO``: that also converts the columns of a foreign key (MariaDB
    refuses: 1833) and gives the binary id columns a case-insensitive collation (ids differing only in
    case then collide: 1062), so the start failed on every try, the schema half converted."""
    collation = conn.execute(_TABLE_COLLATION, {"table": table.name}).scalar_one_or_none()
    if collation is None or str(collation).startswith("utf8mb4_"):
        return []
    conn.exec_driver_sql(f"ALTER TABLE {table.name} DEFAULT CHARACTER SET utf8mb4")
    return [f"{table.name} default utf8mb4 (was {collation})"]


_LIVE = text(
    "SELECT COLUMN_NAME AS name, DATA_TYPE AS data_type, CHARACTER_MAXIMUM_LENGTH AS length,"
    " CHARACTER_SET_NAME AS charset, COLLATION_NAME AS collation, IS_NULLABLE AS nullable"
    " FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = :table"
)
# Columns of a foreign key, on either side: their type must match the other side's, so they are left as they
# are (gpu ids: names gpuq checks, in any character set).
_IN_FOREIGN_KEYS = text(
    "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE WHERE TABLE_SCHEMA = DATABASE()"
    " AND TABLE_NAME = :table AND REFERENCED_TABLE_NAME IS NOT NULL"
    " UNION SELECT REFERENCED_COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE"
    " WHERE TABLE_SCHEMA = DATABASE() AND REFERENCED_TABLE_NAME = :table"
)
_TEXT_TYPES = ("varchar", "char", "text", "mediumtext", "longtext", "tinytext")


def adopt_columns(conn: Connection, table: Table) -> list[str]:
    """Make a live text column what gpuq expects. Widen one narrower than gpuq's (the seed's ``gpu_id
    VARCHAR(10)`` refused every longer GPU name); give a column gpuq compares byte for byte its binary
    collation (the seed's task ids were case-insensitive: ``Case2`` and ``case2`` collided, and the second
    never ran); and store in utf8mb4 one that is in another character set (a GPU's error or a job's data in
    Cyrillic was refused), unless a foreign key holds it. The column keeps whether it may be NULL (gpuq
    never writes NULL where it wants a value) and gets gpuq's default."""
    live = {r.name: r for r in conn.execute(_LIVE, {"table": table.name})}
    held = {r[0] for r in conn.execute(_IN_FOREIGN_KEYS, {"table": table.name})}
    changed: list[str] = []
    clauses: list[str] = []
    for column in table.columns:
        row = live.get(column.name)
        if row is None or row.data_type not in _TEXT_TYPES:
            continue
        want = column.type.dialect_impl(conn.dialect)
        length = getattr(want, "length", None)
        collation = getattr(want, "collation", None)
        narrow = length is not None and row.length is not None and int(row.length) < length
        recollate = collation is not None and row.collation != collation
        recode = row.charset not in (None, "utf8mb4") and column.name not in held
        if not (narrow or recollate or recode):
            continue
        rendered = str(want.compile(dialect=conn.dialect))
        if "CHARACTER SET" not in rendered:
            rendered += " CHARACTER SET utf8mb4"
        null = "NULL" if row.nullable == "YES" and not column.primary_key else "NOT NULL"
        default = ""
        if column.server_default is not None:
            arg = str(getattr(column.server_default, "arg", ""))
            default = " DEFAULT '" + arg.replace("'", "''") + "'"
        clauses.append(f"MODIFY {column.name} {rendered}{default} {null}")
        changed.append(f"{table.name}.{column.name} {rendered}")
    if clauses:  # one ALTER: the table is rebuilt once, and converted whole or not at all
        conn.exec_driver_sql(f"ALTER TABLE {table.name} " + ", ".join(clauses))
    return changed
