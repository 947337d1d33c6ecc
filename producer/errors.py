"""Errors the producer (and anything enqueueing jobs) raises.

    GpuqError
     ├── InvalidEvent        the event has no shape we know; nothing is enqueued for it
     ├── InvalidJob          a task in the event (or a job read back from Redis) breaks the job format
     ├── QueueUnavailable    Redis could not be reached; nothing from the request was claimed as enqueued
     └── ConfigError         a setting is missing or malformed (the message names the variable)

Each class's docstring is its default message; handlers map them to answers in one place (handler.py).
"""

from __future__ import annotations

from collections.abc import Sequence


class GpuqError(Exception):
    """gpuq could not take this request."""

    def __init__(self, message: str | None = None) -> None:
        self.message = message or (self.__doc__ or "").strip()
        super().__init__(self.message)


class InvalidEvent(GpuqError):
    """The event has no shape gpuq knows (direct task, task batch, API Gateway, SQS or S3)."""


class InvalidJob(GpuqError):
    """The task is not a valid job."""

    def __init__(self, message: str | None = None, errors: Sequence[str] = ()) -> None:
        super().__init__(message)
        #: One reason per bad task (a batch is refused whole, and the caller should see every reason).
        self.errors: list[str] = list(errors) or [self.message]


class QueueUnavailable(GpuqError):
    """The job queue (Redis) is unreachable."""

    def __init__(self, message: str | None = None, detail: str = "") -> None:
        super().__init__(message)
        #: What the driver said, for the logs; callers get the plain message, not our network layout.
        self.detail = detail


class ConfigError(GpuqError):
    """A setting is missing or malformed."""
