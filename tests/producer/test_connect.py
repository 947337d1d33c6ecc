"""``producer.connect``: the asyncio clients' connections, against the real Redis, on uvloop as the dispatcher
runs them.

Found in CI: a Redis Cluster master killed between a connect and its first command (CLIENT SETNAME) made
uvloop raise RuntimeError ("... the handler is closed") on the write; redis-py maps only OSError to
ConnectionError, so it passed every ``except RedisError`` and the dispatcher's housekeeping task died, which
stops the process.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio
import uvloop
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dispatcher.testing import free_port
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


def test_a_command_makes_no_task_of_its_own(redis_url: str) -> None:
    """redis-py wraps every write in ``asyncio.wait_for`` when a socket timeout is set: a Task per command,
    and the write a loop pass late. Ours writes in the caller's task."""

    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        made: list[str] = []

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
            made.append(coro.__qualname__)
            return asyncio.Task(coro, loop=loop, **kwargs)

        client = async_client(redis_url, cluster=False, socket_timeout=5, socket_connect_timeout=5)
        assert await client.ping()  # connected, its handshake done
        loop.set_task_factory(factory)
        try:
            for i in range(50):
                await client.set(f"gpuq-test-notask-{i}", i)
            async with client.pipeline(transaction=False) as pipe:
                pipe.get("gpuq-test-notask-0").delete(*(f"gpuq-test-notask-{i}" for i in range(50)))
                assert await pipe.execute() == [b"0", 50]
        finally:
            loop.set_task_factory(None)
            await client.aclose()
        return made

    made = uvloop.run(scenario())
    assert not [name for name in made if "send" in name]  # redis-py's pool may release in a task: not ours


def test_a_large_write_to_a_redis_that_reads_goes_through(redis_url: str) -> None:
    """Past the socket's buffer the write waits for Redis to read, under the timeout, and completes."""

    async def scenario() -> None:
        client = async_client(redis_url, cluster=False, socket_timeout=5)
        value = os.urandom(1024) * (24 * 1024)  # 24 MiB: more than the socket takes at once
        try:
            assert await client.set("gpuq-test-large", value)
            assert await client.strlen("gpuq-test-large") == len(value)
        finally:
            await client.delete("gpuq-test-large")
            await client.aclose()

    uvloop.run(scenario())


@pytest.fixture
def stoppable_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A Redis of the test's own (it is stopped with SIGSTOP), on a free port, keeping nothing on disk."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not installed")
    port = free_port()
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis.Redis(port=port, socket_timeout=1).ping():
                    break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(10)


def test_a_write_to_a_redis_that_stopped_reading_times_out(
    stoppable_redis: tuple[str, subprocess.Popen[bytes]],
) -> None:
    """A write that fills the socket while Redis reads nothing (stopped, hung) fails after ``socket_timeout``
    as redis-py's own does (TimeoutError, the connection dropped), instead of waiting for ever."""
    url, proc = stoppable_redis

    async def scenario() -> float:
        client = async_client(url, cluster=False, socket_timeout=0.5, socket_connect_timeout=2)
        assert await client.ping()
        proc.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        try:
            with pytest.raises(RedisTimeoutError):
                await client.set("k", b"x" * (64 * 1024 * 1024))  # far beyond what the kernel buffers
            return time.monotonic() - started
        finally:
            proc.send_signal(signal.SIGCONT)
            await client.aclose()

    took = uvloop.run(asyncio.wait_for(scenario(), 10))  # a write that waits for ever fails here
    assert took < 5  # bounded by the timeout (0.5 s), not by Redis coming back
    # The rest of the command was dropped, not sent once Redis read again: the SET never ran.
    time.sleep(0.2)
    assert redis.Redis.from_url(url, socket_timeout=5).exists("k") == 0
