"""Settings shared by everything that talks to the job queue, read from the environment once, on first use.

The seed system's variable names keep working (``REDIS_HOST``, ``REDIS_PORT``, ``REDIS_PASSWORD``,
``TASK_QUEUES``); ``REDIS_URL`` overrides the ``REDIS_*`` parts.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, TypeVar
from urllib.parse import quote

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9_.:{}-]+$")

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


class QueueSettings(BaseSettings):
    """Where jobs go: Redis and the queue names."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    redis_url: str | None = None
    redis_host: str = "127.0.0.1"
    redis_port: int = Field(default=6379, ge=1, le=65535)
    redis_password: SecretStr | None = None
    redis_db: int = Field(default=0, ge=0)
    redis_key_prefix: str = "gpuq:"
    task_queues: str = "task_queue_1"
    task_routes: str = ""

    @field_validator("redis_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value or None

    @field_validator("task_queues")
    @classmethod
    def _check_queues(cls, value: str) -> str:
        names = split_list(value)
        if not names:
            raise ValueError("must name at least one queue, e.g. task_queue_1,task_queue_2")
        for name in names:
            if not _NAME.match(name):
                raise ValueError(f"{name!r} is not a valid queue name (letters, digits, _ . : - {{ }})")
        return value

    @field_validator("task_routes")
    @classmethod
    def _check_routes(cls, value: str) -> str:
        parse_pairs(value, "TASK_ROUTES")
        return value

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
    """The Lambda's settings."""

    s3_task_type: str = "start_transcribe"
    redis_secret_arn: str | None = None  # Secrets Manager ARN or SSM parameter name holding the password


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
