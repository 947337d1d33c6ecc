"""Jobs the way AWS delivers them: API Gateway proxy events (REST v1 and HTTP API v2, batches, some base64
encoded) and SQS events (records holding one task or a batch), each passed to the real Lambda entry point
``producer.handler.lambda_handler``, in this process. Shapes as in ``tests/events/``."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from demo.services import DemoError

API_BATCH = 25  # tasks per API request
SQS_RECORDS = 10  # records per SQS event: the default batch size of an SQS trigger
SQS_BATCH = 4  # tasks in a record that carries a batch


def _task(i: int) -> dict[str, Any]:
    """The seed's three task types, with data the seed's examples carry."""
    kind = i % 3
    if kind == 0:
        data: dict[str, Any] = {"s3_bucket": "demo-recordings", "s3_key": f"calls/{i:05d}.wav"}
        return {"type": "start_transcribe", "data": data}
    if kind == 1:
        return {"type": "send_email", "data": {"user_id": i, "email": f"user{i}@example.com"}}
    return {"type": "generate_report", "data": {"user_id": i, "report_type": "monthly"}}


def api_event(tasks: list[dict[str, Any]], *, v2: bool, b64: bool) -> dict[str, Any]:
    body = json.dumps({"tasks": tasks})
    if b64:
        body = base64.b64encode(body.encode()).decode()
    request_id = str(uuid.uuid4())
    headers = {"Content-Type": "application/json", "Host": "demo.execute-api.us-east-1.amazonaws.com"}
    if v2:
        return {
            "version": "2.0",
            "routeKey": "POST /tasks",
            "rawPath": "/tasks",
            "rawQueryString": "",
            "headers": headers,
            "requestContext": {
                "accountId": "123456789012",
                "apiId": "demo",
                "http": {"method": "POST", "path": "/tasks", "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1"},
                "requestId": request_id,
                "stage": "$default",
            },
            "body": body,
            "isBase64Encoded": b64,
        }
    return {
        "resource": "/tasks",
        "path": "/tasks",
        "httpMethod": "POST",
        "headers": headers,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "demo",
            "httpMethod": "POST",
            "path": "/prod/tasks",
            "requestId": request_id,
            "resourcePath": "/tasks",
            "stage": "prod",
        },
        "body": body,
        "isBase64Encoded": b64,
    }


def sqs_event(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    sent = str(int(datetime.now(UTC).timestamp() * 1000))
    return {
        "Records": [
            {
                "messageId": str(uuid.uuid4()),
                "receiptHandle": "demo",
                "body": json.dumps(body),
                "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": sent},
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:gpuq-tasks",
                "awsRegion": "us-east-1",
            }
            for body in bodies
        ]
    }


def deliveries(jobs: int) -> Iterator[tuple[str, dict[str, Any], int]]:
    """(source, event, tasks in it): half the jobs through the API, the rest through SQS."""
    tasks = [_task(i) for i in range(jobs)]
    api, sqs = tasks[: jobs // 2], tasks[jobs // 2 :]
    for n, start in enumerate(range(0, len(api), API_BATCH)):
        batch = api[start : start + API_BATCH]
        yield "api", api_event(batch, v2=n % 2 == 1, b64=n % 4 == 0), len(batch)
    bodies: list[dict[str, Any]] = []
    count = 0
    i = 0
    while i < len(sqs):
        if len(bodies) % 2 == 0:  # every other record is a batch, as a producer grouping messages sends
            bodies.append({"tasks": sqs[i : i + SQS_BATCH]})
            count += len(bodies[-1]["tasks"])
            i += SQS_BATCH
        else:
            bodies.append(sqs[i])
            count += 1
            i += 1
        if len(bodies) == SQS_RECORDS or i >= len(sqs):
            yield "sqs", sqs_event(bodies), count
            bodies, count = [], 0


@dataclass
class Submitted:
    tasks: int = 0
    api_requests: int = 0
    sqs_events: int = 0
    sqs_records: int = 0
    task_ids: list[str] = field(default_factory=list)  # the API answers them; SQS answers failures only
    error: str | None = None


def submit(jobs: int, out: Submitted) -> None:
    """Hand every event to the Lambda handler, counting into ``out`` (which the live view reads); any
    refusal is an error, as the demo's events are all valid."""
    from producer.handler import lambda_handler  # after the demo has set the producer's environment

    for source, event, count in deliveries(jobs):
        answer = lambda_handler(event, None)
        if source == "api":
            if answer.get("statusCode") != 202:
                raise DemoError(f"the API answered {answer.get('statusCode')}: {answer.get('body')}")
            out.task_ids += json.loads(answer["body"])["task_ids"]
            out.api_requests += 1
        else:
            if answer.get("batchItemFailures"):
                raise DemoError(f"SQS records not enqueued: {answer['batchItemFailures']}")
            out.sqs_events += 1
            out.sqs_records += len(event["Records"])
        out.tasks += count
