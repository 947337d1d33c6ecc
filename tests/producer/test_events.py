"""Event shapes and task validation, without Redis (producer/events.py)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from producer.errors import InvalidEvent, InvalidJob
from producer.events import Source, api_payload, detect, plan, s3_items, split_payload, sqs_items
from producer.settings import ProducerSettings, load

from .helpers import load_event


def settings(**overrides: Any) -> ProducerSettings:
    values = {"task_queues": "qa,qb", "task_routes": "embed=qpool", **overrides}
    return load(ProducerSettings, **values)


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("direct_single_seed", Source.DIRECT),
        ("direct_batch_seed", Source.DIRECT),
        ("apigw_v1_single", Source.API),
        ("apigw_v1_batch_base64", Source.API),
        ("apigw_v2_single", Source.API),
        ("apigw_v2_batch_base64", Source.API),
        ("sqs_mixed", Source.SQS),
        ("s3_put", Source.S3),
    ],
)
def test_every_recorded_event_is_recognised(name: str, source: Source) -> None:
    # GIVEN a recorded event WHEN its shape is detected THEN it is the expected source
    assert detect(load_event(name)) is source


@pytest.mark.parametrize(
    ("event", "named"),
    [
        ({"foo": 1, "bar": 2}, "saw keys: bar, foo"),
        ({}, "none (empty object)"),
        ([{"type": "x"}], "got a list"),
        ("start_transcribe", "got a string"),
        (None, "got null"),
        ({"Records": [{"eventSource": "aws:sns"}]}, "aws:sns"),
        ({"Records": []}, "non-empty list"),
        ({"Records": [{"eventSource": "aws:sqs", "messageId": "m1"}]}, "Records[0]"),
    ],
)
def test_unknown_shapes_are_refused_naming_what_was_seen(event: Any, named: str) -> None:
    # GIVEN an event of no known shape WHEN detected THEN InvalidEvent says what it saw
    with pytest.raises(InvalidEvent) as err:
        detect(event)
    assert named in err.value.message


def test_a_batch_names_each_task_and_numbers_its_delivery_keys() -> None:
    # GIVEN a batch of two from a delivery with a key WHEN split THEN each task has its place and key
    items = split_payload({"tasks": [{"type": "a"}, {"type": "b"}]}, delivery_key="sqs:m1")
    assert [(i.where, i.delivery_key) for i in items] == [("tasks[0]", "sqs:m1#0"), ("tasks[1]", "sqs:m1#1")]
    single = split_payload({"type": "a"}, delivery_key="sqs:m2")
    assert [(i.where, i.delivery_key) for i in single] == [("", "sqs:m2")]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ([{"type": "a"}], "body: must be a task object"),
        ({"tasks": {"type": "a"}}, "tasks: must be a list"),
        ({"tasks": []}, "tasks: must hold at least one task"),
        ({"tasks": [{"type": "a"}], "type": "a"}, "unexpected field(s) in a batch: type"),
        ({"tasks": [{"type": "a"}], "queue_name": 5}, "queue_name: must be a queue name, got int"),
        ({"tasks": [{"type": "a"}], "queue": "qa", "queue_name": 5}, "queue_name: must be a queue name"),
        (
            {"tasks": [{"type": "a"}], "queue": "qa", "queue_name": "qb"},
            "queue 'qa' and queue_name 'qb' differ: give one of them",
        ),
        ({"tasks": [{"type": "a"}] * 1001}, "more than 1000"),
    ],
)
def test_malformed_batches_are_refused(payload: Any, reason: str) -> None:
    with pytest.raises(InvalidJob) as err:
        split_payload(payload)
    assert reason in err.value.message


def test_every_bad_task_of_a_batch_is_named_by_its_field() -> None:
    # GIVEN a batch whose 2nd task lacks a type and whose 3rd names an unknown queue
    batch = {"tasks": [{"type": "a"}, {"data": {}}, {"type": "b", "queue": "nowhere"}]}
    # WHEN planned THEN the whole batch is refused and each reason names its task and field
    with pytest.raises(InvalidJob) as err:
        plan(split_payload(batch), settings())
    assert err.value.errors == [
        "tasks[1].type: Field required",
        "tasks[2].queue: 'nowhere' is not a queue gpuq serves (qa, qb, qpool)",
    ]
    assert err.value.message.startswith("2 of 3 tasks are invalid: tasks[1].type: Field required")


def test_a_lone_bad_task_names_the_bare_fields_in_one_reason() -> None:
    # GIVEN one task with two faults WHEN planned THEN one reason (one per task) names both fields
    with pytest.raises(InvalidJob) as err:
        plan(split_payload({"type": "a", "data": [1], "colour": "red"}), settings())
    assert err.value.errors == [
        "data: Input should be a valid dictionary; colour: Extra inputs are not permitted"
    ]


def test_seed_fields_queue_name_and_data_task_id_are_kept() -> None:
    # GIVEN the seed's shape: queue chosen by `queue_name`, the id inside `data`
    task = {"type": "start_transcribe", "queue_name": "qb", "data": {"task_id": "call-42", "s3_key": "a"}}
    # WHEN planned THEN the job goes to that queue, keeps the id, and is keyed on it for idempotency
    (planned,) = plan(split_payload(task, delivery_key="sqs:m1"), settings())
    assert (planned.job.queue, planned.job.task_id, planned.idem_key) == ("qb", "call-42", "task:call-42")


def test_defaults_routes_and_idempotency_keys() -> None:
    batch = {"tasks": [{"type": "a"}, {"type": "embed"}, {"type": "a", "task_id": "t-1"}]}
    first, routed, given = plan(split_payload(batch, delivery_key="sqs:m9"), settings())
    # THEN the default queue is the first of TASK_QUEUES and a routed type goes to its pool's queue
    assert (first.job.queue, routed.job.queue, given.job.queue) == ("qa", "qpool", "qa")
    # AND the delivery keys the tasks without an id; a caller's id wins over the delivery
    assert (first.idem_key, routed.idem_key, given.idem_key) == ("sqs:m9#0", "sqs:m9#1", "task:t-1")
    # AND a task with neither is keyed on its fresh id (API Gateway's requestId changes on each retry)
    (fresh,) = plan(split_payload({"type": "a"}), settings())
    assert fresh.idem_key == f"task:{fresh.job.task_id}"


def test_api_bodies_plain_and_base64() -> None:
    v1 = load_event("apigw_v1_batch_base64")
    assert len(api_payload(v1)["tasks"]) == 3
    v2 = load_event("apigw_v2_single")
    assert api_payload(v2)["type"] == "start_transcribe"


@pytest.mark.parametrize(
    ("body", "b64", "reason"),
    [
        (None, False, "body: empty"),
        ("   ", False, "body: empty"),
        ("{not json", False, "body: not valid JSON"),
        ("%%%not-base64", True, "not base64"),
        (base64.b64encode(b"\xff\xfe").decode(), True, "not base64 of UTF-8"),
    ],
)
def test_bad_api_bodies(body: str | None, b64: bool, reason: str) -> None:
    event = load_event("apigw_v2_single")
    event.update(body=body, isBase64Encoded=b64)
    with pytest.raises(InvalidJob) as err:
        api_payload(event)
    assert reason in err.value.message


def test_s3_records_become_tasks_with_decoded_keys() -> None:
    # GIVEN S3's put event, whose key is URL-encoded ("+" is a space, "%2B" a plus)
    (item,) = s3_items(load_event("s3_put"), "start_transcribe")
    # THEN the task carries the real key, and the delivery key is bucket/key/sequencer
    assert item.raw == {
        "type": "start_transcribe",
        "data": {
            "s3_bucket": "esales-et-callrecordings",
            "s3_key": "recordings/2025/07/01/call one+1.wav",
            "s3_size": 1024,
            "s3_etag": "0123456789abcdef0123456789abcdef",
        },
    }
    assert (
        item.delivery_key
        == "s3:esales-et-callrecordings/recordings/2025/07/01/call one+1.wav/0A1B2C3D4E5F678901"
    )


def test_s3_removals_ask_for_nothing_and_broken_records_are_refused() -> None:
    event = load_event("s3_put")
    event["Records"][0]["eventName"] = "ObjectRemoved:Delete"
    assert s3_items(event, "t") == []
    del event["Records"][0]["s3"]["bucket"]
    event["Records"][0]["eventName"] = "ObjectCreated:Put"
    with pytest.raises(InvalidEvent, match=r"Records\[0\]: not a valid S3 event record \(missing 'bucket'\)"):
        s3_items(event, "t")


def test_sqs_bodies_carrying_s3_notifications() -> None:
    # GIVEN S3 -> SQS -> Lambda: the message body is an S3 event
    record = load_event("sqs_mixed")["Records"][0]
    record["body"] = json.dumps(load_event("s3_put"))
    (item,) = sqs_items(SQSRecord(record), "start_transcribe")
    # THEN it is the object's task, keyed on the object rather than on the message
    assert item.delivery_key is not None and item.delivery_key.startswith("s3:esales-et-callrecordings/")
    # AND S3's one-off test message asks for nothing (rather than landing in the DLQ)
    record["body"] = json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "b"})
    assert sqs_items(SQSRecord(record), "start_transcribe") == []


def test_a_batch_level_queue_name_is_the_default_of_its_tasks() -> None:
    # GIVEN the seed's batch with a top-level queue_name, one task naming its own queue
    batch = {"queue_name": "qb", "tasks": [{"type": "a"}, {"type": "a", "queue": "qa"}, {"type": "embed"}]}
    jobs = [p.job for p in plan(split_payload(batch), settings())]
    # THEN tasks without a queue take the batch's (over routing too); an explicit one wins
    assert [j.queue for j in jobs] == ["qb", "qa", "qb"]
