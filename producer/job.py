"""The job: one model for what callers send, what sits in Redis and what the dispatcher reads back.

Wire format of a job in Redis (SPEC §3)::

    {"task_id": "…", "type": "start_transcribe", "data": {…}, "queue": "task_queue_1",
     "priority": "normal", "attempt": 0, "enqueued_at": "2026-11-22T13:12:16.123456Z"}

``attempt`` counts the attempts already made (0 for a fresh job). The seed system's shape,
``{"type": …, "data": {…, "task_id": …}}`` with the id inside ``data`` or absent, is still accepted.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from producer.errors import InvalidJob
from producer.keys import Priority

# -- The rules a job is judged by, shared by the producer and the dispatcher (README "Jobs and their limits").
# Each one exists because a job breaking it once stopped every dispatcher or was lost (issue 11).

#: A new task's id: 1 to 128 characters, no whitespace, none of ``/ \ ? # %`` (an id is a URL path
#: segment: ``GET /tasks/{id}``; ``a/b`` could not be reached and ``x%2Fevents`` opened task x's stream), no
#: control, format (bidi, zero-width), surrogate, private-use or unassigned characters (Unicode C*, Z*).
MAX_TASK_ID_CHARS = 128
_ID_RESERVED = frozenset("/\\?#%")
#: A job's serialised size limit (``MAX_JOB_BYTES``): Redis and MySQL cope with more, but a job is a pointer
#: to work (an S3 key, a text), not the work itself; a 20 MB job once made MariaDB drop the connection.
DEFAULT_MAX_JOB_BYTES = 256 * 1024
#: What a dispatcher may add when it re-serialises a job (a made-up id, an enqueue time, a retry count):
#: a job the producer accepted at the limit is not dead-lettered for it.
REWRITE_ALLOWANCE = 1024
#: Containers nested in ``data`` at most: deep nesting broke JSON encoders (RecursionError, pydantic's
#: serialisation depth) long before it could mean anything to a GPU service.
MAX_DATA_DEPTH = 32
#: Integers a JSON encoder on the way to the GPU (orjson) can write: 64-bit, signed or unsigned.
_INT_RANGE = (-(2**63), 2**64 - 1)
#: Times (``not_before``, ``enqueued_at``) once converted to UTC: 0001-01-01T00:00:00+01:00 overflowed.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)
#: Attempts a job may say it has made: fits the database's INTEGER columns with room to count on.
MAX_ATTEMPT = 1000

_SURROGATE = re.compile("[\ud800-\udfff]")
#: Ids made only of these (UUIDs, names) pass without a look at each character.
_ID_COMMON = re.compile(r"[\w.:@+=,;~!$&'()*<>|^-]{1,128}", re.ASCII)


def task_id_problem(value: str) -> str | None:
    """Why ``value`` cannot be a new task's id, or None when it can."""
    if value in ("", ".", ".."):  # clients resolve . and .. away: GET /tasks/.. would reach / instead
        return f"must not be {value!r} (a task id is a URL path segment)" if value else "must not be empty"
    if _ID_COMMON.fullmatch(value):  # the usual ids (UUIDs, names), without a loop over characters
        return None
    if len(value) > MAX_TASK_ID_CHARS:
        return f"at most {MAX_TASK_ID_CHARS} characters, got {len(value)}"
    for i, ch in enumerate(value):
        if ch in _ID_RESERVED:
            return f"must not contain {ch!r} (a task id is a URL path segment)"
        if unicodedata.category(ch)[0] in "CZ":
            return (
                f"must not contain U+{ord(ch):04X} at position {i} "
                "(whitespace, control, bidi, zero-width or unassigned characters)"
            )
    return None


def data_problem(data: Any, where: str = "data") -> str | None:
    """Why ``data`` is not a job's data (too deep, a number or string no encoder takes), or None.

    Iterative, so a hostile depth costs a loop, not the stack."""
    stack: list[tuple[Any, str, int]] = [(data, where, 0)]
    while stack:
        value, path, depth = stack.pop()
        if not isinstance(value, dict | list):
            problem = _scalar_problem(value)
            if problem:
                return f"{path}: {problem}"
        elif depth >= MAX_DATA_DEPTH:
            shown = path if len(path) < 60 else f"{path[:40]}...{path[-16:]}"
            return f"{shown}: nested deeper than {MAX_DATA_DEPTH} levels"
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))
        else:
            for key, v in value.items():
                problem = "is not a string" if not isinstance(key, str) else _scalar_problem(key)
                if problem:
                    return f"{path}: key {key!r} {problem}"
                stack.append((v, f"{path}.{_show(key)}", depth + 1))
    return None


def _scalar_problem(value: Any) -> str | None:
    if isinstance(value, str):
        return "is not valid UTF-8 (a lone surrogate)" if _SURROGATE.search(value) else None
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if _INT_RANGE[0] <= value <= _INT_RANGE[1] else "is an integer out of the 64-bit range"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value} is not a JSON number"
    return f"a {type(value).__name__} is not JSON"


def _show(key: str) -> str:
    return key if len(key) <= 40 and key.isprintable() and "." not in key else repr(key[:40])


def _valid_data(value: dict[str, Any]) -> dict[str, Any]:
    problem = data_problem(value, "")
    if problem:
        raise ValueError(problem.lstrip(".: "))
    return value


def _utf8(value: str) -> str:
    if _SURROGATE.search(value):
        raise ValueError("not valid UTF-8 (a lone surrogate)")
    return value


def _not_bool(value: Any) -> Any:
    """JSON ``true`` is no number, but Python's bool is an int: ``"attempt": true`` was read as attempt 1."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not {str(value).lower()}")
    return value


def _new_task_id(value: str) -> str:
    problem = task_id_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _utc(value: datetime | None) -> datetime | None:
    """Aware UTC within [EARLIEST, LATEST); a time without an offset is UTC already."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        value = value.astimezone(UTC)
    except (OverflowError, ValueError):
        value = EARLIEST - timedelta(days=1)  # out of range either way; said just below
    if not EARLIEST <= value < LATEST:
        raise ValueError(f"must be from {EARLIEST:%Y-%m-%d} to {LATEST:%Y-%m-%d} UTC")
    return value


#: A task id as stored: what earlier versions accepted (up to 255 characters); new tasks get NewTaskId.
TaskId = Annotated[
    str, Field(min_length=1, max_length=255, pattern=r"^[^\s\x00-\x1f]+$"), AfterValidator(_utf8)
]
NewTaskId = Annotated[str, AfterValidator(_new_task_id)]
TaskType = Annotated[str, Field(min_length=1, max_length=50, pattern=r"^[A-Za-z0-9_.:-]+$")]
QueueName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:{}-]+$")]
JobData = Annotated[dict[str, Any], AfterValidator(_valid_data)]
UtcTime = Annotated[datetime, AfterValidator(_utc)]

#: Kept for callers of earlier versions: the default of ``MAX_JOB_BYTES``.
MAX_JOB_BYTES = DEFAULT_MAX_JOB_BYTES


def utcnow() -> datetime:
    return datetime.now(UTC)


class TaskIn(BaseModel):
    """A task as a caller submits it; everything but ``type`` may be left out."""

    model_config = ConfigDict(extra="forbid")

    type: TaskType
    data: JobData = Field(default_factory=dict)
    task_id: NewTaskId | None = None
    queue: QueueName | None = None
    queue_name: QueueName | None = None  # the seed's field, same meaning as ``queue``
    priority: Priority = Priority.NORMAL
    not_before: UtcTime | None = None
    delay_seconds: Annotated[float | None, BeforeValidator(_not_bool)] = Field(
        default=None, ge=0, le=7 * 24 * 3600
    )

    @model_validator(mode="after")
    def _one_queue(self) -> TaskIn:
        # Picking one of two different queues would put the job where the caller may not look for it.
        if self.queue is not None and self.queue_name is not None and self.queue != self.queue_name:
            raise ValueError(queue_conflict(self.queue, self.queue_name))
        return self


def queue_conflict(queue: str, queue_name: str) -> str:
    """The refusal of a task or batch naming two different queues."""
    return (
        f"queue {queue!r} and queue_name {queue_name!r} differ: give one of them "
        "(queue_name is the seed's name for queue)"
    )


class Job(BaseModel):
    """A job as stored in Redis and read by the dispatcher."""

    model_config = ConfigDict(extra="ignore")

    task_id: TaskId
    type: TaskType
    data: JobData = Field(default_factory=dict)
    queue: QueueName
    priority: Priority = Priority.NORMAL
    attempt: Annotated[int, BeforeValidator(_not_bool)] = Field(default=0, ge=0, le=MAX_ATTEMPT)
    enqueued_at: UtcTime = Field(default_factory=utcnow)
    not_before: UtcTime | None = None

    def to_redis(self) -> str:
        return self.model_dump_json(exclude_none=True)


#: Fields of a job in Redis that gpuq writes and a caller's task may not carry (TaskIn forbids them): why.
#: A caller's ``attempt`` counted as attempts already made: 999 ran as attempt 1000 with no retries left.
_SET_BY_GPUQ = {
    "attempt": "set by gpuq, not by a caller: a new task always starts at its first attempt",
    "enqueued_at": "set by gpuq, not by a caller: the time the producer accepted the task",
}


def describe(exc: ValidationError, where: str = "") -> str:
    """One line naming every offending field, e.g. ``tasks[1].type: Field required``."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = where
        for item in err["loc"]:
            loc += f"[{item}]" if isinstance(item, int) else (f".{item}" if loc else str(item))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and len(err["loc"]) == 1:
            msg = _SET_BY_GPUQ.get(str(err["loc"][0]), msg)
        parts.append(f"{loc or 'task'}: {msg}")
    return "; ".join(parts)


def build_job(
    task: TaskIn,
    *,
    default_queue: str,
    routes: dict[str, str] | None = None,
    now: datetime | None = None,
    where: str = "",
    max_bytes: int = DEFAULT_MAX_JOB_BYTES,
) -> Job:
    """Fill what the caller left out: id, queue (explicit > routed pool > default), schedule.

    ``where`` names the task in errors (``tasks[2]``), as in ``parse_task``; ``max_bytes`` is MAX_JOB_BYTES.
    """
    now = now or utcnow()
    queue = task.queue or task.queue_name or (routes or {}).get(task.type) or default_queue
    task_id = task.task_id or _str_or_none(task.data.get("task_id"))
    if task_id is not None and not task.task_id and (problem := task_id_problem(task_id)):
        raise InvalidJob(f"{where}.data.task_id: {problem}" if where else f"data.task_id: {problem}")
    task_id = task_id or str(uuid.uuid4())
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
        size = len(job.to_redis().encode())
    except ValidationError as exc:
        raise InvalidJob(describe(exc, where)) from exc
    except ValueError as exc:  # pydantic could not serialise it (the rules above should have said why)
        raise InvalidJob(f"{where or 'task'}: cannot be serialised ({exc})") from exc
    if size > max_bytes:
        field = f"{where}.data" if where else "data"
        raise InvalidJob(
            f"{field}: the job is {size} bytes once serialised, more than MAX_JOB_BYTES={max_bytes}"
        )
    return job


def parse_task(obj: Any, where: str = "task") -> TaskIn:
    """Validate one caller task; the error names the field (``tasks[2].type: Field required``)."""
    if not isinstance(obj, dict):
        raise InvalidJob(f"{where}: must be a JSON object, got {type(obj).__name__}")
    try:
        return TaskIn.model_validate(obj)
    except ValidationError as exc:
        raise InvalidJob(describe(exc, where)) from exc


def parse_redis_job(
    raw: bytes | str, queue: str, *, max_bytes: int = DEFAULT_MAX_JOB_BYTES
) -> tuple[Job, bool]:
    """Read a job from the list ``queue``; returns the job and whether it must be written back to Redis
    before the database hears of it: its ``task_id`` or ``enqueued_at`` was filled in here (a crash must
    not give the same job a second id, and a swept copy must be recognisable as the job recorded).

    Every rule of this module applies, so a job that would break a dispatcher is refused here, with the
    reason, instead (InvalidJob: the caller dead-letters it). The list a job sits in is its queue, whatever
    its body says. ``max_bytes`` is MAX_JOB_BYTES (plus REWRITE_ALLOWANCE for jobs a dispatcher rewrote).
    """
    limit = max_bytes + REWRITE_ALLOWANCE
    if len(raw) > limit or (len(raw) * 4 > limit and _utf8_size(raw) > limit):
        raise InvalidJob(f"the job is {_utf8_size(raw)} bytes, more than MAX_JOB_BYTES={max_bytes}")
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
        if isinstance(raw, str) and _SURROGATE.search(raw):
            raise UnicodeError("undecodable bytes")  # how Intake passes bytes that are not UTF-8 on
        obj = json.loads(text)
    except UnicodeError as exc:
        raise InvalidJob(f"not valid UTF-8 ({exc})") from exc
    except RecursionError as exc:
        raise InvalidJob("not JSON: nested too deeply to read") from exc
    except ValueError as exc:
        raise InvalidJob(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise InvalidJob(f"a job must be a JSON object, got {type(obj).__name__}")
    data = obj.get("data", {})
    if not isinstance(data, dict):
        raise InvalidJob("data: must be a JSON object")
    task_id = obj.get("task_id") or _str_or_none(data.get("task_id"))
    fields = {**obj, "queue": queue, "task_id": task_id or str(uuid.uuid4())}
    try:
        job = Job.model_validate(fields)
    except ValidationError as exc:
        raise InvalidJob(describe(exc)) from exc
    # A new task (attempt 0) obeys today's id rules; a retry carries the id its task was recorded with.
    if job.attempt == 0 and task_id is not None and (problem := task_id_problem(job.task_id)):
        raise InvalidJob(f"task_id: {problem}")
    # A dispatcher writes the job back, sweeps, parks and retries it as ``to_redis()``, not as ``raw``: the
    # fields it adds and numbers written out (``1e15`` is 1000000000000000.0) can make that bigger than
    # what this very check lets in, and a retry refused here would leave its task queued with no job.
    if len(raw) * _MAX_GROWTH > limit and (size := len(job.to_redis().encode())) > limit - _ATTEMPT_ROOM:
        raise InvalidJob(
            f"the job is {size} bytes as a dispatcher stores it, more than MAX_JOB_BYTES={max_bytes}"
        )
    return job, task_id is None or "enqueued_at" not in obj


#: How much bigger than its text a job can get once re-serialised (``1e15,`` -> ``1000000000000000.0,``).
_MAX_GROWTH = 5
#: Bytes kept for a retry's longer attempt number (up to MAX_ATTEMPT) after the size check above.
_ATTEMPT_ROOM = 8


def _utf8_size(raw: bytes | str) -> int:
    return len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogateescape"))


def _str_or_none(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return str(value)
