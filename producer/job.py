"""The job: one model for what callers send, what sits in Redis and what the dispatcher reads back.

Wire format of a job in Redis (SPEC §3)::

    {"task_id": "…", "type": "start_transcribe", "data": {…}, "queue": "task_queue_1",
     "priority": "normal", "attempt": 0, "enqueued_at": "2026-11-22T13:12:16.123456Z"}

``attempt`` counts the attempts already made (0 for a fresh job). The seed system's shape,
``{"type": …, "data": {…, "task_id": …}}`` with the id inside ``data`` or absent, is still accepted.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from producer.errors import InvalidJob
from producer.keys import Priority

TaskId = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[^\s\x00-\x1f]+$")]
TaskType = Annotated[str, Field(min_length=1, max_length=50, pattern=r"^[A-Za-z0-9_.:-]+$")]
QueueName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:{}-]+$")]

#: A job's serialised size limit: Redis and MySQL cope with more, but a job is a pointer to work
#: (an S3 key, a text), not the work itself.
MAX_JOB_BYTES = 256 * 1024


def utcnow() -> datetime:
    return datetime.now(UTC)


class TaskIn(BaseModel):
    """A task as a caller submits it; everything but ``type`` may be left out."""

    model_config = ConfigDict(extra="forbid")

    type: TaskType
    data: dict[str, Any] = Field(default_factory=dict)
    task_id: TaskId | None = None
    queue: QueueName | None = None
    queue_name: QueueName | None = None  # the seed's field, same meaning as ``queue``
    priority: Priority = Priority.NORMAL
    not_before: datetime | None = None
    delay_seconds: float | None = Field(default=None, ge=0, le=7 * 24 * 3600)

    @field_validator("not_before")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Job(BaseModel):
    """A job as stored in Redis and read by the dispatcher."""

    model_config = ConfigDict(extra="ignore")

    task_id: TaskId
    type: TaskType
    data: dict[str, Any] = Field(default_factory=dict)
    queue: QueueName
    priority: Priority = Priority.NORMAL
    attempt: int = Field(default=0, ge=0)
    enqueued_at: datetime = Field(default_factory=utcnow)
    not_before: datetime | None = None

    def to_redis(self) -> str:
        return self.model_dump_json(exclude_none=True)


def describe(exc: ValidationError, where: str = "") -> str:
    """One line naming every offending field, e.g. ``tasks[1].type: Field required``."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = where
        for item in err["loc"]:
            loc += f"[{item}]" if isinstance(item, int) else (f".{item}" if loc else str(item))
        parts.append(f"{loc or 'task'}: {err['msg']}")
    return "; ".join(parts)


def build_job(
    task: TaskIn,
    *,
    default_queue: str,
    routes: dict[str, str] | None = None,
    now: datetime | None = None,
    where: str = "",
) -> Job:
    """Fill what the caller left out: id, queue (explicit > routed pool > default), schedule.

    ``where`` names the task in errors (``tasks[2]``), as in ``parse_task``.
    """
    now = now or utcnow()
    queue = task.queue or task.queue_name or (routes or {}).get(task.type) or default_queue
    task_id = task.task_id or _str_or_none(task.data.get("task_id")) or str(uuid.uuid4())
    not_before = task.not_before
    if task.delay_seconds:
        not_before = now + timedelta(seconds=task.delay_seconds)
    try:
        job = Job(
            task_id=task_id,
            type=task.type,
            data=task.data,
            queue=queue,
            priority=task.priority,
            enqueued_at=now,
            not_before=not_before,
        )
    except ValidationError as exc:
        raise InvalidJob(describe(exc, where)) from exc
    if len(job.to_redis()) > MAX_JOB_BYTES:
        field = f"{where}.data" if where else "data"
        raise InvalidJob(f"{field}: job is larger than {MAX_JOB_BYTES} bytes once serialised")
    return job


def parse_task(obj: Any, where: str = "task") -> TaskIn:
    """Validate one caller task; the error names the field (``tasks[2].type: Field required``)."""
    if not isinstance(obj, dict):
        raise InvalidJob(f"{where}: must be a JSON object, got {type(obj).__name__}")
    try:
        return TaskIn.model_validate(obj)
    except ValidationError as exc:
        raise InvalidJob(describe(exc, where)) from exc


def parse_redis_job(raw: bytes | str, queue: str) -> tuple[Job, bool]:
    """Read a job from the list ``queue``; returns the job and whether its ``task_id`` was made up here.

    A made-up id must be written back to Redis before the job is recorded (so a crash cannot give the same
    job a second id). The list a job sits in is its queue, whatever its body says.
    """
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidJob(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise InvalidJob(f"a job must be a JSON object, got {type(obj).__name__}")
    data = obj.get("data", {})
    if not isinstance(data, dict):
        raise InvalidJob("data: must be a JSON object")
    task_id = obj.get("task_id") or _str_or_none(data.get("task_id"))
    made_up = task_id is None
    fields = {**obj, "queue": queue, "task_id": task_id or str(uuid.uuid4())}
    try:
        return Job.model_validate(fields), made_up
    except ValidationError as exc:
        raise InvalidJob(describe(exc)) from exc


def _str_or_none(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return str(value)
