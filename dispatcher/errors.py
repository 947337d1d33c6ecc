"""The errors of a store that is down or restarting. Work that meets one waits and tries again, holding its
jobs in Redis (or leaving an attempt to its lease); it never drops a job or stops the process."""

from __future__ import annotations

from redis.exceptions import RedisClusterException, RedisError

from dispatcher.db.engine import StoreUnavailable

# RedisClusterException is not a RedisError: redis-py's cluster client raises it (SlotNotCoveredError) while a
# failover leaves a slot without a master for a moment.
TRANSIENT: tuple[type[Exception], ...] = (RedisError, RedisClusterException, StoreUnavailable, OSError)
