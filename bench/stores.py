"""The benchmark's own state: a Redis logical database and a MariaDB database nobody else uses.

The Redis db is claimed the way the test suite claims one (empty, then a marker key set NX), so a test run
and a benchmark on the same server never share a db; it is flushed before every run and at the end. The
MariaDB database ``gpuq_bench_<id>`` is created afresh for every gpuq run and dropped at the end.
"""

from __future__ import annotations

import uuid
from datetime import datetime

import pymysql
import redis
from sqlalchemy.engine import make_url

MARKER = "gpuq:bench-owner"
MARKER_TTL_S = 3 * 3600


class StoreError(Exception):
    """Redis or MariaDB cannot be used for the benchmark; the message says which and why."""


class BenchRedis:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.owner = uuid.uuid4().hex[:8]
        self.db = self._claim()

    @property
    def url(self) -> str:
        return f"{self.base_url}/{self.db}"

    def _client(self, db: int) -> redis.Redis:
        return redis.Redis.from_url(f"{self.base_url}/{db}", socket_connect_timeout=2)

    def _claim(self) -> int:
        try:
            for db in range(15, 0, -1):  # from the top: the test suite claims from db 1 upwards
                client = self._client(db)
                try:
                    if client.dbsize() == 0 and client.set(MARKER, self.owner, nx=True, ex=MARKER_TTL_S):
                        return db
                finally:
                    client.close()
        except redis.RedisError as exc:
            raise StoreError(f"Redis at {self.base_url} does not answer: {exc}") from exc
        raise StoreError(f"no empty Redis database (1-15) left at {self.base_url}")

    def flush(self) -> None:
        """Empty the db between runs; the marker goes back at once so nobody else takes it meanwhile."""
        client = self._client(self.db)
        try:
            client.flushdb()
            client.set(MARKER, self.owner, ex=MARKER_TTL_S)
        finally:
            client.close()

    def info_cpu(self) -> float:
        """Redis's own CPU seconds so far (server-wide: other users of the server count too)."""
        client = self._client(self.db)
        try:
            info = client.info("cpu")
        finally:
            client.close()
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def release(self) -> None:
        client = self._client(self.db)
        try:
            client.flushdb()
        finally:
            client.close()


class BenchDatabase:
    def __init__(self, server_url: str) -> None:
        self.server = make_url(server_url)
        self.name = f"gpuq_bench_{uuid.uuid4().hex[:8]}"

    @property
    def url(self) -> str:
        return self.server.set(database=self.name).render_as_string(hide_password=False)

    def _admin(self) -> pymysql.connections.Connection:
        try:
            return pymysql.connect(
                host=self.server.host or "127.0.0.1",
                port=self.server.port or 3306,
                user=self.server.username or "root",
                password=self.server.password or "",
                connect_timeout=5,
            )
        except pymysql.err.OperationalError as exc:
            raise StoreError(
                f"MariaDB at {self.server.host}:{self.server.port} does not answer: {exc}"
            ) from exc

    def recreate(self) -> None:
        conn = self._admin()
        try:
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{self.name}`")
                cur.execute(f"CREATE DATABASE `{self.name}` CHARACTER SET utf8mb4")
        finally:
            conn.close()

    def drop(self) -> None:
        conn = self._admin()
        try:
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{self.name}`")
        finally:
            conn.close()

    def states(self) -> dict[str, int]:
        """Tasks per state, the end-of-run check that every job finished exactly once."""
        conn = self._admin()
        try:
            with conn.cursor() as cur:
                cur.execute(f"SELECT state, COUNT(*) FROM `{self.name}`.tasks GROUP BY state")
                return {str(state): int(count) for state, count in cur.fetchall()}
        finally:
            conn.close()

    def started_ahead(self, task_id: str, since: datetime) -> int | None:
        """Tasks the dispatchers started (recorded ``processing``) after ``since`` (naive UTC) and before
        ``task_id``: the jobs that overtook it once it was enqueued. None when it never started."""
        conn = self._admin()
        try:
            with conn.cursor() as cur:
                cur.execute(f"SELECT started_at FROM `{self.name}`.tasks WHERE task_id = %s", (task_id,))
                row = cur.fetchone()
                if row is None or row[0] is None:
                    return None
                cur.execute(
                    f"SELECT COUNT(*) FROM `{self.name}`.tasks WHERE started_at > %s AND started_at < %s",
                    (since, row[0]),
                )
                (count,) = cur.fetchone() or (0,)
                return int(count)
        finally:
            conn.close()
