"""Upgrading a database made by an earlier gpuq: add the columns and indexes ``schema.py`` has and it lacks.

``metadata.create_all`` creates missing tables only; a table made by an earlier version keeps its columns.
Every change so far only adds (nullable columns, indexes), so the upgrade is generic: compare each table
with the live one and add what is missing, rendered for the database's own dialect (MySQL and SQLite take
the same ``ALTER TABLE … ADD COLUMN``). It runs under ``init_schema``'s lock, so dispatchers starting
together take turns, and a second run finds nothing to add. ``sql/migrations/`` holds each step as MySQL
DDL for DBAs who upgrade by hand.

Versions: 1 the first schema; 2 pull GPUs (``gpus.agent_token_hash``, ``gpus.agent_seen_until``,
``tasks.fetched_attempt``; see ``dispatcher/gpus/pull.py``); 3 a GPU's own cancel URL (``gpus.cancel_url``).
"""

from __future__ import annotations

import logging

from sqlalchemy import Connection, inspect
from sqlalchemy.schema import CreateColumn, CreateIndex

from dispatcher.db.schema import metadata

log = logging.getLogger("gpuq.db")


def add_missing(conn: Connection) -> list[str]:
    """Add the columns and indexes of existing tables that the database lacks; returns what was added."""
    insp = inspect(conn)
    present = set(insp.get_table_names())
    added: list[str] = []
    for table in metadata.sorted_tables:
        if table.name not in present:
            continue  # create_all makes it whole
        have = {c["name"] for c in insp.get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            spec = str(CreateColumn(column).compile(dialect=conn.dialect)).strip()
            conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {spec}")
            added.append(f"{table.name}.{column.name}")
        indexes = {i["name"] for i in insp.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                conn.execute(CreateIndex(index))
                added.append(f"{table.name}:{index.name}")
    if added:
        log.info("schema upgraded", extra={"action": "schema_upgrade", "added": added})
    return added
