"""The poison corpus through the producer (issue 11): each task that would break a dispatcher, or that no
dispatcher could serve, is refused with the reason naming the field: ``{"error"}`` for a direct call, 400 for
API Gateway, a batchItemFailure for exactly its SQS record (the good records around it are enqueued).
Before, some were accepted (a year-1 time that killed every dispatcher) and some were answered "internal
error" (API 500, SQS retried to the DLQ)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from producer.handler import lambda_handler

from .conftest import ProducerEnv
from .helpers import api_body, load_event


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"x": value}
    return value


# (name, task, what the reason must say). Each task is written as JSON text by the API and SQS cases, so
# "\ud800" travels as the escape a hostile client sends.
POISON: list[tuple[str, dict[str, Any], str]] = [
    ("year 1 with an offset", {"type": "t", "not_before": "0001-01-01T00:00:00+01:00"}, "not_before"),
    ("year 9999 with an offset", {"type": "t", "not_before": "9999-12-31T23:59:59-01:00"}, "not_before"),
    ("lone surrogate in data", {"type": "t", "data": {"text": "\ud800"}}, "UTF-8"),
    ("lone surrogate in a key", {"type": "t", "data": {"\udfff": 1}}, "UTF-8"),
    ("900 levels deep", {"type": "t", "data": _nested(900)}, "nested deeper than 32"),
    ("integer past 64 bits", {"type": "t", "data": {"n": 2**64}}, "64-bit"),
    ("task id with a slash", {"type": "t", "task_id": "a/b"}, "task_id"),
    ("task id with an escaped slash", {"type": "t", "task_id": "x%2Fevents"}, "task_id"),
    ("task id with a bidi override", {"type": "t", "task_id": "invoice\u202egnp.exe"}, "U+202E"),
    ("task id with a zero-width space", {"type": "t", "task_id": "job\u200b1"}, "U+200B"),
    ("task id with a control character", {"type": "t", "task_id": "job\x071"}, "task_id"),
    ("task id of 129 characters", {"type": "t", "task_id": "x" * 129}, "128"),
    ("task id '..' (clients resolve it away)", {"type": "t", "task_id": ".."}, "'..'"),
    ("task id '.'", {"type": "t", "task_id": "."}, "'.'"),
    ("bad id inside data", {"type": "t", "data": {"task_id": "a/b"}}, "data.task_id"),
    ("job over MAX_JOB_BYTES", {"type": "t", "data": {"blob": "x" * 300_000}}, "MAX_JOB_BYTES"),
    # JSON true is no number (Python's bool is an int: it was read as 1)
    ("delay_seconds true", {"type": "t", "delay_seconds": True}, "delay_seconds: must be a number, not true"),
    ("priority true", {"type": "t", "priority": True}, "priority"),
]
IDS = [name for name, _, _ in POISON]


@pytest.mark.parametrize(("name", "task", "reason"), POISON, ids=IDS)
def test_direct_invocation_refuses_it(producer_env: ProducerEnv, name: str, task: dict, reason: str) -> None:
    answer = lambda_handler(task, None)
    assert set(answer) == {"error", "errors"}, answer
    assert reason in answer["error"]
    assert "internal error" not in answer["error"]
    assert producer_env.all_jobs() == []


@pytest.mark.parametrize(("name", "task", "reason"), POISON, ids=IDS)
def test_api_gateway_answers_400(producer_env: ProducerEnv, name: str, task: dict, reason: str) -> None:
    event = load_event("apigw_v2_single")
    event["body"] = json.dumps({"tasks": [{"type": "t", "data": {"good": 1}}, task]})
    event["isBase64Encoded"] = False
    answer = lambda_handler(event, None)
    assert answer["statusCode"] == 400, answer
    body = api_body(answer)
    assert reason in body["error"]
    assert body["errors"][0].startswith("tasks[1]")
    assert producer_env.all_jobs() == []  # nothing from that request, not even the good task


@pytest.mark.parametrize(("name", "task", "reason"), POISON, ids=IDS)
def test_sqs_fails_that_record_only(producer_env: ProducerEnv, name: str, task: dict, reason: str) -> None:
    template = load_event("sqs_mixed")["Records"][0]
    records = [
        {**template, "messageId": "good-1", "body": json.dumps({"type": "t", "data": {"i": 1}})},
        {**template, "messageId": "bad", "body": json.dumps(task)},
        {**template, "messageId": "good-2", "body": json.dumps({"type": "t", "data": {"i": 2}})},
    ]
    answer = lambda_handler({"Records": records}, None)
    assert answer == {"batchItemFailures": [{"itemIdentifier": "bad"}]}
    assert sorted(j["data"]["i"] for j in producer_env.all_jobs()) == [1, 2]


def test_a_nan_in_the_body_is_refused(producer_env: ProducerEnv) -> None:
    # json.loads reads NaN; no JSON encoder on the way to a GPU writes it
    event = load_event("apigw_v2_single")
    event["body"] = '{"type": "t", "data": {"x": NaN}}'
    event["isBase64Encoded"] = False
    answer = lambda_handler(event, None)
    assert answer["statusCode"] == 400
    assert "data: x: nan is not a JSON number" in api_body(answer)["error"]


def test_max_job_bytes_is_a_setting(producer_env: ProducerEnv) -> None:
    producer_env.set(MAX_JOB_BYTES="2048")
    refused = lambda_handler({"type": "t", "data": {"blob": "x" * 3000}}, None)
    assert "more than MAX_JOB_BYTES=2048" in refused["error"]
    assert "task_ids" in lambda_handler({"type": "t", "data": {"blob": "x" * 1000}}, None)


def test_good_ids_and_times_are_kept(producer_env: ProducerEnv) -> None:
    # printable non-ASCII is fine; a time with an offset is stored in UTC
    task = {"type": "t", "task_id": "Rechnung-Müller-№7", "not_before": "2030-01-01T12:00:00+02:00"}
    assert lambda_handler(task, None) == {"task_ids": ["Rechnung-Müller-№7"]}
    (job,) = producer_env.jobs()
    assert job["not_before"] == "2030-01-01T10:00:00Z"


def test_the_idempotency_window_is_a_setting(producer_env: ProducerEnv) -> None:
    producer_env.set(IDEMPOTENCY_TTL_SECONDS="60")
    lambda_handler({"type": "t", "task_id": "short-window"}, None)
    assert (
        55 < producer_env.rds.ttl(producer_env.keys.idem(producer_env.queues[0], "task:short-window")) <= 60
    )
