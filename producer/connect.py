"""Redis clients for plain Redis and Redis Cluster (``REDIS_CLUSTER``), and the replicated-write wait.

One place decides which redis-py client a process gets, so the producer, the dispatcher and the CLI cannot
disagree. With a cluster every script gpuq runs touches one slot (``producer.keys``), so the cluster client
only has to route each command by its first key.

``REDIS_WAIT_REPLICAS=n``: a write counts once ``n`` replicas hold it. Redis ``WAIT`` covers the writes made
on the connection it is sent on, so it travels in the same pipeline as the write, to the same node (with a
cluster: the master of the write's slot), and both go out on one connection.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from producer.errors import QueueUnavailable


def sync_client(dsn: str, *, cluster: bool, **options: Any) -> redis.Redis:
    """A blocking client; with ``cluster`` a ``RedisCluster`` seeded from ``dsn`` (typed as ``Redis``: gpuq
    uses only what both offer)."""
    if cluster:
        options.pop("db", None)
        client: Any = RedisCluster.from_url(dsn, **options)
        return client  # type: ignore[no-any-return]
    return redis.Redis.from_url(dsn, **options)


def async_client(dsn: str, *, cluster: bool, **options: Any) -> redis.asyncio.Redis:
    """An asyncio client; with ``cluster`` a ``redis.asyncio.RedisCluster``."""
    if cluster:
        for unsupported in ("db", "client_name", "max_connections", "health_check_interval"):
            options.pop(unsupported, None)
        client: Any = AsyncRedisCluster.from_url(dsn, **options)
        return client  # type: ignore[no-any-return]
    return redis.asyncio.Redis.from_url(dsn, **options)


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


def is_cluster(client: Any) -> bool:
    return isinstance(client, (RedisCluster, AsyncRedisCluster))


def check_replicas(acked: Any, wanted: int, what: str) -> None:
    """Raise QueueUnavailable when fewer than ``wanted`` replicas acknowledged ``what``."""
    if int(acked) < wanted:
        raise QueueUnavailable(
            detail=f"only {int(acked)} of {wanted} replicas hold {what} (REDIS_WAIT_REPLICAS); it may still "
            "be queued: retry, the idempotency key keeps it from being enqueued twice"
        )
