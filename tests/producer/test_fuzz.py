"""Whatever arrives, the handler answers in the event's terms and never raises (SPEC §7)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer.handler import lambda_handler
from tests.conftest import scaled

from .conftest import ProducerEnv
from .helpers import load_event

pytestmark = pytest.mark.fuzz

# Keys and values the parser looks at, so that generated events often come close to a real shape
# (and sometimes are one) instead of being refused at the first glance.
KEYS = st.sampled_from(
    ["type", "data", "tasks", "task_id", "queue", "queue_name", "priority", "delay_seconds", "not_before",
     "Records", "eventSource", "messageId", "body", "eventName", "s3", "requestContext", "httpMethod",
     "version", "isBase64Encoded", "x"]
)  # fmt: skip
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
WORDS = st.sampled_from(
    ["a", "embed", "aws:sqs", "aws:s3", "2.0", "high", "ObjectCreated:Put", "", "nowhere"]
)
JSON = st.recursive(
    SCALARS | WORDS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(KEYS | st.text(max_size=5), children, max_size=5)
    ),
    max_leaves=20,
)
TASK = st.fixed_dictionaries(
    {"type": WORDS | SCALARS},
    optional={
        "data": st.dictionaries(st.text(max_size=5), JSON, max_size=3) | JSON,
        "task_id": WORDS | SCALARS,
        "queue": WORDS | SCALARS,
        "queue_name": WORDS,
        "priority": WORDS | SCALARS,
        "delay_seconds": SCALARS,
    },
)
PAYLOAD = TASK | st.fixed_dictionaries({"tasks": st.lists(TASK | JSON, max_size=4) | JSON}) | JSON
SQS_RECORD = st.fixed_dictionaries(
    {
        "eventSource": st.just("aws:sqs"),
        "messageId": st.text(min_size=1, max_size=8) | SCALARS,
        "body": PAYLOAD.map(json.dumps) | st.text(max_size=10) | SCALARS,
    }
)
S3_OBJECT = st.fixed_dictionaries(
    {"key": st.text(max_size=10) | SCALARS},
    optional={"size": SCALARS, "sequencer": WORDS, "eTag": SCALARS},
)
S3_RECORD = st.fixed_dictionaries(
    {
        "eventSource": st.just("aws:s3"),
        "eventName": st.sampled_from(["ObjectCreated:Put", "ObjectRemoved:Delete"]) | SCALARS,
        "s3": st.fixed_dictionaries({"bucket": st.fixed_dictionaries({"name": WORDS}), "object": S3_OBJECT})
        | JSON,
    }
)
RECORDS = st.lists(SQS_RECORD, min_size=1, max_size=3) | st.lists(S3_RECORD, min_size=1, max_size=2) | JSON
EVENTS = PAYLOAD | st.fixed_dictionaries({"Records": RECORDS}) | JSON

SETTINGS = settings(
    max_examples=scaled(150),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def assert_well_formed(answer: Any) -> None:
    assert isinstance(answer, dict)
    if "statusCode" in answer:
        assert answer["statusCode"] in {202, 400, 500, 503}
        body = json.loads(answer["body"])
        assert ("task_ids" in body) is (answer["statusCode"] == 202)
        assert_well_formed(body)
    elif "batchItemFailures" in answer:
        assert all(isinstance(f["itemIdentifier"], str) for f in answer["batchItemFailures"])
    elif "task_ids" in answer:
        assert all(isinstance(t, str) and t for t in answer["task_ids"])
    else:
        assert isinstance(answer["error"], str) and answer["error"]
        assert set(answer) <= {"error", "errors"}


@SETTINGS
@given(event=EVENTS)
@pytest.mark.slow  # 3 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_any_json_event(producer_env: ProducerEnv, event: Any) -> None:
    try:
        answer = lambda_handler(event, None)
    except Exception as exc:  # only an S3 event may raise, and only when Redis is down (it is up)
        raise AssertionError(f"handler raised {exc!r} for {event!r}") from exc
    assert_well_formed(answer)


@SETTINGS
@given(body=PAYLOAD | st.text(max_size=30), as_text=st.booleans(), b64=st.booleans(), v2=st.booleans())
def test_any_api_gateway_body(
    producer_env: ProducerEnv, body: Any, as_text: bool, b64: bool, v2: bool
) -> None:
    event = load_event("apigw_v2_single" if v2 else "apigw_v1_single")
    text = body if as_text and isinstance(body, str) else json.dumps(body)
    event["body"] = base64.b64encode(text.encode("utf-8", "surrogatepass")).decode() if b64 else text
    event["isBase64Encoded"] = b64
    answer = lambda_handler(event, None)
    assert "statusCode" in answer
    assert_well_formed(answer)


@SETTINGS
@given(bodies=st.lists(PAYLOAD | st.text(max_size=30), min_size=1, max_size=4))
@pytest.mark.slow  # 3 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_any_sqs_bodies(producer_env: ProducerEnv, bodies: list[Any]) -> None:
    template = load_event("sqs_mixed")["Records"][0]
    records = []
    for i, body in enumerate(bodies):
        text = body if isinstance(body, str) else json.dumps(body)
        records.append({**template, "messageId": f"m{i}", "body": text})
    answer = lambda_handler({"Records": records}, None)
    assert_well_formed(answer)
    assert set(answer) == {"batchItemFailures"}
    assert {f["itemIdentifier"] for f in answer["batchItemFailures"]} <= {r["messageId"] for r in records}
