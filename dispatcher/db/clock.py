"""One clock for every process: the database's.

A lease is written by the dispatcher that claims a slot (``lease_expires_at = now + TASK_TIMEOUT_SECONDS``)
and judged by whichever dispatcher looks first (``lease_expires_at < now``). With each process on its own
clock, a machine 2 s ahead expires everyone else's leases 2 s early, and one 2 s behind writes leases that
end 2 s early for the others: jobs still running are declared lost and run twice. So each dispatcher reads
how far its clock is from the database server's, and every ``now`` it hands the store is on that clock.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Connection, text

from dispatcher.db.engine import utcnow

_SERVER_NOW = text("SELECT UTC_TIMESTAMP(6)")


def clock_offset(conn: Connection) -> timedelta:
    """The database server's UTC clock minus this process's, to within half a round trip. SQLite runs in
    this process, on this clock: zero."""
    if conn.dialect.name == "sqlite":
        return timedelta(0)
    before = utcnow()
    server = server_now(conn)
    after = utcnow()
    return server - (before + (after - before) / 2)


def server_now(conn: Connection) -> datetime:
    """The database server's UTC time now (this process's for SQLite, which runs on its clock). For a write
    that must count from when it really happens, not from the ``now`` its transaction was given: a
    transaction retried after a lost answer runs again with the ``now`` of its first try."""
    if conn.dialect.name == "sqlite":
        return utcnow()
    value: datetime = conn.execute(_SERVER_NOW).scalar_one()
    return value
