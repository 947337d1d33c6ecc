"""``producer.connect``: the asyncio clients' connections, against the real Redis, on uvloop as the dispatcher
runs them.

Found in CI: a Redis Cluster master killed between a connect and its first command (CLIENT SETNAME) made
uvloop raise RuntimeError ("... the handler is closed") on the write; redis-py maps only OSError to
ConnectionError, so it passed every ``except RedisError`` and the dispatcher's housekeeping task died, which
stops the process.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio
import uvloop
from redis.exceptions import ConnectionError as RedisConnectionError

from producer import connect
from producer.connect import async_client, async_pool


def _close_under(client: Any) -> None:
    """Close the transport of every idle connection under redis-py, as a server gone mid-connect does."""
    for conn in client.connection_pool._available_connections:
        conn._writer.transport.abort()


async def _ping_after_a_lost_connection(client: Any) -> bool:
    """A lost connection may surface once (redis-py's retry may hide it); never as anything else."""
    try:
        return bool(await client.ping())
    except RedisConnectionError:
        return bool(await client.ping())


def test_a_write_on_a_transport_closed_under_it_is_a_lost_connection(redis_url: str) -> None:
    async def scenario() -> None:
        client = async_client(redis_url, cluster=False, socket_timeout=5)
        assert await client.ping()
        _close_under(client)
        await asyncio.sleep(0.01)  # the loop closes the transport
        assert await _ping_after_a_lost_connection(client)
        await client.aclose()

    uvloop.run(scenario())


def test_the_dispatchers_blocking_pool_gets_the_same_connections(redis_url: str) -> None:
    async def scenario() -> None:
        pool = async_pool(redis_url, blocking=True, max_connections=4, timeout=5)
        assert isinstance(pool, redis.asyncio.BlockingConnectionPool)
        client = redis.asyncio.Redis.from_pool(pool)
        assert await client.ping()
        _close_under(client)
        await asyncio.sleep(0.01)
        assert await _ping_after_a_lost_connection(client)
        await client.aclose()

    uvloop.run(scenario())


def test_a_runtime_error_that_is_not_a_closed_transport_still_raises() -> None:
    async def scenario() -> None:
        async def broken() -> None:
            raise RuntimeError("a bug, not a lost connection")

        conn = connect.Connection()
        with pytest.raises(RuntimeError, match="a bug"):
            await connect._written(conn, broken())

    uvloop.run(scenario())


@pytest.mark.parametrize(
    ("dsn", "kind"),
    [
        ("redis://127.0.0.1:6379/0", connect.Connection),
        ("rediss://127.0.0.1:6379/0", connect.SSLConnection),
        ("unix:///run/redis.sock?db=1", connect.UnixDomainSocketConnection),
    ],
)
def test_each_scheme_keeps_its_kind_of_connection(dsn: str, kind: type) -> None:
    client = async_client(dsn, cluster=False)
    assert client.connection_pool.connection_class is kind
