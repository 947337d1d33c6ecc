"""Running a dispatcher for tests, the demo and the benchmark: in this process, or as a real process.

**In process** (``in_process``): a ``Dispatcher`` inside the caller's event loop, against the real stores,
for tests that must be exact. It starts without its background tasks (``background=False``): no loop, no
wake-up listener, no housekeeping. The test then plays every part in the order it chooses:
``await d.dispatch_once()`` is one pass of the loop, ``await d.end_attempt(...)`` is a callback (hand-off
included), ``await settle(d)`` waits until every request, hand-off and Redis settlement it started is done,
and ``run_until_idle`` is the loop in burst mode. With ``background=True`` it is the daemon minus HTTP.

    async with in_process(settings) as d:
        await d.dispatch_once()
        await settle(d)

**As a process** (``DispatcherProcess``): the real ``python -m dispatcher`` with its own port and log file,
ready once ``/readyz`` answers 200, stopped with SIGTERM (graceful) or SIGKILL (a crash). Its environment
is the caller's settings over the inherited one minus every variable the dispatcher reads, so a developer's
DATABASE_URL or API_TOKEN never points a test, the demo or a benchmark run at a real database or locks it
out of its own API.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self

import httpx

from dispatcher import stacks
from dispatcher.db.engine import make_engine
from dispatcher.loop.core import Dispatcher
from dispatcher.settings import DispatcherSettings
from producer.connect import async_client, initialized

ROOT = Path(__file__).resolve().parents[1]


@asynccontextmanager
async def in_process(settings: DispatcherSettings, *, background: bool = False) -> AsyncIterator[Dispatcher]:
    engine = make_engine(settings.db_url(), pool_size=4)
    redis = async_client(settings.redis_dsn(), cluster=settings.redis_cluster)
    d = Dispatcher(settings, engine, await initialized(redis))
    try:
        await d.start(background=background)
        yield d
    finally:
        await d.stop()
        await redis.aclose()
        engine.dispose()


class ProcessFailed(RuntimeError):
    """A dispatcher process exited, or was not ready in time; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_env(settings: Mapping[str, str]) -> dict[str, str]:
    """The inherited environment minus every variable the dispatcher reads, then ``settings``; the repository
    on PYTHONPATH, output unbuffered (its log is read while it runs)."""
    own = {name.upper() for name in DispatcherSettings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in own}
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env | {"PYTHONPATH": path, "PYTHONUNBUFFERED": "1"} | dict(settings)


def stop_process(proc: subprocess.Popen[bytes], grace: float) -> int:
    """SIGTERM (every process of gpuq's stops gracefully on it), SIGKILL after ``grace`` seconds; the exit
    code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def is_ready(url: str) -> bool:
    """``/readyz`` answers 200: the HTTP server is up and Redis and the database answer."""
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


class LoopbackDispatcher:
    """What a test holds of a dispatcher on loopback, run as a process (``DispatcherProcess``) or in this
    one (``dispatcher.inproc.InProcessDispatcher``): its port and log file, set by the subclass, and the
    ways in that do not depend on how it runs, so both answer a test the same way."""

    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post_callback(self, body: Mapping[str, Any], token: str | None = None) -> httpx.Response:
        """``POST /callback`` as a GPU service sends it: ``body`` as JSON, the callback token (if any) as a
        Bearer header."""
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return httpx.post(f"{self.url}/callback", json=dict(body), headers=headers, timeout=10)

    def logs(self, chars: int = 6000) -> str:
        """The last ``chars`` characters of its log, for an assertion's message."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


class DispatcherProcess(LoopbackDispatcher):
    """``python -m dispatcher`` on loopback with ``settings`` (CALLBACK_PORT: a free port unless given), run
    in ``workdir`` (embedded mode's default database is ./.gpuq/gpuq.db there), logging to ``<name>.log``
    in it. Each start is a new process with a new DISPATCHER_ID (``<name>-<random>``), unless ``settings``
    name one (a restart as systemd does it, with the id of its unit)."""

    def __init__(
        self, settings: Mapping[str, str], *, name: str = "dispatcher", workdir: Path | None = None
    ) -> None:
        self.name = name
        self.port = int(settings.get("CALLBACK_PORT") or free_port())
        self.env = process_env({"CALLBACK_HOST": "127.0.0.1", **settings, "CALLBACK_PORT": str(self.port)})
        self.log_path = (workdir or Path(tempfile.mkdtemp(prefix="gpuq-disp-"))) / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.fixed_id = settings.get("DISPATCHER_ID")

    def spawn(self, prefix: list[str] | None = None) -> None:
        """Start the process without waiting for it (a kill may come before it is ready); ``prefix`` wraps
        the command (``faketime``, ``prlimit``)."""
        self.env["DISPATCHER_ID"] = self.fixed_id or f"{self.name}-{uuid.uuid4().hex[:6]}"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - this interpreter, the caller's wrapper (tests)
                [*(prefix or []), sys.executable, "-m", "dispatcher"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.log_path.parent,
                process_group=0,  # a Ctrl-C at the terminal is the caller's to pass on, as SIGTERM
            )

    def start(self, timeout: float = 60.0) -> Self:
        """Spawn and wait until ready; a process that exits or is not ready in time is stopped and raised
        as ProcessFailed with the end of its log. The bound is generous because the wait ends at readiness:
        on a loaded 2-core machine the imports alone once took 15 s."""
        self.spawn()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop(5)
            raise
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None, "spawn() first"
            if self.proc.poll() is not None:
                raise ProcessFailed(f"{self.name} exited with {self.proc.returncode}:\n{self.logs()}")
            if is_ready(self.url):
                return
            if time.monotonic() > deadline:
                raise ProcessFailed(f"{self.name} not ready after {timeout:g} s:\n{self.logs()}")
            time.sleep(0.05)

    def alive(self) -> bool:
        """Started and not exited (as ``InProcessDispatcher.alive``)."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash at an arbitrary instant."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def dump_stacks(self, wait: float = 1.0) -> str:
        """SIGUSR1 (dispatcher/stacks.py), then the end of the log holding the dump: what a hung process was
        waiting for, for a failed test's report."""
        if not self.alive():
            return f"{self.name}: not running\n{self.logs()}"
        assert self.proc is not None
        before = self._dumps()
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + wait
        while self._dumps() <= before and time.monotonic() < deadline:
            time.sleep(0.05)
        return f"{self.name}:\n{self.logs(40_000)}"

    def _dumps(self) -> int:
        """How many stack dumps its log holds so far (a second one must not be mistaken for the first)."""
        try:
            return self.log_path.read_text(errors="replace").count(stacks.END)
        except OSError:
            return 0

    def term(self, timeout: float = 30.0) -> int:
        """SIGTERM, and its exit code (a graceful stop hands its jobs back and exits 0)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM, SIGKILL after ``grace`` seconds; None when it never started."""
        return None if self.proc is None else stop_process(self.proc, grace)

    def run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run it in the foreground until it exits, its output captured: for what must stop it at start (a
        bad setting, a store that does not answer, an argument)."""
        return subprocess.run(  # noqa: S603 - this interpreter, the caller's arguments (tests)
            [sys.executable, "-m", "dispatcher", *args],
            check=False,
            env=self.env,
            cwd=self.log_path.parent,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


async def settle(d: Dispatcher) -> None:
    """Until the background work this dispatcher started (requests and their answers, hand-off
    settlements, event publishing) is done, including what that work started in turn."""
    while d.inflight:
        await asyncio.wait(set(d.inflight))


async def run_until_idle(d: Dispatcher, *, passes: int = 10_000) -> int:
    """The loop in burst mode: passes until one finds nothing to do and nothing is in flight; returns how
    many passes did something. Ends of attempts still come from the test (or the GPUs' callbacks)."""
    for busy in range(passes):
        d.slot_freed()  # each pass looks at the free slots, as the loop's idle timeout would
        did = await d.dispatch_once()
        await settle(d)
        if not did:
            return busy
    raise RuntimeError(f"still busy after {passes} passes")
