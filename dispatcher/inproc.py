"""The whole dispatcher (loop, HTTP server, housekeeping) in a thread of the caller's process, for tests.

``python -m dispatcher`` costs a test its interpreter start, imports and readiness poll (1-3 s, 15 s on a
loaded machine) for each process, and most scenarios only push jobs and look at the outcome. An
``InProcessDispatcher`` runs exactly what ``python -m dispatcher`` runs (``build_server`` of
``dispatcher/serve.py``: the same app, lifespan, Redis clients, uvicorn with its guarded protocol on a
real loopback port, the background loop and wake-ups) in a thread with its own event loop, against the real
stores. GPU services reach it over real HTTP. What it cannot be is a process: it cannot be killed with
SIGKILL, and the process-wide things (signals, the open-file limit, ``./.env``) are not its own. The tests
of those keep ``DispatcherProcess`` and are marked ``slow``.

Its interface is ``DispatcherProcess``'s (``start``, ``url``, ``stop``, ``term``, ``post_callback``,
``logs``), so a scenario chooses one or the other with one word. ``stop``/``term`` are the graceful stop of
SIGTERM (drain, then shut down); ``wait_idle`` waits until the queues are empty and nothing is in flight,
like arq's ``Worker(burst=True)``, with a deadline.

Each one's own records go to its log file (JSON lines, as a process writes them): a record belongs to the
dispatcher whose thread or task (context) logged it, so two dispatchers in one test keep separate logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Self

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource
from sqlalchemy import Engine, text

from dispatcher.db.engine import make_engine
from dispatcher.logs import JsonFormatter, TextFormatter
from dispatcher.loop.core import Dispatcher
from dispatcher.preflight import StartProblem, listen, preflight
from dispatcher.serve import _Server, announce, build_server
from dispatcher.settings import DispatcherSettings
from dispatcher.testing import LoopbackDispatcher, ProcessFailed, free_port, is_ready
from producer.errors import ConfigError
from producer.keys import queue_lists
from producer.settings import load

#: The in-process dispatcher whose code is running: set in its thread, inherited by its tasks and by
#: ``asyncio.to_thread`` work, read by its log handler.
_CURRENT: contextvars.ContextVar[InProcessDispatcher | None] = contextvars.ContextVar(
    "gpuq_inproc", default=None
)


#: The loggers an in-process dispatcher lets through at its LOG_LEVEL, their levels before the first one
#: started, and the handlers of those running (guarded by the lock: tests may start them from threads).
_LOGGERS = ("gpuq", "uvicorn.error")
_LEVELS: dict[str, int] = {}
_HANDLERS: set[logging.Handler] = set()
_LEVELS_LOCK = threading.Lock()


class _OnlyGiven(DispatcherSettings):
    """The settings given and nothing else: not the test process's environment nor its ./.env (a process
    gets an environment scrubbed of every dispatcher variable, see ``testing.process_env``)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


class _ThreadServer(_Server):
    """``python -m dispatcher``'s server without signal handlers (a thread cannot install them; SIGTERM is
    ``stop``/``term``), remembering its event loop so other threads can reach it."""

    loop: asyncio.AbstractEventLoop | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def serve(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)


class _Mine(logging.Filter):
    def __init__(self, owner: InProcessDispatcher) -> None:
        super().__init__()
        self.owner = owner

    def filter(self, record: logging.LogRecord) -> bool:
        return _CURRENT.get() is self.owner or record.thread == self.owner.thread_id


class InProcessDispatcher(LoopbackDispatcher):
    """The dispatcher with ``settings`` (environment variable names, as for a process) on loopback
    (CALLBACK_PORT: a free port unless given), logging to ``<name>.log`` in ``workdir``. Each start is a new
    dispatcher with a new DISPATCHER_ID (``<name>-<random>``), unless ``settings`` name one."""

    def __init__(
        self, settings: Mapping[str, str], *, name: str = "dispatcher", workdir: Path | None = None
    ) -> None:
        self.name = name
        self._port_given = bool(settings.get("CALLBACK_PORT"))
        self.port = int(settings.get("CALLBACK_PORT") or free_port())
        self.env = {"CALLBACK_HOST": "127.0.0.1", **settings, "CALLBACK_PORT": str(self.port)}
        self.fixed_id = settings.get("DISPATCHER_ID")
        self.log_path = (workdir or Path(tempfile.mkdtemp(prefix="gpuq-disp-"))) / f"{name}.log"
        # Its journal of sent requests where a process run in ``workdir`` keeps it (not the test's checkout)
        self.env.setdefault("STATE_DIR", str(self.log_path.parent / ".gpuq"))
        self.server: _ThreadServer | None = None
        self.thread: threading.Thread | None = None
        self.thread_id: int | None = None
        self.returncode: int | None = None
        self.error: BaseException | None = None
        self._holder: dict[str, Dispatcher] = {}
        self._handler: logging.Handler | None = None
        self._socks: list[socket.socket] = []

    @property
    def dispatcher(self) -> Dispatcher:
        """The running Dispatcher (for what a test reads of it; its methods belong to its loop's thread)."""
        return self._holder["d"]

    def start(self, timeout: float = 60.0) -> Self:
        """Build it as ``python -m dispatcher`` does (settings, preflight, server) and serve until ready;
        a bad setting, a failed preflight, a crash or no readiness in time raises ProcessFailed."""
        self.env["DISPATCHER_ID"] = self.fixed_id or f"{self.name}-{uuid.uuid4().hex[:6]}"
        settings = self._bind()
        self._log_to_file(settings)
        mine = _CURRENT.set(self)  # what it logs while starting is its own
        try:
            announce(settings)
            engine = make_engine(settings.db_url())
            try:
                preflight(settings, engine)
            except StartProblem as exc:
                engine.dispose()
                self._unlog()
                self._close_socks()
                raise ProcessFailed(f"{self.name}: {exc.message}") from exc
        finally:
            _CURRENT.reset(mine)
        server, self._holder = build_server(
            settings, engine, settings.http_max_connections, server_cls=_ThreadServer
        )
        assert isinstance(server, _ThreadServer)
        self.server = server
        self.returncode = None
        self.thread = threading.Thread(target=self._main, name=f"gpuq-inproc-{self.name}", daemon=True)
        self.thread.start()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop(5)
            raise
        return self

    def _main(self) -> None:
        _CURRENT.set(self)
        self.thread_id = threading.get_ident()
        assert self.server is not None
        try:
            self.server.run(sockets=self._socks)  # bound by start(), as python -m dispatcher does
        except BaseException as exc:  # uvicorn exits (SystemExit) when it cannot serve
            self.error = exc
        finally:
            self._close_socks()
        d = self._holder.get("d")
        failed = self.error is not None or not self.server.started or (d is not None and d.fatal is not None)
        self.returncode = 1 if failed else 0

    def _bind(self) -> DispatcherSettings:
        """Its settings, with its sockets bound and listening, as ``python -m dispatcher`` binds them before
        it starts. A port picked free that another process took meanwhile is picked again (uvicorn bound it
        only after the dispatcher had started: "address already in use", a test failed in a busy suite)."""
        for tries in range(1, 6):
            try:
                settings = load(_OnlyGiven, **{k.lower(): v for k, v in self.env.items()})
            except ConfigError as exc:
                raise ProcessFailed(f"{self.name}: {exc.message}") from exc
            refusal = settings.open_api_refusal()
            if refusal is not None:
                raise ProcessFailed(f"{self.name}: {refusal}")
            try:
                self._socks = listen(settings)
                return settings
            except StartProblem as exc:
                if self._port_given or "another process listens there" not in exc.message or tries == 5:
                    raise ProcessFailed(f"{self.name}: {exc.message}") from exc
            self.port = free_port()
            self.env["CALLBACK_PORT"] = str(self.port)
        raise AssertionError("unreachable")

    def _close_socks(self) -> None:
        for sock in self._socks:
            sock.close()
        self._socks = []

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.thread is not None
            assert self.server is not None
            if not self.thread.is_alive():
                why = f"{self.returncode} ({self.error!r})"
                raise ProcessFailed(f"{self.name} exited with {why}:\n{self.logs()}")
            if self.server.started and is_ready(self.url):
                return
            if time.monotonic() > deadline:
                raise ProcessFailed(f"{self.name} not ready after {timeout:g} s:\n{self.logs()}")
            time.sleep(0.02)

    def _log_to_file(self, settings: DispatcherSettings) -> None:
        """Its records, and only its, to its log file at LOG_LEVEL (the loggers it uses are let through at
        that level; the test process's other handlers see them as they see any record)."""
        handler = logging.FileHandler(self.log_path, encoding="utf-8")
        handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
        handler.setLevel(settings.log_level.upper())
        handler.addFilter(_Mine(self))
        with _LEVELS_LOCK:
            for name in _LOGGERS:
                logger = logging.getLogger(name)
                _LEVELS.setdefault(name, logger.level)
                if logger.getEffectiveLevel() > handler.level:
                    logger.setLevel(handler.level)
            _HANDLERS.add(handler)
        logging.getLogger().addHandler(handler)
        self._handler = handler

    def _unlog(self) -> None:
        """Its handler removed; once no in-process dispatcher logs any more, the loggers' levels are what
        they were, so no later test of this worker sees records only because a dispatcher ran before it."""
        if self._handler is None:
            return
        logging.getLogger().removeHandler(self._handler)
        self._handler.close()
        with _LEVELS_LOCK:
            _HANDLERS.discard(self._handler)
            if not _HANDLERS:
                for name, level in _LEVELS.items():
                    logging.getLogger(name).setLevel(level)
                _LEVELS.clear()
        self._handler = None

    def _call(self, fn: Any, *args: Any) -> bool:
        """``fn(*args)`` on its event loop; False when that loop is gone."""
        loop = self.server.loop if self.server is not None else None
        if loop is None or loop.is_closed():
            return False
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # closed meanwhile
            return False
        return True

    def alive(self) -> bool:
        """Started and not stopped (a crash of a part of it stops it, as it ends the process)."""
        return self.thread is not None and self.thread.is_alive()

    def term(self, timeout: float = 30.0) -> int:
        """What SIGTERM does to the process: drain (SHUTDOWN_GRACE_SECONDS), shut down; its exit code."""
        assert self.server is not None, "start() first"
        assert self.thread is not None
        self._call(self.server.handle_exit, signal.SIGTERM, None)
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"{self.name} did not stop within {timeout:g} s")
        self._unlog()
        assert self.returncode is not None
        return self.returncode

    def stop(self, grace: float = 30.0) -> int | None:
        """A graceful stop (as ``term``); after ``grace`` seconds uvicorn is told to stop at once. None when
        it never started."""
        if self.server is None or self.thread is None:
            return None
        if self.thread.is_alive():
            self._call(self.server.handle_exit, signal.SIGTERM, None)
            self.thread.join(grace)
        if self.thread.is_alive():
            self.server.should_exit = self.server.force_exit = True
            self.thread.join(10)
        self._unlog()
        return self.returncode

    def stop_quietly(self) -> None:
        """The end of a test: stop without a drain (a process would be killed; this one shuts down), its
        connections closed first: an event stream or long poll a test left open would hold uvicorn's
        shutdown for its whole grace period."""
        if self.server is not None and self.thread is not None and self.thread.is_alive():
            self._call(self._close_connections)
            self.server.should_exit = True
            self.thread.join(30)
            if self.thread.is_alive():
                self.server.force_exit = True
                self.thread.join(10)
        self._unlog()

    def _close_connections(self) -> None:
        assert self.server is not None
        self.server.config.timeout_graceful_shutdown = 1
        for connection in list(self.server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.close()

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Burst mode's end: wait until every queue list and processing list of its queues is empty, no
        task is ``processing`` or ``retrying`` and the dispatcher has no request or hand-off in flight
        (seen twice in a row, so a job between two of those places is not missed). TimeoutError with what
        is still busy."""
        assert self.server is not None, "start() first"
        assert self.server.loop is not None
        deadline = time.monotonic() + timeout
        quiet = 0
        while True:
            busy = asyncio.run_coroutine_threadsafe(self._busy(), self.server.loop).result(timeout)
            quiet = quiet + 1 if not busy else 0
            if quiet >= 2:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} still busy after {timeout:g} s: {busy}")
            time.sleep(0.05)

    async def _busy(self) -> dict[str, int]:
        """What is still to do, by place (empty: idle); read in its loop with its own clients."""
        d = self.dispatcher
        rt = d.rt
        out: dict[str, int] = {}
        if d.inflight:
            out["inflight"] = len(d.inflight)
        for queue in rt.settings.all_queues:
            for name in (*queue_lists(queue), rt.keys.proc(queue, rt.settings.dispatcher_id)):
                n = int(await rt.redis.llen(name))
                if n:
                    out[name] = n

        n = await asyncio.to_thread(_running, rt.engine)
        if n:
            out["processing or retrying"] = n
        return out


def _running(engine: Engine) -> int:
    """Tasks holding a slot or due again after a backoff (scheduled ones may wait for hours: not work)."""
    with engine.connect() as conn:
        sql = "SELECT COUNT(*) FROM tasks WHERE state IN ('processing', 'retrying')"
        return int(conn.execute(text(sql)).scalar_one())
