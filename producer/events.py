"""What an event asks for: its shape, the tasks it carries and their jobs, with no I/O.

Shapes (SPEC §3), told apart by their markers, AWS shapes first::

    SQS      {"Records": [{"eventSource": "aws:sqs", "messageId", "body"}, ...]}   body: single or batch
    S3       {"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "s3": {...}}, ...]}
    API      REST v1 {"httpMethod", "requestContext", "body", "isBase64Encoded"}
             HTTP v2 {"version": "2.0", "requestContext", "body", "isBase64Encoded"}    body: single or batch
    direct   {"type", "data", ...}  (the seed's single task)   or   {"tasks": [{...}, ...]}

Anything else is refused with InvalidEvent. The seed enqueued a sample job for an event it did not know;
a producer that invents work is worse than one that says no.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import unquote_plus

from aws_lambda_powertools.utilities.data_classes import (
    APIGatewayProxyEvent,
    APIGatewayProxyEventV2,
    S3Event,
)
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from producer.errors import InvalidEvent, InvalidJob
from producer.job import Job, TaskIn, build_job, parse_task, queue_conflict
from producer.settings import ProducerSettings

#: A batch bigger than this is refused: one delivery is one Redis script call, and a caller with more
#: work should split it (SQS messages and API bodies cannot carry much more anyway).
MAX_TASKS_PER_DELIVERY = 1000

_TASK_FIELDS = frozenset(TaskIn.model_fields)
_BATCH_FIELDS = frozenset({"tasks", "queue", "queue_name"})
_BODY_HINT = 'a task object {"type", "data", ...} or a batch {"tasks": [...]}'


class Source(StrEnum):
    DIRECT = "direct"
    API = "api"
    SQS = "sqs"
    S3 = "s3"
    EVENTBRIDGE = "eventbridge"


# An EventBridge event (a rule's target without an input transformer); its ``detail`` holds the work.
_EVENTBRIDGE_FIELDS = frozenset({"detail-type", "source", "detail"})


@dataclass(frozen=True, slots=True)
class Item:
    """One task as found in the event, not yet validated."""

    where: str  # names the task in errors: "" for a lone task, "tasks[2]", "Records[0]"
    raw: Any
    delivery_key: str | None  # idempotency key the delivery gives when the caller gave no task_id


@dataclass(frozen=True, slots=True)
class Planned:
    """A valid job and the idempotency key that guards its push."""

    job: Job
    idem_key: str


def detect(event: Any) -> Source:
    if not isinstance(event, dict):
        raise InvalidEvent(f"event: must be a JSON object, got {_kind(event)}")
    if "Records" in event:
        return _records_source(event["Records"])
    if isinstance(event.get("requestContext"), dict) and ("httpMethod" in event or "version" in event):
        return Source.API
    if event.keys() >= _EVENTBRIDGE_FIELDS:
        return Source.EVENTBRIDGE
    # A dict with any task field is a (maybe broken) task: "type: Field required" helps more than
    # "unknown event".
    if "tasks" in event or _TASK_FIELDS & event.keys():
        return Source.DIRECT
    raise InvalidEvent(
        "event has no shape gpuq knows (direct task, task batch, API Gateway, SQS, S3 or EventBridge); "
        f"saw keys: {_keys(event)}"
    )


def split_payload(payload: Any, *, delivery_key: str | None = None, what: str = "body") -> list[Item]:
    """One task or a batch; the n-th task of a batch gets the delivery key ``<key>#<n>``.

    A batch's own ``queue`` / ``queue_name`` (the seed's field) is the queue of its tasks that name none.
    """
    if not isinstance(payload, dict):
        raise InvalidJob(f"{what}: must be {_BODY_HINT}, got {_kind(payload)}")
    if "tasks" not in payload:
        return [Item("", payload, delivery_key)]
    extra = sorted(set(payload) - _BATCH_FIELDS)
    tasks = payload["tasks"]
    if extra:
        allowed = ", ".join(sorted(_BATCH_FIELDS))
        raise InvalidJob(
            f"{what}: unexpected field(s) in a batch: {', '.join(map(str, extra))} (allowed: {allowed})"
        )
    if not isinstance(tasks, list):
        raise InvalidJob(f"tasks: must be a list of task objects, got {_kind(tasks)}")
    if not tasks:
        raise InvalidJob("tasks: must hold at least one task")
    if len(tasks) > MAX_TASKS_PER_DELIVERY:
        raise InvalidJob(f"tasks: {len(tasks)} tasks, more than {MAX_TASKS_PER_DELIVERY} in one delivery")
    for field in ("queue", "queue_name"):
        if (value := payload.get(field)) is not None and not isinstance(value, str):
            raise InvalidJob(f"{field}: must be a queue name, got {_kind(value)}")
    if payload.get("queue") and payload.get("queue_name") and payload["queue"] != payload["queue_name"]:
        raise InvalidJob(queue_conflict(payload["queue"], payload["queue_name"]))
    queue = payload.get("queue") or payload.get("queue_name")
    items = []
    for i, raw in enumerate(tasks):
        task = {**raw, "queue": queue} if queue and isinstance(raw, dict) and not _names_queue(raw) else raw
        items.append(Item(f"tasks[{i}]", task, f"{delivery_key}#{i}" if delivery_key else None))
    return items


def plan(items: list[Item], settings: ProducerSettings) -> list[Planned]:
    """Validate every task and build its job; one bad task refuses them all, naming each bad field."""
    planned: list[Planned] = []
    errors: list[str] = []
    known = settings.known_queues
    firsts: dict[str, tuple[str, tuple[Any, ...]]] = {}  # task id -> (where, what) of its first task here
    for item in items:
        try:
            task = parse_task(item.raw, item.where)
            job = build_job(
                task,
                default_queue=settings.queues[0],
                routes=settings.routes,
                where=item.where,
                max_bytes=settings.max_job_bytes,
            )
            if job.queue not in known:
                field = f"{item.where}.queue" if item.where else "queue"
                raise InvalidJob(f"{field}: {job.queue!r} is not a queue gpuq serves ({', '.join(known)})")
            if (repeat := _repeated_id(item.where, task, job, firsts)) is not None:
                raise InvalidJob(repeat)
        except InvalidJob as exc:
            errors.extend(exc.errors)
            continue
        caller_id = task.task_id is not None or task.data.get("task_id") not in (None, "")
        # Every job gets a mark: with no caller id or delivery key it is keyed on its fresh id, which
        # makes a client-side retry of the very same script call harmless.
        key = item.delivery_key if item.delivery_key and not caller_id else f"task:{job.task_id}"
        planned.append(Planned(job, key))
    if errors:
        summary = "; ".join(errors)
        if len(items) > 1:
            summary = f"{len(errors)} of {len(items)} tasks are invalid: {summary}"
        raise InvalidJob(summary, errors)
    return planned


def _repeated_id(
    where: str, task: TaskIn, job: Job, firsts: dict[str, tuple[str, tuple[Any, ...]]]
) -> str | None:
    """Why this task may not reuse the id of an earlier task of the same delivery, or None.

    Both would be answered as enqueued, but one id names one task: in another queue the dispatcher
    dead-letters the second ("task id already used"), in the same queue the idempotency mark drops it.
    Only an exact repeat (same queue and content) is let through, to count as the duplicate a resent task
    is; ``enqueued_at`` (and a ``delay_seconds``' start) are this call's clock, not the task's content.
    """
    what = (job.queue, job.type, job.data, job.priority, task.not_before, task.delay_seconds)
    first = firsts.setdefault(job.task_id, (where, what))
    if first[1] == what:
        return None
    field = "task_id" if task.task_id is not None else "data.task_id"
    return (
        f"{where}.{field}: task_id {job.task_id!r} appears more than once in this request "
        f"(also {first[0]}) with a different queue or content; give each task its own task_id"
    )


def api_payload(event: dict[str, Any]) -> Any:
    """The JSON body of an API Gateway REST (v1) or HTTP API (v2) proxy event."""
    proxy = APIGatewayProxyEventV2(event) if event.get("version") == "2.0" else APIGatewayProxyEvent(event)
    if not isinstance(proxy.body, str | None):
        raise InvalidEvent(f"body: must be a string, got {_kind(proxy.body)}")
    body = proxy.body
    if proxy.is_base64_encoded and body:
        # Strictly: a lenient decoder drops stray characters and could turn garbage into a task.
        try:
            body = base64.b64decode(body, validate=True).decode()
        except ValueError as exc:  # binascii.Error and UnicodeDecodeError are ValueErrors
            raise InvalidJob(
                f"body: isBase64Encoded is set but the body is not base64 of UTF-8 ({exc})"
            ) from exc
    if not body or not body.strip():
        raise InvalidJob(f"body: empty; send {_BODY_HINT}")
    return _json(body, "body")


def sqs_items(record: SQSRecord, s3_task_type: str) -> list[Item]:
    """The tasks of one SQS message: a task, a batch, or an S3 notification or EventBridge event routed
    through SQS."""
    payload = _json(record.body, "body")
    if isinstance(payload, dict) and payload.get("Event") == "s3:TestEvent":
        return []  # S3 sends this once when the notification is configured; there is nothing to do
    if (
        isinstance(payload, dict)
        and "Records" in payload
        and "tasks" not in payload
        and _records_source(payload["Records"]) is Source.S3
    ):
        return s3_items(payload, s3_task_type)
    if isinstance(payload, dict) and payload.keys() >= _EVENTBRIDGE_FIELDS:
        # a rule whose target is the queue; an event without an id is keyed by its message, as any other
        return eventbridge_items(payload, s3_task_type, fallback_key=f"sqs:{record.message_id}")
    return split_payload(payload, delivery_key=f"sqs:{record.message_id}")


def s3_items(event: dict[str, Any], task_type: str) -> list[Item]:
    """One task per ObjectCreated record; other S3 events (removals, restores) ask for no work."""
    items: list[Item] = []
    for i, record in enumerate(S3Event(event).records):
        try:
            if not record.event_name.startswith("ObjectCreated:"):
                continue
            bucket = record.s3.bucket.name
            obj = record.s3.get_object
            key = unquote_plus(obj.key)  # S3 sends keys URL-encoded, spaces as '+'
            size = obj.size if obj.get("size") is not None else None
            upload = _s3_upload(
                f"Records[{i}]",
                task_type=task_type,
                bucket=bucket,
                key=key,
                size=size,
                etag=obj.etag,
                sequencer=obj.get("sequencer"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidEvent(f"Records[{i}]: not a valid S3 event record ({_reason(exc)})") from exc
        items.append(upload)
    return items


def _s3_upload(
    where: str, *, task_type: str, bucket: str, key: str, size: Any, etag: Any, sequencer: Any
) -> Item:
    """The task of one uploaded object, from an S3 notification or S3's EventBridge event alike: the same
    data, and the same idempotency key, so one upload notified both ways is one task."""
    data: dict[str, Any] = {"s3_bucket": bucket, "s3_key": key}
    if size is not None:
        data["s3_size"] = size
    if etag:
        data["s3_etag"] = etag
    delivery = f"s3:{bucket}/{key}/{sequencer}" if sequencer else None
    return Item(where, {"type": task_type, "data": data}, delivery)


def eventbridge_items(
    event: dict[str, Any], s3_task_type: str, fallback_key: str | None = None
) -> list[Item]:
    """The tasks of an EventBridge event: an S3 "Object Created" event (S3's EventBridge notifications)
    becomes a task of ``S3_TASK_TYPE`` as an S3 notification does; any other event's ``detail`` is a task or
    a batch, as a direct invocation's event is. A rule with an input transformer sends a direct event."""
    detail = event["detail"]
    if event.get("source") == "aws.s3":
        if event.get("detail-type") != "Object Created":
            return []  # deletions, restores, tag changes: no work
        try:
            bucket = detail["bucket"]["name"]
            obj = detail["object"]
            key = obj["key"]
            if not isinstance(bucket, str) or not isinstance(key, str):
                raise TypeError("bucket name and object key must be strings")
        except (KeyError, TypeError) as exc:
            raise InvalidEvent(f"detail: not a valid S3 Object Created event ({_reason(exc)})") from exc
        # EventBridge sends keys as they are (not URL-encoded)
        return [
            _s3_upload(
                "detail",
                task_type=s3_task_type,
                bucket=bucket,
                key=key,
                size=obj.get("size"),
                etag=obj.get("etag"),
                sequencer=obj.get("sequencer"),
            )
        ]
    event_id = event.get("id")
    delivery_key = f"eventbridge:{event_id}" if isinstance(event_id, str) and event_id else fallback_key
    return split_payload(detail, delivery_key=delivery_key, what="detail")


def _records_source(records: Any) -> Source:
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise InvalidEvent("Records: must be a non-empty list of event records")
    sources = {record.get("eventSource") for record in records}
    if sources == {"aws:sqs"}:
        for i, record in enumerate(records):
            if not isinstance(record.get("messageId"), str) or not isinstance(record.get("body"), str):
                raise InvalidEvent(f"Records[{i}]: an SQS record needs string 'messageId' and 'body'")
        return Source.SQS
    if sources == {"aws:s3"}:
        return Source.S3
    seen = ", ".join(sorted(map(str, sources)))
    raise InvalidEvent(f"Records: event source(s) {seen}; gpuq takes aws:sqs or aws:s3 records")


def _names_queue(task: dict[str, Any]) -> bool:
    return bool(task.keys() & {"queue", "queue_name"})


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidJob(f"{what}: not valid JSON ({_reason(exc)})") from exc


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _keys(event: dict[str, Any]) -> str:
    names = sorted(map(str, event))
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} keys)" if len(names) > 10 else "")
    return shown or "none (empty object)"


def _reason(exc: BaseException) -> str:
    return f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
