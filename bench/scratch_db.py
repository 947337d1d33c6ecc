"""A throwaway MariaDB database for one micro-benchmark run (``bench.endstmt``, ``bench.hotpath``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text


@contextmanager
def scratch_database(mysql: str, prefix: str) -> Iterator[str]:
    """A new database named ``prefix_<random>`` on the server at ``mysql`` (user[:pw]@host:port); yields its
    name (a run may open it through more than one driver) and drops it afterwards, also when the run fails,
    so runs never leave tables behind or read an earlier run's."""
    db = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(f"mysql+pymysql://{mysql}/")
    with admin.begin() as conn:
        conn.execute(text(f"CREATE DATABASE {db}"))
    try:
        yield db
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP DATABASE {db}"))
        admin.dispose()
