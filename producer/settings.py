"""Settings shared by everything that talks to the job queue, read from the environment once, on first use.

The seed system's variable names keep working (``REDIS_HOST``, ``REDIS_PORT``, ``REDIS_PASSWORD``,
``TASK_QUEUES``); ``REDIS_URL`` overrides the ``REDIS_*`` parts.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Self, TypeVar
from urllib.parse import parse_qs, quote, unquote, urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.errors import ConfigError
from producer.job import DEFAULT_MAX_JOB_BYTES
from producer.keys import IDEMPOTENCY_TTL_SECONDS, queue_lists, scope, scope_problem

_NAME = re.compile(r"^[A-Za-z0-9_.:{}-]+$")
_TASK_TYPE = re.compile(r"^[A-Za-z0-9_.:-]{1,50}$")

S = TypeVar("S", bound=BaseSettings)


def split_list(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


def parse_pairs(raw: str, variable: str) -> dict[str, str]:
    """``a=b,c=d`` -> ``{"a": "b", "c": "d"}``; the error names the variable and the bad item."""
    pairs: dict[str, str] = {}
    for item in split_list(raw):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{item!r} is not NAME=VALUE")
        pairs[key.strip()] = value.strip()
    return pairs


def _check_queue_name(name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"{name!r} is not a valid queue name (letters, digits, _ . : - {{ }})")
    problem = scope_problem(name)
    if problem:
        raise ValueError(f"{name!r} is not a valid queue name: {problem}")


def _check_shared_keys(names: list[str]) -> None:
    # An exact duplicate shares its keys too, but "like q and {q}" sent an outside trial of TASK_QUEUES=a,a
    # looking for braces it never wrote.
    if twice := next((name for i, name in enumerate(names) if name in names[:i]), None):
        raise ValueError(f"queue {twice!r} is listed twice")
    scopes = [scope(name) for name in names]
    if len(set(scopes)) < len(scopes):
        raise ValueError("two queue names share their keys (like q and {q}); rename one")
    owner: dict[str, str] = {}
    for name in names:
        for key in queue_lists(name):
            if owner.setdefault(key, name) != name:
                raise ValueError(
                    f"queues {owner[key]!r} and {name!r} would share the list {key!r}; rename one"
                )


class QueueSettings(BaseSettings):
    """Where jobs go: Redis and the queue names."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, allow_inf_nan=False)

    redis_url: str | None = None
    redis_host: str = "127.0.0.1"
    redis_port: int = Field(default=6379, ge=1, le=65535)
    redis_password: SecretStr | None = None
    redis_db: int = Field(default=0, ge=0)
    redis_key_prefix: str = "gpuq:"
    task_queues: str = "task_queue_1"
    task_routes: str = ""
    #: A job's size limit, serialised, in bytes: the producer refuses a bigger task (400), a dispatcher
    #: dead-letters a bigger job pushed straight into Redis. At most 8 MiB: the job travels in one
    #: database packet with room to spare (MariaDB's default max_allowed_packet is 16 MiB).
    max_job_bytes: int = Field(default=DEFAULT_MAX_JOB_BYTES, ge=1024, le=8 * 1024 * 1024)
    #: How long a push's idempotency mark lives: a task id (or SQS/S3 delivery) seen again within this
    #: window is answered with the first task's id and not enqueued again.
    idempotency_ttl_seconds: int = Field(default=IDEMPOTENCY_TTL_SECONDS, ge=1, le=30 * 86400)
    #: The Redis at REDIS_URL is a cluster (ElastiCache / MemoryDB cluster mode): redis-py's cluster client,
    #: which follows slots and failovers. The key layout is the same either way (``producer.keys``).
    redis_cluster: bool = False
    #: Replicas that must hold a write before it counts (Redis WAIT): a push is acknowledged, and a
    #: dispatcher's hand-off back to Redis is done, only then; 0 trusts asynchronous replication.
    redis_wait_replicas: int = Field(default=0, ge=0, le=16)
    #: How long a write waits for those replicas before it counts as not durable (the producer then
    #: answers 503 / an SQS item failure; the job may still be queued and a retry is idempotent).
    redis_wait_timeout_seconds: float = Field(default=1.0, gt=0, le=60)

    @field_validator("redis_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        value = value.strip() if value else value
        if value and not value.startswith("unix://"):
            # redis-py reads a path that is not a number ("/11x", "/0/extra") as database 0, silently: a
            # dispatcher then waited on db 0 for jobs pushed to db 11 (an outside trial). The message quotes
            # nothing of the URL: a password with an unescaped "/" ends up in the path.
            parts = urlsplit(value)
            db = unquote(parts.path).strip("/")
            if db and not (db.isascii() and db.isdigit()) and "db" not in parse_qs(parts.query):
                raise ValueError("its path must be a database number (redis://host:6379/11)")
        return value or None

    @field_validator("redis_cluster")
    @classmethod
    def _check_prefix(cls, value: bool, info: ValidationInfo) -> bool:
        prefix = str(info.data.get("redis_key_prefix", ""))
        if value and ("{" in prefix or "}" in prefix):
            # A tag in the prefix would put every queue's keys in the prefix's slot, away from the lists.
            raise ValueError(f"a cluster needs a REDIS_KEY_PREFIX without {{ or }} (not {prefix!r})")
        url = info.data.get("redis_url")
        db = urlsplit(url).path.strip("/") if url else str(info.data.get("redis_db", 0))
        if value and db not in ("", "0"):
            raise ValueError(f"a cluster has database 0 only (not {db}): drop it from REDIS_URL / REDIS_DB")
        return value

    @field_validator("task_queues")
    @classmethod
    def _check_queues(cls, value: str) -> str:
        names = split_list(value)
        if not names:
            raise ValueError("must name at least one queue, e.g. task_queue_1,task_queue_2")
        for name in names:
            _check_queue_name(name)
        _check_shared_keys(names)
        return value

    @field_validator("task_routes")
    @classmethod
    def _check_routes(cls, value: str) -> str:
        # A route's pool is the queue its jobs go to: a name no queue may have would refuse every such job
        # later ("queue: String should match pattern", a field the caller never set), not the start now.
        for task_type, pool in parse_pairs(value, "TASK_ROUTES").items():
            try:
                _check_queue_name(pool)
            except ValueError as exc:
                raise ValueError(f"{task_type}={pool}: the pool is a queue name; {exc}") from None
        return value

    @model_validator(mode="after")
    def _routes_keep_their_own_keys(self) -> Self:
        """A route's pool is a queue of its own: it must not share keys with a queue (`{q}` beside `q`)."""
        try:
            _check_shared_keys(list(dict.fromkeys([*self.queues, *self.routes.values()])))
        except ValueError as exc:
            raise ValueError(f"TASK_ROUTES: {exc}") from None
        return self

    @property
    def queues(self) -> list[str]:
        return split_list(self.task_queues)

    @property
    def routes(self) -> dict[str, str]:
        """Task type -> pool; a routed type's jobs go to the queue named after its pool."""
        return parse_pairs(self.task_routes, "TASK_ROUTES")

    def redis_dsn(self, password: str | None = None) -> str:
        if self.redis_url:
            return self.redis_url
        secret = (
            password
            if password is not None
            else (self.redis_password.get_secret_value() if self.redis_password else "")
        )
        auth = f":{quote(secret, safe='')}@" if secret else ""
        return f"redis://{auth}{self.redis_host}:{self.redis_port}/{self.redis_db}"


class ProducerSettings(QueueSettings):
    """The Lambda's settings.

    Empty variables count as unset: a SAM template cannot leave a variable out for an empty parameter,
    so ``REDIS_PORT=""`` must mean "the default", not "invalid integer".
    """

    model_config = SettingsConfigDict(env_ignore_empty=True)

    s3_task_type: str = "start_transcribe"
    redis_secret_arn: str | None = None  # Secrets Manager ARN, SSM parameter ARN or name: the password

    @field_validator("s3_task_type")
    @classmethod
    def _check_task_type(cls, value: str) -> str:
        if not _TASK_TYPE.match(value):
            raise ValueError(f"{value!r} is not a valid task type (letters, digits, _ . : -)")
        return value

    @property
    def known_queues(self) -> list[str]:
        """Queues some dispatcher reads: ``TASK_QUEUES`` and the pools of ``TASK_ROUTES``.

        A job pushed anywhere else would wait forever, so the producer refuses it.
        """
        return list(dict.fromkeys([*self.queues, *self.routes.values()]))


def load(cls: type[S], **overrides: Any) -> S:
    """Build settings or raise ConfigError with one line naming the variable."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        variable = str(err["loc"][0]).upper() if err["loc"] else "settings"
        raise ConfigError(f"{variable}: {err['msg']}") from exc


@lru_cache(maxsize=1)
def get_settings() -> ProducerSettings:
    return load(ProducerSettings)
