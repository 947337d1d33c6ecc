"""Private Redis and MariaDB servers on spare ports, so tests can stop and restart them without touching
the shared ones. Redis keeps an fsync-always AOF, so a restart loses nothing (as production Redis must)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pymysql
import redis

from tests.dispatcher.harness import free_port
from tests.dispatcher.helpers import wait_for


class _PrivateServer:
    """A server process of the test's own in a temporary folder: started until ``up``, stopped with SIGTERM
    (a clean shutdown, so a restart finds its data), its folder removed at ``close``."""

    #: How long a start or a clean stop may take.
    seconds = 20.0

    def __init__(self, prefix: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def _start(self, argv: list[str], probe: Callable[[], object], down: type[Exception], what: str) -> None:
        """Run ``argv`` until ``probe`` passes; ``down`` is what it raises while the server is not up yet."""
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            try:
                probe()
            except down:
                return False
            return True

        wait_for(up, self.seconds, 0.05, what=what)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(self.seconds)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis(_PrivateServer):
    def __init__(self) -> None:
        super().__init__("gpuq-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._start(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.dir),
            ],
            lambda: redis.Redis.from_url(self.url).ping(),
            redis.ConnectionError,
            "private redis up",
        )


class PrivateMariaDB(_PrivateServer):
    seconds = 60.0

    def __init__(self) -> None:
        super().__init__("gpuq-mariadb-")
        (self.dir / "tmp").mkdir()
        subprocess.run(
            [
                "mariadb-install-db",
                "--no-defaults",
                f"--datadir={self.dir / 'data'}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--user=root",
                f"--tmpdir={self.dir / 'tmp'}",  # its bootstrap server cleans its tmpdir too: see start()
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @property
    def url(self) -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/gpuq"

    def start(self) -> None:
        self._start(
            [
                "mariadbd",
                "--no-defaults",
                f"--datadir={self.dir / 'data'}",
                f"--port={self.port}",
                f"--socket={self.dir / 'sock'}",
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-grant-tables",
                "--innodb-buffer-pool-size=64M",
                f"--pid-file={self.dir / 'pid'}",
                # its own: at start a server deletes every #sql* file in its tmpdir, which in /tmp were the
                # live temporary tables of the machine's shared server (CI: "Error on delete of
                # '/tmp/#sql-temptable-…MAI' (Errcode: 2)" in another test's information_schema query)
                f"--tmpdir={self.dir / 'tmp'}",
            ],
            self._create_database,
            pymysql.err.OperationalError,
            "private mariadb up",
        )

    def _create_database(self) -> None:
        conn = pymysql.connect(host="127.0.0.1", port=self.port, user="root", connect_timeout=1)
        try:
            with conn.cursor() as cur:
                cur.execute("CREATE DATABASE IF NOT EXISTS gpuq")
        finally:
            conn.close()
