"""Which database this is, whatever URL reaches it: what dispatchers sharing a Redis key prefix compare.

Two dispatchers on one Redis key prefix and one fleet of GPUs but two databases each believe they own every
slot: an outside trial (a second machine that forgot DATABASE_URL and fell back to embedded SQLite, or had
another DB_NAME) put 8 jobs on 4-slot GPUs, nearly half the requests over their slots. The URL cannot tell
(one server has many spellings, a failover changes its host); the database's own first schema stamp can: it
is written once, to the microsecond, when gpuq first creates its tables there.
"""

from __future__ import annotations

import os
from datetime import datetime

from sqlalchemy import Connection, func, select, text

from dispatcher.db.schema import schema_version


def database_identity(conn: Connection) -> str:
    """``mysql:<database> (gpuq schema of <first stamp>)`` or ``sqlite:<file> (...)``: said as is in a
    refusal."""
    first = conn.execute(select(func.min(schema_version.c.applied_at))).scalar()
    stamp = first.isoformat(sep=" ") if isinstance(first, datetime) else str(first)
    if conn.dialect.name == "sqlite":
        files = [row[2] for row in conn.exec_driver_sql("PRAGMA database_list") if row[1] == "main"]
        where = os.path.realpath(files[0]) if files and files[0] else ":memory:"
        return f"sqlite:{where} (gpuq schema of {stamp})"
    # "mysql" whatever the URL said: SQLAlchemy names mariadb+pymysql:// "mariadb", and a dispatcher on
    # the same database through mysql+pymysql:// was refused (a review)
    return f"mysql:{conn.execute(text('SELECT DATABASE()')).scalar()} (gpuq schema of {stamp})"
