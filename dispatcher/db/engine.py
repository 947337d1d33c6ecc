"""Engines and transactions: READ COMMITTED on MySQL, WAL + immediate locking on SQLite, and one retry loop
for the errors a busy database throws at correct code (deadlocks, lock wait timeouts, dropped links)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, select, text
from sqlalchemy.exc import DBAPIError, OperationalError

from dispatcher.db.migrations import add_missing, settle_seed_rows
from dispatcher.db.schema import SCHEMA_VERSION, metadata, schema_version

log = logging.getLogger("gpuq.db")
T = TypeVar("T")

# MySQL error codes worth retrying: deadlock, lock wait timeout, and the "server went away" family.
_RETRY_CODES = {1213, 1205, 2003, 2006, 2013, 2014, 2055, 4031}


class StoreUnavailable(Exception):
    """The database could not be reached or kept failing; the caller keeps its job and tries later."""


def driver_error(exc: BaseException) -> tuple[BaseException | None, int | None]:
    """The driver's own error and its code (MySQL's 1049, 1146, ...): on the exception itself (DBAPIError)
    or on the one a StoreUnavailable wraps; (None, None) when there is none."""
    orig = getattr(exc, "orig", None) or getattr(exc.__cause__, "orig", None)
    code = orig.args[0] if orig is not None and orig.args else None
    return orig, code if isinstance(code, int) else None


def utcnow() -> datetime:
    """Naive UTC, the form every timestamp column holds."""
    return datetime.now(UTC).replace(tzinfo=None)


def iso(value: datetime | None) -> str | None:
    """A timestamp column's naive UTC as an API shows it: ISO 8601 with a ``Z``."""
    return value.isoformat() + "Z" if value is not None else None


def naive_utc(value: datetime) -> datetime:
    """``value`` as a timestamp column holds it: converted to UTC first when it carries an offset (a
    ``not_before`` of 12:00+02:00 is 10:00 UTC), taken as UTC already when it carries none."""
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo is not None else value


def sqlite_file(url: str) -> str | None:
    """The file of an embedded (SQLite) database URL; None for another database or one in memory."""
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[-1]
    return path if path and path != ":memory:" else None


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    if url.startswith("sqlite"):
        if (path := sqlite_file(url)) is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Autocommit at the driver level; SQLAlchemy's begin() below issues BEGIN IMMEDIATE, which takes
            # the write lock up front: SQLite's stand-in for row locks (one writer at a time).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        # No pool_pre_ping: it costs a round trip per transaction. A dead connection raises a disconnect
        # error instead, SQLAlchemy invalidates the pool, and transaction() runs the work again.
        pool_recycle=3600,
        # Every transaction ends in an explicit COMMIT or ROLLBACK (engine.begin()), so the pool's own
        # rollback on check-in would be one more round trip per transaction for nothing.
        pool_reset_on_return=None,
        isolation_level="READ COMMITTED",
        connect_args={"connect_timeout": 5, "read_timeout": 30, "write_timeout": 30},
    )


def retryable(exc: DBAPIError) -> bool:
    """Whether running the transaction again may succeed: a deadlock, a lock wait, a lost connection."""
    if exc.connection_invalidated:
        return True
    orig, code = driver_error(exc)
    if code in _RETRY_CODES:
        return True
    return "database is locked" in str(orig)


def transaction(engine: Engine, fn: Callable[..., T], /, *args: Any, attempts: int = 6, **kwargs: Any) -> T:
    """Run ``fn(conn, *args, **kwargs)`` in one transaction, retrying deadlocks and dropped connections.

    Every store function is written so that running it again after a rollback is correct.
    """
    delay = 0.005
    for attempt in range(1, attempts + 1):
        try:
            with engine.begin() as conn:
                return fn(conn, *args, **kwargs)
        except DBAPIError as exc:
            delay = retry_after(exc, attempt, attempts, delay)
    raise AssertionError("unreachable")


def retry_after(exc: DBAPIError, attempt: int, attempts: int, delay: float) -> float:
    """After try ``attempt`` of ``attempts`` of a transaction failed with ``exc``: raise it (a lost or
    refused connection as ``StoreUnavailable``) unless it is worth another try, else wait ``delay`` with
    jitter and return the next, longer delay. One policy for ``transaction`` and the hot threads
    (``db/hot.py``), so a store outage looks the same to every caller."""
    if not retryable(exc) or attempt == attempts:
        if isinstance(exc, OperationalError):
            raise StoreUnavailable(str(exc.orig)) from exc
        raise exc
    log.debug("retrying transaction", extra={"action": "db_retry", "error": str(exc.orig)})
    time.sleep(delay * (1 + random.random()))  # noqa: S311 - jitter, not crypto
    return min(delay * 3, 1.0)


def max_packet(conn: Connection) -> int | None:
    """MySQL's max_allowed_packet: a bigger statement is not refused, the connection is dropped (see
    dispatcher/limits.py). None for SQLite, which has no such limit worth the name."""
    if conn.dialect.name == "sqlite":
        return None
    return int(conn.execute(text("SELECT @@max_allowed_packet")).scalar_one())


# Held while one process creates or upgrades the schema (MySQL/MariaDB named lock, per server).
SCHEMA_LOCK = "gpuq_schema"
SCHEMA_LOCK_SECONDS = 60


def init_schema(engine: Engine) -> None:
    """Create or upgrade the schema; safe to run from every dispatcher at every start, all at once.

    create_all's "does the table exist?" then "CREATE TABLE" is no transaction (MySQL DDL commits), so two
    dispatchers starting together on an empty database both tried to create the tables and one failed
    ("Table already exists"). On MySQL/MariaDB a named lock makes the starters take turns; the later ones
    find everything made. SQLite serialises writers itself."""
    lock = f"{SCHEMA_LOCK}:{engine.url.database}"[:64]  # MySQL's limit on lock names
    with engine.connect() as conn:
        named_lock = conn.dialect.name in ("mysql", "mariadb")
        if named_lock:
            got = conn.execute(
                text("SELECT GET_LOCK(:name, :seconds)"), {"name": lock, "seconds": SCHEMA_LOCK_SECONDS}
            ).scalar()
            conn.commit()
            if got != 1:
                raise StoreUnavailable(
                    f"another process held the schema lock for over {SCHEMA_LOCK_SECONDS} s"
                )
        try:
            add_missing(conn)  # tables of an earlier version: their new columns (db/migrations.py)
            metadata.create_all(conn, checkfirst=True)
            settle_seed_rows(conn)  # the replaced system's tasks in flight (db/migrations.py)
            have = conn.execute(select(schema_version.c.version)).scalars().all()
            if SCHEMA_VERSION not in have:
                conn.execute(schema_version.insert().values(version=SCHEMA_VERSION, applied_at=utcnow()))
            conn.commit()
        finally:
            # A connection lost meanwhile (its read timeout while an ALTER TABLE waited for a transaction
            # of another process) took the lock with it; releasing it there raised a second error that hid
            # the first and reached the operator as a traceback.
            if named_lock and not conn.invalidated:
                conn.rollback()  # whatever failed before the commit
                conn.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": lock})
                conn.commit()
