"""The processes the demo runs beside itself: Redis (one that answers, or a ``redis-server`` of its own) and
``python -m dispatcher``. Both get their own process group, so a Ctrl-C reaches the demo alone and the demo
stops them in order (the dispatcher must drain while the GPUs and Redis are still there)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from dispatcher.testing import DispatcherProcess, ProcessFailed, free_port, stop_process

INSTALL_HINT = """\
No Redis answers on 127.0.0.1:{port} and there is no redis-server to start one.
Install it, then run `make demo` again:
    Debian/Ubuntu:  sudo apt-get install redis-server
    Fedora:         sudo dnf install redis
    macOS:          brew install redis
or start one in a container:  docker run -d -p 6379:6379 redis:7"""


class DemoError(Exception):
    """The demo cannot go on; the message tells the user why (and what to do)."""


def _wait(
    ready: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float, what: str, log: Path
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"{what} exited with code {proc.returncode}:\n{tail(log)}")
        if ready():
            return
        time.sleep(0.05)
    raise DemoError(f"{what} not ready after {timeout:.0f} s:\n{tail(log)}")


def tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class RedisService:
    url: str
    proc: subprocess.Popen[bytes] | None = None  # None: a Redis that was already running

    @classmethod
    def find_or_start(cls, port: int, workdir: Path) -> RedisService:
        if _answers(port):
            return cls(f"redis://127.0.0.1:{port}/0")
        exe = shutil.which("redis-server")
        if exe is None:
            raise DemoError(INSTALL_HINT.format(port=port))
        own = free_port()
        log = workdir / "redis.log"
        # No persistence: the demo's Redis lives as long as the demo.
        argv = [
            "--port",
            str(own),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(  # noqa: S603 - redis-server from PATH, our own arguments
                [exe, *map(str, argv)],
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0,
            )
        service = cls(f"redis://127.0.0.1:{own}/0", proc)
        try:
            _wait(lambda: _answers(own), proc, 20, "redis-server", log)
        except BaseException:
            service.stop()
            raise
        return service

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)


def _answers(port: int) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:  # nothing there, or one that wants a password: not ours to use
        return False
    finally:
        client.close()


def start_dispatcher(settings: dict[str, str], workdir: Path, grace: float = 5.0) -> DispatcherProcess:
    """``python -m dispatcher`` in ``workdir`` with only the demo's settings (dispatcher/testing.py drops
    every variable the dispatcher reads from the inherited environment, so a developer's DATABASE_URL,
    DB_HOST or API_TOKEN cannot point the demo at a real database or lock it out of its own API); stop it
    with ``stop(grace + 10)``: SIGTERM, it stops taking jobs, lets running ones call back, exits 0."""
    process = DispatcherProcess(
        settings
        | {
            "SHUTDOWN_GRACE_SECONDS": str(grace),
            "LOG_FORMAT": "text",
            "LOG_LEVEL": "WARNING",  # a line per attempt would cost the dispatcher CPU the demo measures
        },
        name="dispatcher",
        workdir=workdir,
    )
    try:
        return process.start(60)
    except ProcessFailed as exc:
        raise DemoError(f"the dispatcher did not start: {exc}") from None
