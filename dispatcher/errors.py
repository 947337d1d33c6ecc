"""The errors of a store that is down or restarting. Work that meets one waits and tries again, holding its
jobs in Redis (or leaving an attempt to its lease); it never drops a job or stops the process."""

from __future__ import annotations

from redis.exceptions import RedisError

from dispatcher.db.engine import StoreUnavailable

TRANSIENT: tuple[type[Exception], ...] = (RedisError, StoreUnavailable, OSError)
