"""The stores a command talks to, opened on first use and closed when the command ends.

Settings are ``StoreSettings`` (Redis, database, queues, slot and attempt defaults) from the environment and
``.env``, like the dispatcher's, but without the dispatcher-only ones: an operator's shell needs the
database password, not the CALLBACK_SECRET that signs GPU callbacks.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
import typer
from redis.exceptions import RedisClusterException
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from dispatcher.cli.errors import Unreachable
from dispatcher.db.engine import make_engine, sqlite_file, transaction
from dispatcher.queues.wakes import wake_sync
from dispatcher.settings import StoreSettings
from producer.connect import sync_client
from producer.keys import Keys
from producer.settings import load

T = TypeVar("T")


class Stores:
    def __init__(self, env_file: Path | None = None) -> None:
        self._engine: Engine | None = None
        self._redis: redis.Redis | None = None
        self.env_file = env_file  # --env-file: read instead of ./.env (the environment still wins)

    @cached_property
    def settings(self) -> StoreSettings:
        # ConfigError names the variable; app.py maps it to exit status 2
        if self.env_file is None:
            return load(StoreSettings)
        return load(StoreSettings, _env_file=self.env_file)

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.redis_key_prefix)

    @property
    def engine(self) -> Engine:
        return self.make_engine(create=False)

    def make_engine(self, *, create: bool) -> Engine:
        """The database's engine. An embedded (SQLite) database that does not exist is refused unless
        ``create`` (``gpuq db init``): ``gpuq status`` in a directory where no dispatcher ran left an empty
        ``.gpuq/gpuq.db`` behind and said only that it had no tables (a trial)."""
        if self._engine is None:
            url = self.settings.db_url()
            path = sqlite_file(url)
            if not create and path is not None and not Path(path).exists():
                raise Unreachable(
                    f"no embedded database at {path}: no dispatcher has run from here; set DATABASE_URL"
                    " (or DB_HOST) as the dispatcher has it, or run gpuq from the dispatcher's directory"
                )
            self._engine = make_engine(url, pool_size=2)
        return self._engine

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            try:
                self._redis = sync_client(
                    self.settings.redis_dsn(),
                    cluster=self.settings.redis_cluster,
                    socket_connect_timeout=3,
                    socket_timeout=10,
                )
            except RedisClusterException as exc:  # the cluster client connects at once: one line, no trace
                raise redis.ConnectionError(f"{exc} (REDIS_CLUSTER=true)") from exc
        return self._redis

    def db(self, fn: Callable[..., T], /, **kwargs: Any) -> T:
        return transaction(self.engine, fn, attempts=3, **kwargs)

    def wake(self, what: str) -> None:
        """Tell every dispatcher to look again now (a slot was freed, a GPU added, a task retried)."""
        wake_sync(self.redis, self.keys, what)

    def db_where(self) -> str:
        return make_url(self.settings.db_url()).render_as_string(hide_password=True)

    def redis_where(self) -> str:
        parts = urlsplit(self.settings.redis_dsn())
        return f"{parts.hostname or parts.path}:{parts.port or 6379}"

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
        if self._engine is not None:
            self._engine.dispose()


def stores(ctx: typer.Context) -> Stores:
    """The command's stores (created by the top-level callback)."""
    root = ctx.find_root()
    if not isinstance(root.obj, Stores):
        root.obj = Stores()
        root.call_on_close(root.obj.close)
    return root.obj
