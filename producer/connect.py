"""Redis clients for plain Redis and Redis Cluster (``REDIS_CLUSTER``), and the replicated-write wait.

One place decides which redis-py client a process gets, so the producer, the dispatcher and the CLI cannot
disagree. With a cluster every script gpuq runs touches one slot (``producer.keys``), so the cluster client
only has to route each command by its first key.

``REDIS_WAIT_REPLICAS=n``: a write counts once ``n`` replicas hold it. Redis ``WAIT`` covers the writes made
on the connection it is sent on, so it travels in the same pipeline as the write, to the same node (with a
cluster: the master of the write's slot), and both go out on one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterable
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from producer.errors import QueueUnavailable


def sync_client(dsn: str, *, cluster: bool, **options: Any) -> redis.Redis:
    """A blocking client; with ``cluster`` a ``RedisCluster`` seeded from ``dsn`` (typed as ``Redis``: gpuq
    uses only what both offer)."""
    if cluster:
        options.pop("db", None)
        client: Any = RedisCluster.from_url(dsn, **options)
        return client  # type: ignore[no-any-return]
    return redis.Redis.from_url(dsn, **options)


async def _written(conn: AbstractConnection, sending: Awaitable[None]) -> None:
    """A write to a socket closed under it is a lost connection. uvloop raises RuntimeError ("unable to
    perform operation on <TCPTransport closed=True ...>; the handler is closed") where asyncio's own loop
    does not, and redis-py maps only OSError to ConnectionError: when a Redis Cluster master was killed
    between a connect and its first command (CLIENT SETNAME), that RuntimeError passed every ``except
    RedisError`` and stopped the dispatcher (CI of 550edbe). As a ConnectionError it is retried as any
    lost connection is."""
    try:
        await sending
    except RuntimeError as exc:
        if "closed" not in str(exc):
            raise
        await conn.disconnect(nowait=True)
        raise redis.exceptions.ConnectionError(f"Error while writing to socket: {exc}") from exc


async def _write(writer: asyncio.StreamWriter, command: Iterable[bytes], timeout: float | None) -> None:
    """Write, then wait for the socket to take it: at once, unless its buffer is above the low-water mark
    (writing may then be paused: a Redis that stopped reading), when the wait is bounded by ``timeout``. A
    paused transport holds more than its low-water mark, so the untimed wait cannot block."""
    writer.writelines(command)
    transport = writer.transport
    if timeout and transport.get_write_buffer_size() > transport.get_write_buffer_limits()[0]:
        async with asyncio.timeout(timeout):
            await writer.drain()
    else:
        await writer.drain()


class _WriteLossIsConnectionError(AbstractConnection):
    """Mixed into redis-py's connection classes. A subclass of AbstractConnection only for ``super()``: in
    the classes below it comes before redis-py's own class, whose ``send_packed_command`` it replaces."""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        """redis-py's (8.1), but for two things. Its ``asyncio.wait_for`` around every write made a Task per
        command, so each Redis round trip of the dispatcher's hot path paid for a task and went out a loop
        pass late: here a write waits under ``socket_timeout`` only when it has to wait (``_write``). A
        write to a closed transport is a lost connection (``_written``). A write that timed out is dropped
        (redis-py's close would finish sending it)."""
        if not self.is_connected:
            await self.connect_check_health(check_health=False)
        if check_health:
            await self.check_health()  # type: ignore[no-untyped-call]
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        writer = self._writer
        if writer is None:  # connected above, or raised
            raise redis.exceptions.ConnectionError("Connection closed by server.")
        try:
            await _written(self, _write(writer, command, self.socket_timeout))
        except redis.exceptions.ConnectionError:
            raise  # a closed transport's, already disconnected
        except TimeoutError:
            # Dropped, not closed: a close would still send the rest of the command when Redis reads again,
            # and it would run although its sender was told it timed out (and may send it again).
            writer.transport.abort()
            await self.disconnect(nowait=True)
            raise redis.exceptions.TimeoutError("Timeout writing to socket") from None
        except OSError as e:
            await self.disconnect(nowait=True)
            err_no, errmsg = ("UNKNOWN", e.args[0]) if len(e.args) == 1 else (e.args[0], e.args[1])
            raise redis.exceptions.ConnectionError(
                f"Error {err_no} while writing to socket. {errmsg}."
            ) from e
        except BaseException:
            # as redis-py: a write cut short leaves the connection in an unknown state
            await self.disconnect(nowait=True)
            raise


class Connection(_WriteLossIsConnectionError, redis.asyncio.Connection):
    pass


class SSLConnection(_WriteLossIsConnectionError, redis.asyncio.SSLConnection):
    pass


class UnixDomainSocketConnection(_WriteLossIsConnectionError, redis.asyncio.UnixDomainSocketConnection):
    pass


_OURS: dict[type[AbstractConnection], type[AbstractConnection]] = {
    redis.asyncio.Connection: Connection,
    redis.asyncio.SSLConnection: SSLConnection,
    redis.asyncio.UnixDomainSocketConnection: UnixDomainSocketConnection,
}


def async_pool(dsn: str, *, blocking: bool = False, **options: Any) -> redis.asyncio.ConnectionPool:
    """A pool (``blocking``: a burst waits for a connection rather than failing) making the connections above
    for ``dsn``'s scheme (``rediss://``: TLS, ``unix://``: a socket file). ``ConnectionPool.from_url`` lets
    the URL's class win over a ``connection_class`` passed to it (redis 8.1), so the URL is parsed here."""
    kwargs = {**options, **parse_url(dsn)}
    kwargs["connection_class"] = _OURS.get(
        kwargs.get("connection_class", redis.asyncio.Connection), Connection
    )
    pool = redis.asyncio.BlockingConnectionPool if blocking else redis.asyncio.ConnectionPool
    return pool(**kwargs)


def async_client(dsn: str, *, cluster: bool, **options: Any) -> redis.asyncio.Redis:
    """An asyncio client; with ``cluster`` a ``redis.asyncio.RedisCluster``. Either makes its connections
    of the classes above."""
    if cluster:
        for unsupported in ("db", "client_name", "max_connections", "health_check_interval"):
            options.pop(unsupported, None)
        client: Any = AsyncRedisCluster.from_url(dsn, **options)
        # redis-py's cluster client takes no connection class: its nodes, those it meets later included,
        # are made from the one ``connection_kwargs`` dict (redis 8.1; tests/producer check it still is).
        kwargs = client.connection_kwargs
        kwargs["connection_class"] = _OURS.get(
            kwargs.get("connection_class", redis.asyncio.Connection), Connection
        )
        for node in [*client.startup_nodes, *client.nodes_manager.startup_nodes.values()]:
            node.connection_class = kwargs["connection_class"]
        return client  # type: ignore[no-any-return]
    # from_pool: the client owns the pool, so closing it closes the pool's connections too
    return redis.asyncio.Redis.from_pool(async_pool(dsn, **options))


async def initialized(client: redis.asyncio.Redis) -> redis.asyncio.Redis:
    """``client`` once it knows the cluster's slots (an asyncio cluster client learns them on its first
    keyed command; a first SUBSCRIBE would find none). A plain client as it is."""
    either: Any = client
    if isinstance(either, AsyncRedisCluster):
        await either.initialize()
    return client


def wait_options(client: Any, key: str) -> dict[str, Any]:
    """Keyword arguments that send a keyless command (WAIT) to the node holding ``key``."""
    if isinstance(client, (RedisCluster, AsyncRedisCluster)):
        return {"target_nodes": client.get_node_from_key(key)}
    return {}


def refresh_slots(client: Any) -> None:
    """After an error on a cluster: learn who serves which slot again. A replica may have taken over from a
    dead master; a pipeline aimed at the old map (WAIT goes to a node picked from it) would keep failing."""
    if isinstance(client, RedisCluster):
        # still no majority: the caller's retry comes back here
        with contextlib.suppress(redis.RedisError, RedisClusterException, OSError):
            client.nodes_manager.initialize()


async def refresh_slots_async(client: Any) -> None:
    """``refresh_slots`` for an asyncio cluster client."""
    if isinstance(client, AsyncRedisCluster):
        with contextlib.suppress(redis.RedisError, RedisClusterException, OSError):
            await client.nodes_manager.initialize()


def is_cluster(client: Any) -> bool:
    return isinstance(client, (RedisCluster, AsyncRedisCluster))


def check_replicas(acked: Any, wanted: int, what: str) -> None:
    """Raise QueueUnavailable when fewer than ``wanted`` replicas acknowledged ``what``."""
    if int(acked) < wanted:
        # Not "unreachable": the push went through, and a retry of a task without a task_id (an API or
        # direct one: its idempotency key is new each time) runs it twice (an outside trial: 3 tries, 3 runs).
        raise QueueUnavailable(
            f"The job queue (Redis) did not confirm the write on enough replicas ({int(acked)} of"
            f" {wanted}, REDIS_WAIT_REPLICAS): {what} may be queued anyway. A retry with the same task_id is"
            " not enqueued twice; without a task_id it is a new task.",
            detail=f"only {int(acked)} of {wanted} replicas hold {what} (REDIS_WAIT_REPLICAS)",
        )
