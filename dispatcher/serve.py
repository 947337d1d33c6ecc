"""The dispatcher process (``python -m dispatcher``): the dispatch loop and the HTTP server (callback, status,
metrics) in one process.

uvicorn owns the signals: SIGTERM/SIGINT make it stop accepting requests and run the app's lifespan exit,
which stops the dispatcher gracefully (see Dispatcher.stop). Exit code 0 after a clean stop, 1 when a part
of the dispatcher died, 2 for a bad setting, 3 when a store is unreachable at start (see preflight.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn
from redis.asyncio import Redis
from sqlalchemy import Engine

from dispatcher import stacks
from dispatcher.db.engine import make_engine
from dispatcher.http.app import MAX_BODY_BYTES, create_app
from dispatcher.http.callback import CallbackFastPath
from dispatcher.http.callback_check import check_callback_url
from dispatcher.http.edge_limits import GuardedHttp, raise_open_files
from dispatcher.logs import setup_logging
from dispatcher.loop.core import Dispatcher
from dispatcher.preflight import StartProblem, listen, preflight
from dispatcher.queues.event_hub import EventHub
from dispatcher.queues.presence import client_name
from dispatcher.settings import DispatcherSettings
from producer.connect import async_client, async_pool, initialized
from producer.errors import ConfigError
from producer.keys import Keys
from producer.settings import load

log = logging.getLogger("gpuq.main")


class _Server(uvicorn.Server):
    """uvicorn's server with a drain step: the first SIGTERM/SIGINT stops the dispatcher taking jobs and
    waits (up to SHUTDOWN_GRACE_SECONDS) for its running attempts to call back while callbacks are still
    served; then uvicorn shuts down. A second signal stops at once. A graceful stop exits 0 (uvicorn would
    re-raise the signal)."""

    dispatcher: Dispatcher | None = None
    grace: float = 10.0
    #: The signal that stopped the start before the dispatcher existed (``make`` then starts none).
    interrupted_by: int | None = None
    _draining = False
    _drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self.dispatcher is None:
            self.should_exit = True
            if self._draining:
                self.force_exit = sig == signal.SIGINT
            elif not self.started and self.interrupted_by is None:
                # Before, the lifespan went on to start the dispatcher, which took jobs, sent them, and then
                # stopped without draining: their slots held until the lease, the jobs run again (a trial).
                self.interrupted_by = sig
            return
        self._draining = True
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(self.dispatcher), name="drain")

    async def _drain(self, d: Dispatcher) -> None:
        try:
            await d.drain(self.grace)
        finally:
            self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


USAGE = """usage: python -m dispatcher  (no arguments; settings from the environment)

The gpuq dispatcher: takes jobs from the Redis queues (TASK_QUEUES), gives each a free slot of a GPU service
(GPU_ENDPOINTS, or `gpuq gpu add`), and serves callbacks, /tasks, /gpus, /metrics and the dashboard on
CALLBACK_HOST:CALLBACK_PORT. All settings come from the environment and ./.env (.example.env lists them);
CALLBACK_SECRET is required. SIGTERM/SIGINT stop it gracefully.

Exit codes: 0 stopped cleanly, 1 a part of the dispatcher died, 2 a bad setting (CALLBACK_PORT in use, the
DISPATCHER_ID of a running dispatcher included), 3 Redis or the database unreachable at start.
"""


def _arguments() -> int | None:
    """--help prints usage (0); any other argument stops the start (2): ``--port 9000`` must not be ignored
    silently, settings come only from the environment. None: no arguments, go on."""
    args = sys.argv[1:]
    if any(arg in ("-h", "--help") for arg in args):
        sys.stdout.write(USAGE)
        return 0
    if args:
        sys.stderr.write(
            f"gpuq dispatcher: takes no arguments ({' '.join(args)}): settings come from the environment"
            " and ./.env, e.g. CALLBACK_PORT=9000 (see --help)\n"
        )
        return 2
    return None


def announce(settings: DispatcherSettings) -> None:
    """What the log says at start about settings that work but deserve a look: an API open to the network
    (API_TOKEN=none), embedded mode, a setting without effect."""
    open_api = settings.open_api_warning()
    if open_api is not None:
        log.warning(open_api, extra={"action": "open_api", "host": settings.callback_host})
    for warning in (settings.standby_warning(), settings.lease_warning()):
        if warning is not None:
            log.warning(warning, extra={"action": "config"})
    url = settings.db_url()
    if url.startswith("sqlite"):
        why = "DATABASE_URL is SQLite" if settings.database_url else "no DATABASE_URL or DB_HOST"
        log.warning(
            "%s: embedded mode on SQLite (one dispatcher process only)",
            why,
            extra={"action": "embedded", "database": url},
        )


def build_server(
    settings: DispatcherSettings,
    engine: Engine,
    max_connections: int,
    server_cls: type[_Server] = _Server,
    *,
    own_process: bool = False,
) -> tuple[_Server, dict[str, Dispatcher]]:
    """The HTTP server with the dispatcher in its lifespan, not started: ``python -m dispatcher`` runs it,
    and ``dispatcher.inproc`` runs the very same in a thread of a test (``server_cls`` without signals).
    The dict holds the Dispatcher once the lifespan made it. ``own_process``: the process is the
    dispatcher's own, so its heap is frozen (``freeze_heap``; in a test's process it would cost every
    in-process dispatcher a full collection) and SIGUSR1 dumps its loop's tasks (dispatcher/stacks.py)."""
    # One client (pool) per user, so none waits for another's connections: the dispatch loop, the heartbeat,
    # task events (published on callbacks), and the HTTP routes (a blocking pool: a burst waits its turn
    # instead of failing; event streams share one subscription, see event_hub.py).
    options: dict[str, Any] = {"socket_timeout": 10, "socket_connect_timeout": 5, "health_check_interval": 15}

    # Named (CLIENT LIST shows gpuq-<role>-<dispatcher id>-<instance>): an operator sees who holds what, and
    # a process restarted with this DISPATCHER_ID sees whether the one before it is still connected
    # (``Presence.claim``).
    def name(role: str) -> str:
        return client_name(role, settings.dispatcher_id, settings.instance)

    dsn, cluster = settings.redis_dsn(), settings.redis_cluster
    redis = async_client(dsn, cluster=cluster, client_name=name("loop"), **options)
    beat = async_client(dsn, cluster=cluster, max_connections=4, client_name=name("beat"), **options)
    publisher = async_client(dsn, cluster=cluster, max_connections=8, client_name=name("events"), **options)
    api = (
        # redis-py's cluster client keeps a pool per node of its own making
        async_client(dsn, cluster=True, **options)
        if cluster
        # from_pool: the client owns the pool, so closing it closes the pool's connections too (the
        # in-process dispatcher of the tests lives on after its close)
        else Redis.from_pool(
            async_pool(dsn, blocking=True, max_connections=64, timeout=5, client_name=name("api"), **options)
        )
    )
    clients = (redis, beat, publisher, api)
    hub = EventHub(api, Keys(settings.redis_key_prefix), settings.event_listeners_max)
    holder: dict[str, Dispatcher] = {}
    checks: list[asyncio.Task[str]] = []

    async def make() -> Dispatcher | None:
        for client in clients:
            await initialized(client)
        if server.interrupted_by is not None:  # nothing started: nothing taken, nothing to drain
            return None
        d = Dispatcher(settings, engine, redis, beat=beat, publisher=publisher)
        d.rt.on_fatal = lambda: setattr(server, "should_exit", True)
        holder["d"] = d
        server.dispatcher = d
        await d.start()
        if settings.callback_url:  # set by hand: a typo there fails every job, a lease later each
            checks.append(asyncio.create_task(check_callback_url(settings.callback_url, settings.secret)))
        if own_process:
            freeze_heap()
            stacks.attach(asyncio.get_running_loop())
        return d

    async def close() -> None:
        for check in checks:
            check.cancel()
        for client in clients:
            await client.aclose()
        engine.dispose()

    config = uvicorn.Config(
        CallbackFastPath(create_app(make, close, hub), MAX_BODY_BYTES),
        host=settings.callback_host,
        port=settings.callback_port,
        loop="uvloop",
        http=GuardedHttp.configure(
            read_timeout=settings.request_read_timeout_seconds, max_connections=max_connections
        ),
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 1,
        backlog=4096,
    )
    server = server_cls(config)
    server.grace = settings.shutdown_grace_seconds
    return server, holder


def freeze_heap() -> None:
    """Move everything alive once the dispatcher has started out of the garbage collector's sight.

    A full (oldest-generation) collection walks every object the process holds: with FastAPI, pydantic,
    SQLAlchemy and redis-py loaded that took 66-88 ms, with the GIL held, so every thread stopped (the hot
    database thread too): callbacks, POSTs and hand-offs all waited. Measured on the efficiency workload,
    two such pauses per 10 s run, and they were the slot turnaround's p99 (bench/RESULTS.md). Frozen, the
    startup objects are never walked again; a full collection then walks what was made since (8 ms in the
    same run). They are not garbage: the app, the dispatcher, its caches and modules live as long as the
    process."""
    gc.collect()
    gc.freeze()
    log.info(
        "startup objects frozen out of the garbage collector",
        extra={"action": "gc_freeze", "objects": gc.get_freeze_count()},
    )


def _address(host: str, port: int) -> str:
    """host:port as a URL writes it ([::1]:8000): an IPv6 address's last colon is not the port's."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def main() -> int:
    code = _arguments()
    if code is not None:
        return code
    try:
        settings = load(DispatcherSettings)
    except ConfigError as exc:
        sys.stderr.write(f"gpuq dispatcher: {exc.message}\n")
        return 2
    refusal = settings.open_api_refusal()
    if refusal is not None:
        sys.stderr.write(f"gpuq dispatcher: {refusal}\n")
        return 2
    setup_logging(settings.log_level, settings.log_format)
    stacks.install()  # before anything that may hang: a start that hangs is diagnosed the same way
    announce(settings)
    max_connections = raise_open_files(settings.http_max_connections)
    engine = make_engine(settings.db_url())
    socks: list[socket.socket] = []
    try:
        socks = listen(settings)
        claimed = preflight(settings, engine)  # open while the process runs (check_dispatcher_id)
    except StartProblem as exc:
        sys.stderr.write(f"gpuq dispatcher: {exc.message}\n")
        for sock in socks:
            sock.close()
        engine.dispose()
        return exc.exit_code
    server, holder = build_server(settings, engine, max_connections, own_process=True)
    # uvicorn says where it listens only for sockets it bound itself
    where = [_address(s.getsockname()[0], s.getsockname()[1]) for s in socks]
    log.info("listening on %s", ", ".join(where), extra={"action": "listen", "addresses": where})
    # From here a signal is the server's (uvicorn takes these over in run): before, a SIGINT between this
    # line and uvicorn's handlers raised KeyboardInterrupt inside asyncio.run, with a warning besides
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, server.handle_exit)
    try:
        server.run(sockets=socks)  # bound above: no job is taken on a port that is not ours
    finally:
        stacks.attach(None)
        if claimed is not None:
            claimed.close()
    return _exit_code(server, holder.get("d"))


def _exit_code(server: _Server, d: Dispatcher | None) -> int:
    """0 after a clean stop; 128 + the signal that stopped the start before a dispatcher was made; 1 when
    the server never started or a part of the dispatcher died."""
    if d is None and server.interrupted_by is not None:
        sys.stderr.write("gpuq dispatcher: interrupted while starting; no job was taken\n")
        return 128 + server.interrupted_by
    if not server.started or (d is not None and d.fatal is not None):
        return 1
    return 0
