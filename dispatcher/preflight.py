"""What ``python -m dispatcher`` checks before it starts serving, so that each problem an operator can fix is
one line on stderr and an exit code, not sixty lines of traceback from inside uvicorn's lifespan:

- the database answers (and its schema is created or upgraded) -> else exit 3, naming DATABASE_URL / DB_*;
- Redis answers -> else exit 3, naming REDIS_URL / REDIS_*;
- every GPU of GPU_ENDPOINTS is either new (registered now) or registered with the same URL and pool
  (SPEC §6) -> else exit 2: a dispatcher started with a stale or malformed list must not rewrite the fleet
  other dispatchers are using; ``gpuq gpu set`` changes a registration.

It also warns (one log line) when CALLBACK_URL points at this machine's loopback while GPUs live elsewhere:
they could never call back.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Any
from urllib.parse import urlsplit

from redis.exceptions import RedisClusterException, RedisError, ResponseError
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from dispatcher.db.engine import StoreUnavailable, driver_error, init_schema, transaction, utcnow
from dispatcher.db.gpus import NameRefused, UrlTaken, list_gpus, register_new
from dispatcher.db.identity import database_identity
from dispatcher.gpus.endpoints import NOT_IN_GPU_NAMES
from dispatcher.gpus.pull import is_pull
from dispatcher.queues.intake import Intake
from dispatcher.queues.one_database import say_and_look, unsay
from dispatcher.queues.presence import DuplicateDispatcher, client_name
from dispatcher.settings import DispatcherSettings
from producer.connect import async_client, initialized, is_cluster, sync_client
from producer.keys import Keys

log = logging.getLogger("gpuq.main")

#: Exit codes, as documented in the README (the CLI uses the same).
BAD_SETTING = 2
UNREACHABLE = 3

_LOOPBACK = ("127.", "localhost", "::1", "[::1]")


class StartProblem(Exception):
    """The dispatcher cannot start; ``message`` is the one line to print."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc)
    return text.splitlines()[0] if text else type(exc).__name__


def check_database(settings: DispatcherSettings, engine: Engine) -> None:
    where = make_url(settings.db_url()).render_as_string(hide_password=True)
    try:
        init_schema(engine)
    except (DBAPIError, StoreUnavailable, OSError) as exc:
        if driver_error(exc)[1] == 1049:  # the server answers; no such database
            raise StartProblem(
                f"database {where} does not exist: create it (CREATE DATABASE <name>) or fix DATABASE_URL"
                " (or DB_NAME)",
                UNREACHABLE,
            ) from exc
        raise StartProblem(
            f"database {where} unreachable ({_first_line(exc)}): check DATABASE_URL "
            "(or DB_HOST, DB_PORT, DB_USER, DB_PASSWORD, DB_NAME) and that the server runs",
            UNREACHABLE,
        ) from exc


def check_redis(settings: DispatcherSettings) -> None:
    parts = urlsplit(settings.redis_dsn())
    where = f"{parts.hostname or parts.path}:{parts.port or 6379}"
    unreachable = (
        f"Redis at {where} unreachable ({{}}): check REDIS_URL (or REDIS_HOST, REDIS_PORT, REDIS_PASSWORD) "
        "and that the server runs"
    )
    try:
        # a cluster client asks for the slots here: a plain Redis answers that it has no cluster mode
        client = sync_client(
            settings.redis_dsn(), cluster=settings.redis_cluster, socket_connect_timeout=5, socket_timeout=5
        )
    except (RedisError, RedisClusterException, OSError) as exc:
        if "cluster mode is not enabled" in str(exc).lower():
            raise StartProblem(
                f"REDIS_CLUSTER: true, but the Redis at {where} is not a cluster: set REDIS_CLUSTER=false",
                BAD_SETTING,
            ) from exc
        raise StartProblem(unreachable.format(_first_line(exc)), UNREACHABLE) from exc
    try:
        client.ping()
        if not settings.redis_cluster and _cluster_enabled(client):
            # every key outside this node's slots would fail with MOVED, from the first heartbeat on
            raise StartProblem(
                f"REDIS_CLUSTER: the Redis at {where} is a cluster node: set it to true", BAD_SETTING
            )
        if settings.redis_wait_replicas:
            warn_few_replicas(client, settings.redis_wait_replicas, where)
    except (RedisError, OSError) as exc:
        raise StartProblem(unreachable.format(_first_line(exc)), UNREACHABLE) from exc
    finally:
        client.close()


def check_one_database(settings: DispatcherSettings, engine: Engine) -> bool:
    """Refuse to start beside a live (or starting) dispatcher of the same Redis key prefix that works in
    another database (``queues/one_database.py``). True when this start said its database (taken back by
    ``unpublish_start`` if the start fails further on)."""
    ours = transaction(engine, database_identity)
    keys = Keys(settings.redis_key_prefix)
    client = sync_client(
        settings.redis_dsn(), cluster=settings.redis_cluster, socket_connect_timeout=5, socket_timeout=10
    )
    try:
        said, other = say_and_look(client, keys, settings.dispatcher_id, ours)
    except (RedisError, RedisClusterException, OSError) as exc:
        raise StartProblem(
            f"Redis: could not look at the other dispatchers ({_first_line(exc)})", UNREACHABLE
        ) from exc
    finally:
        client.close()
    if other is not None:
        who, theirs, lapse = other
        doing = "works" if lapse is None else "is starting"
        lapses = "" if lapse is None else f" (if that start died, its mark lapses within {lapse} s)"
        raise StartProblem(
            f"dispatcher {who} {doing} on this Redis (key prefix {settings.redis_key_prefix!r}) in another"
            f" database: {theirs}; this one's is {ours}. Dispatchers of one Redis key prefix share its queues"
            " and GPUs, so they must share one database: set DATABASE_URL (or DB_*) to that one, or give"
            f" this deployment its own REDIS_KEY_PREFIX{lapses}",
            BAD_SETTING,
        )
    return said


def unpublish_start(settings: DispatcherSettings) -> None:
    """A start that failed after ``check_one_database`` said its database: said no more, so that its mark
    does not refuse a corrected start under another id for a minute (best effort)."""
    client = sync_client(
        settings.redis_dsn(), cluster=settings.redis_cluster, socket_connect_timeout=5, socket_timeout=5
    )
    try:
        unsay(client, Keys(settings.redis_key_prefix), settings.dispatcher_id)
    except (RedisError, RedisClusterException, OSError):
        pass
    finally:
        client.close()


def warn_few_replicas(client: Any, wanted: int, where: str) -> None:
    """One line at start when a master has fewer replicas than REDIS_WAIT_REPLICAS: until that changes every
    push is answered 503 (its job queued all the same) and every hand-off waits its whole timeout. A warning,
    not a stop: a replica may just be restarting."""
    try:
        if is_cluster(client):
            replies = client.info("replication", target_nodes=client.PRIMARIES)
            counts = [int(info.get("connected_slaves", 0)) for info in replies.values()]
        else:
            counts = [int(client.info("replication").get("connected_slaves", 0))]
    except ResponseError:  # INFO refused by a managed Redis: nothing to say
        return
    if counts and min(counts) < wanted:
        log.warning(
            "REDIS_WAIT_REPLICAS=%d but a master of the Redis at %s has %d replica(s): pushes are answered "
            "503 and hand-offs wait REDIS_WAIT_REPLICAS's timeout until it has enough",
            wanted,
            where,
            min(counts),
            extra={"action": "config", "redis_wait_replicas": wanted, "replicas": min(counts)},
        )


def _cluster_enabled(client: Any) -> bool:
    """Is this Redis a cluster node? (INFO may be refused by a managed Redis: then assume not.)"""
    try:
        return str(client.info("cluster").get("cluster_enabled", 0)) == "1"
    except ResponseError:
        return False


def register_endpoints(settings: DispatcherSettings, engine: Engine) -> None:
    """Register the GPUs of GPU_ENDPOINTS the database does not know; stop on one it knows differently."""
    for ep in settings.endpoints:
        try:
            known = transaction(
                engine,
                register_new,
                gpu_id=ep.gpu_id,
                url=ep.url,
                pool=ep.pool,
                slot_count=settings.slots_per_gpu,
                now=utcnow(),
            )
        except (UrlTaken, NameRefused) as exc:
            raise StartProblem(f"GPU_ENDPOINTS: {exc}", BAD_SETTING) from None
        if known is not None:
            raise StartProblem(
                f"GPU_ENDPOINTS: GPU {ep.gpu_id} is registered as {known.pool}:{known.gpu_id}={known.url}, "
                f"not {ep.pool}:{ep.gpu_id}={ep.url}; fix GPU_ENDPOINTS, or change the registration with "
                f"`gpuq gpu set {ep.gpu_id} --url URL --pool POOL`",
                BAD_SETTING,
            )


def warn_url_unsafe_names(engine: Engine) -> None:
    """One warning per GPU registered, before ``NOT_IN_GPU_NAMES`` was refused, under a name an agent's URL
    cannot hold. A warning, not a refusal: a pushed GPU's name is in no URL and it keeps working; a pull GPU
    named with ``?`` ``#`` ``%`` is polled by agents that escape its name (the shipped ones do); one with a
    ``/`` is never found (``/agents/a/b/jobs`` and ``/agents/a%2Fb/jobs`` both miss the route)."""
    for gpu in transaction(engine, list_gpus):
        bad = sorted({c for c in gpu.gpu_id if c in NOT_IN_GPU_NAMES})
        if not bad:
            continue
        if is_pull(gpu.url) and "/" in bad:
            effect = "its agent can never poll (404): remove it and add it under a new name"
        elif is_pull(gpu.url):
            effect = "an agent must escape its name in the poll's URL (the shipped agents do)"
        else:
            effect = "it keeps working as a pushed GPU, but could not become a pull GPU"
        log.warning(
            "GPU %r is registered under a name new GPUs may not have (%s): %s",
            gpu.gpu_id,
            " ".join(repr(c) for c in bad),
            effect,
            extra={"action": "config", "gpu_id": gpu.gpu_id},
        )


def check_dispatcher_id(settings: DispatcherSettings) -> Any:
    """Refuse, in one line, to run beside a live process with this DISPATCHER_ID (a twin started from one
    .env, or the one before a restart still draining). Refused in the server's startup instead (as it was),
    it came as a 21-frame traceback and exit 3 (an outside trial). This claims the id for this process's
    instance; the dispatcher's own claim at start finds it ours. A process killed a moment ago is taken
    over at once (``Presence.claim``). Returns a connection named as this instance's heartbeat client, to
    keep open until the process ends: without it, a twin starting while this one built its server found no
    connection of ours and took the id over (a review)."""

    async def claim() -> None:
        client = async_client(
            settings.redis_dsn(), cluster=settings.redis_cluster, socket_connect_timeout=5, socket_timeout=10
        )
        try:
            await initialized(client)
            keys = Keys(settings.redis_key_prefix)
            await Intake(client, keys, settings.dispatcher_id, [], instance=settings.instance).claim()
        finally:
            await client.aclose()

    try:
        asyncio.run(claim())
        if settings.redis_cluster:  # a claim on a cluster does not look at connections (Presence._connected)
            return None
        holder = sync_client(
            settings.redis_dsn(),
            cluster=False,
            client_name=client_name("beat", settings.dispatcher_id, settings.instance),
            socket_connect_timeout=5,
            socket_timeout=10,
        )
        holder.ping()
        return holder
    except DuplicateDispatcher as exc:
        raise StartProblem(str(exc), BAD_SETTING) from None
    except (RedisError, RedisClusterException, OSError) as exc:
        raise StartProblem(
            f"Redis: the DISPATCHER_ID could not be claimed ({_first_line(exc)})", UNREACHABLE
        ) from exc


def slots_mismatch(settings: DispatcherSettings, registered: dict[str, int]) -> str | None:
    """What to say when GPUs of GPU_ENDPOINTS are registered with other slot counts than SLOTS_PER_GPU
    (``registered``: GPU -> its slots in the database), or None. Dispatchers sharing a database with
    different SLOTS_PER_GPU: the first to register a GPU decides, and no dispatcher rewrites it (SPEC §6)."""
    by_count: dict[int, list[str]] = {}
    for ep in settings.endpoints:
        count = registered.get(ep.gpu_id)
        if count is not None and count != settings.slots_per_gpu:
            by_count.setdefault(count, []).append(ep.gpu_id)
    if not by_count:
        return None
    held = "; ".join(
        f"{', '.join(ids[:5])}{' and more' if len(ids) > 5 else ''} with {count} slots"
        for count, ids in sorted(by_count.items())
    )
    return (
        f"SLOTS_PER_GPU={settings.slots_per_gpu} here, but GPUs of GPU_ENDPOINTS are registered {held}: "
        "they keep their registered slots (set SLOTS_PER_GPU as the other dispatchers do, or change a GPU "
        "with `gpuq gpu set NAME --slots N`)"
    )


def warn_unreachable_callback(settings: DispatcherSettings) -> None:
    host = urlsplit(settings.public_callback_url).hostname or ""
    if not host.startswith(_LOOPBACK) and host != "localhost":
        return
    remote = [
        ep.gpu_id
        for ep in settings.endpoints
        if not (urlsplit(ep.url).hostname or "").startswith(_LOOPBACK)
        and urlsplit(ep.url).hostname != "localhost"
    ]
    if remote:
        log.warning(
            "CALLBACK_URL %s is this machine's loopback, but GPUs %s are elsewhere: they cannot call back "
            "(set CALLBACK_URL to an address they reach)",
            settings.public_callback_url,
            ", ".join(remote[:5]),
            extra={"action": "config", "callback_url": settings.public_callback_url, "gpus": remote[:20]},
        )


def preflight(settings: DispatcherSettings, engine: Engine) -> Any:
    """Raise StartProblem for the first thing that stops the dispatcher from starting. Returns what must
    stay open while the process runs (``check_dispatcher_id``)."""
    check_database(settings, engine)
    check_redis(settings)
    published = check_one_database(settings, engine)
    holder = None
    try:
        holder = check_dispatcher_id(settings)
        register_endpoints(settings, engine)
        warn_url_unsafe_names(engine)
        warn_unreachable_callback(settings)
    except BaseException:
        if holder is not None:
            holder.close()
        if published:
            unpublish_start(settings)
        raise
    return holder


def listen(settings: DispatcherSettings, backlog: int = 4096) -> list[socket.socket]:
    """The HTTP server's sockets, bound and listening before the dispatcher takes a job. uvicorn binds only
    after its lifespan startup, which starts the dispatcher: with CALLBACK_PORT held by another process, 33
    jobs went out naming that port in their callback URL, the other process answered their callbacks 404,
    and their slots stayed busy for a lease while the process exited (an outside trial). One socket per
    address the host resolves to, IPv6 ones IPv6-only: what asyncio's ``create_server`` (uvicorn) binds."""
    host, port = settings.callback_host, settings.callback_port
    where = f"CALLBACK_HOST={host} CALLBACK_PORT={port}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise StartProblem(f"{where}: not an address to listen on ({exc})", BAD_SETTING) from exc
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys((i[0], i[1], i[2], "", i[4]) for i in infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
    except OSError as exc:
        for sock in socks:
            sock.close()
        why = exc.strerror or str(exc)
        hint = (
            ": another process listens there (another dispatcher?); stop it or choose another CALLBACK_PORT"
            if exc.errno == errno.EADDRINUSE
            else ""
        )
        raise StartProblem(f"{where}: cannot listen ({why}){hint}", BAD_SETTING) from exc
    return socks
