"""The Lambda entry point: find the event's shape, enqueue its tasks, answer in that shape's terms.

Answers (SPEC §3); errors become answers here and nowhere else::

    direct  {"task_ids": [...]}                 | {"error": reason, "errors": [per bad task]}, none enqueued
    API     202 {"task_ids": [...]}             | 400 bad input (nothing enqueued from the request)
                                                | 503 Redis unreachable | 500 misconfigured producer
    SQS     {"batchItemFailures": [{"itemIdentifier": messageId}, ...]}  exactly the records not enqueued;
            a bad record is reported (and logged with its reason) so the redrive policy moves it to the DLQ
    S3      {"task_ids": [...]} | {"error": ...} for a malformed record; raises when Redis is unreachable,
            so that Lambda retries the asynchronous invocation instead of dropping the object

A direct caller gets ``{"error": ...}`` rather than an exception for Redis trouble too: a synchronous
caller reads the answer, and a traceback would tell it less.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    SqsFifoPartialProcessor,
    process_partial_response,
)
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from producer import enqueue, events
from producer.errors import ConfigError, GpuqError, InvalidEvent, InvalidJob, QueueUnavailable
from producer.events import Item, Source
from producer.settings import get_settings

logger = Logger(service="gpuq-producer")

_STATUS: tuple[tuple[type[GpuqError], int], ...] = (
    (InvalidEvent, 400),
    (InvalidJob, 400),
    (QueueUnavailable, 503),
    (ConfigError, 500),
)
_UNAVAILABLE = (QueueUnavailable, ConfigError)  # worth retrying the delivery later, unlike bad input


def lambda_handler(event: Any, context: Any) -> dict[str, Any]:
    if context is not None:
        logger.append_keys(aws_request_id=getattr(context, "aws_request_id", None))
    try:
        source = events.detect(event)
    except InvalidEvent as exc:
        _log_refused("unknown", exc)
        return _error_body(exc)
    try:
        return _ROUTES[source](event)
    except GpuqError:
        raise  # only the S3 and EventBridge routes let one out, on purpose
    except Exception as exc:
        # A bug must still answer in the event's terms: SQS retries every record, the API says 500.
        logger.exception("unexpected error", extra={"action": "crashed", "source": source.value})
        if source in (Source.S3, Source.EVENTBRIDGE):
            raise
        internal = GpuqError(f"internal error ({type(exc).__name__}); see the producer's logs")
        if source is Source.SQS:
            return {"batchItemFailures": [{"itemIdentifier": r["messageId"]} for r in event["Records"]]}
        return _http(500, _error_body(internal)) if source is Source.API else _error_body(internal)


def _direct(event: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"task_ids": _submit(Source.DIRECT, events.split_payload(event, what="event"))}
    except GpuqError as exc:
        _log_refused(Source.DIRECT, exc)
        return _error_body(exc)


def _api(event: dict[str, Any]) -> dict[str, Any]:
    try:
        task_ids = _submit(Source.API, events.split_payload(events.api_payload(event)))
    except GpuqError as exc:
        _log_refused(Source.API, exc)
        status = next(code for cls, code in _STATUS if isinstance(exc, cls))
        return _http(status, _error_body(exc))
    return _http(202, {"task_ids": task_ids})


def _sqs(event: dict[str, Any]) -> dict[str, Any]:
    outage: list[GpuqError] = []

    def record_handler(record: SQSRecord) -> list[str]:
        if outage:
            # Redis already failed in this invocation: fail the rest at once instead of spending a
            # connect timeout on each record.
            raise type(outage[0])(outage[0].message)
        try:
            return _submit(Source.SQS, events.sqs_items(record, get_settings().s3_task_type))
        except GpuqError as exc:
            if isinstance(exc, _UNAVAILABLE):
                outage.append(exc)
            _log_refused(Source.SQS, exc, message_id=record.message_id)
            raise

    # A FIFO queue must not run a group's later messages before a failed earlier one.
    fifo = any(r.get("attributes", {}).get("MessageGroupId") for r in event["Records"])
    processor = (
        SqsFifoPartialProcessor(skip_group_on_error=True)
        if fifo
        else BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
    )
    return dict(process_partial_response(event=event, record_handler=record_handler, processor=processor))


def _s3(event: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"task_ids": _submit(Source.S3, events.s3_items(event, get_settings().s3_task_type))}
    except GpuqError as exc:
        _log_refused(Source.S3, exc)
        if isinstance(exc, _UNAVAILABLE):
            raise
        return _error_body(exc)


def _eventbridge(event: dict[str, Any]) -> dict[str, Any]:
    """As S3's route: an asynchronous invocation, so an outage raises (Lambda retries the event, then its
    on-failure destination or dead-letter queue has it) and bad input is refused in the log."""
    try:
        items = events.eventbridge_items(event, get_settings().s3_task_type)
        return {"task_ids": _submit(Source.EVENTBRIDGE, items)}
    except GpuqError as exc:
        _log_refused(Source.EVENTBRIDGE, exc)
        if isinstance(exc, _UNAVAILABLE):
            raise
        return _error_body(exc)


_ROUTES: dict[Source, Callable[[dict[str, Any]], dict[str, Any]]] = {
    Source.DIRECT: _direct,
    Source.API: _api,
    Source.SQS: _sqs,
    Source.S3: _s3,
    Source.EVENTBRIDGE: _eventbridge,
}


def _submit(source: Source, items: list[Item]) -> list[str]:
    if not items:
        logger.info("nothing to enqueue", extra={"action": "ignored", "source": source.value})
        return []
    settings = get_settings()
    pushed = enqueue.push(events.plan(items, settings), settings)
    logger.info(
        "enqueued",
        extra={
            "action": "enqueued",
            "source": source.value,
            "task_ids": pushed.task_ids,
            "duplicates": pushed.duplicates,
        },
    )
    return pushed.task_ids


def _error_body(exc: GpuqError) -> dict[str, Any]:
    body: dict[str, Any] = {"error": exc.message}
    if isinstance(exc, InvalidJob):
        body["errors"] = exc.errors
    return body


def _http(status: int, body: dict[str, Any]) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if status == 503:
        headers["Retry-After"] = "5"
    return {"statusCode": status, "headers": headers, "body": json.dumps(body), "isBase64Encoded": False}


def _log_refused(source: str, exc: GpuqError, **fields: Any) -> None:
    detail = exc.detail if isinstance(exc, QueueUnavailable) else ""
    logger.warning(
        "refused",
        extra={
            "action": "unavailable" if isinstance(exc, _UNAVAILABLE) else "refused",
            "source": str(source),
            "reason": exc.message,
            **({"detail": detail} if detail else {}),
            **fields,
        },
    )
