"""SQS and S3 events through the Lambda handler, against the real Redis (and moto's SQS)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from producer.errors import QueueUnavailable
from producer.handler import lambda_handler

from .conftest import ProducerEnv
from .helpers import load_event

GOOD_SINGLE, GOOD_BATCH, BAD = (r["messageId"] for r in load_event("sqs_mixed")["Records"])


def failures(answer: dict[str, Any]) -> list[str]:
    assert set(answer) == {"batchItemFailures"}
    return [f["itemIdentifier"] for f in answer["batchItemFailures"]]


def test_sqs_reports_exactly_the_bad_record(producer_env: ProducerEnv) -> None:
    # GIVEN a batch of three messages: a task, a batch of three tasks, and a task without a type
    answer = lambda_handler(load_event("sqs_mixed"), None)
    # THEN only the bad message is reported (so SQS redrives it to the DLQ); the four tasks wait
    assert failures(answer) == [BAD]
    assert [j["type"] for j in producer_env.jobs()] == [
        "start_transcribe",
        "start_transcribe",
        "send_email",
        "generate_report",
    ]


def test_sqs_redelivery_enqueues_nothing_twice(producer_env: ProducerEnv) -> None:
    # GIVEN the batch was handled once, then SQS delivers the same messages again (say the
    # function timed out after enqueueing)
    lambda_handler(load_event("sqs_mixed"), None)
    before = producer_env.jobs()
    answer = lambda_handler(load_event("sqs_mixed"), None)
    # THEN the good records succeed again and no job was added
    assert failures(answer) == [BAD]
    assert producer_env.jobs() == before
    assert producer_env.keys.idem(producer_env.queues[0], f"sqs:{GOOD_BATCH}#2") in producer_env.marks()


def test_sqs_with_redis_down_reports_every_record(producer_env: ProducerEnv, closed_port: int) -> None:
    producer_env.set(REDIS_URL=f"redis://127.0.0.1:{closed_port}/0")
    answer = lambda_handler(load_event("sqs_mixed"), None)
    assert failures(answer) == [GOOD_SINGLE, GOOD_BATCH, BAD]
    assert producer_env.marks() == []


def test_sqs_fifo_holds_back_a_failed_group(producer_env: ProducerEnv) -> None:
    # GIVEN a FIFO batch: group g1 = [bad, good], group g2 = [good]
    event = load_event("sqs_mixed")
    bad, good1, good2 = event["Records"][2], event["Records"][0], event["Records"][1]
    for record, group in ((bad, "g1"), (good1, "g1"), (good2, "g2")):
        record["attributes"]["MessageGroupId"] = group
    event["Records"] = [bad, good1, good2]
    # THEN g1's later message is not run ahead of its failed predecessor; g2 goes through
    assert failures(lambda_handler(event, None)) == [BAD, GOOD_SINGLE]
    assert len(producer_env.jobs()) == 3


def _lambda_record(message: dict[str, Any], queue_arn: str) -> dict[str, Any]:
    """What Lambda's SQS poller hands the function for a message SQS returned."""
    return {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": message["Attributes"],
        "messageAttributes": {},
        "md5OfBody": message["MD5OfBody"],
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": "us-east-1",
    }


def test_real_sqs_messages_bad_ones_end_in_the_dlq(producer_env: ProducerEnv, aws: None) -> None:
    import boto3

    sqs = boto3.client("sqs", region_name="us-east-1")
    dlq = sqs.create_queue(QueueName="gpuq-tasks-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "1"})
    url = sqs.create_queue(
        QueueName="gpuq-tasks", Attributes={"RedrivePolicy": redrive, "VisibilityTimeout": "0"}
    )["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    # GIVEN real messages on a queue with a DLQ: two good ones and two bad ones
    good = [
        json.dumps({"type": "a", "data": {"n": 1}}),
        json.dumps({"tasks": [{"type": "b"}, {"type": "c"}]}),
    ]
    bad = [json.dumps({"type": "a", "data": "not an object"}), "not json at all"]
    for body in [good[0], bad[0], good[1], bad[1]]:
        sqs.send_message(QueueUrl=url, MessageBody=body)
    # WHEN Lambda's poller receives them and calls the handler with what SQS returned
    received = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, AttributeNames=["All"])["Messages"]
    assert len(received) == 4
    answer = lambda_handler({"Records": [_lambda_record(m, arn) for m in received]}, None)
    # THEN exactly the bad messages are reported, and the good ones' three tasks wait in Redis
    bad_ids = sorted(m["MessageId"] for m in received if m["Body"] in bad)
    assert sorted(failures(answer)) == bad_ids
    assert [j["type"] for j in producer_env.jobs()] == ["a", "b", "c"]
    # AND after the poller deletes the rest, the redrive policy moves the bad ones to the DLQ
    for message in received:
        if message["MessageId"] not in bad_ids:
            sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    assert sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", []) == []
    dead = sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10)["Messages"]
    assert sorted(m["MessageId"] for m in dead) == bad_ids


def test_s3_object_created_becomes_a_task_once(producer_env: ProducerEnv) -> None:
    # GIVEN S3_TASK_TYPE names the task type S3 uploads become
    producer_env.set(S3_TASK_TYPE="transcribe_upload")
    # WHEN S3 invokes the function twice for the same object event (async invocations may repeat)
    first = lambda_handler(load_event("s3_put"), None)
    second = lambda_handler(load_event("s3_put"), None)
    # THEN the same id both times and a single job with the decoded key
    assert first == second
    (job,) = producer_env.jobs()
    assert first == {"task_ids": [job["task_id"]]}
    assert job["type"] == "transcribe_upload"
    assert job["data"]["s3_key"] == "recordings/2025/07/01/call one+1.wav"


def test_s3_with_redis_down_raises_so_lambda_retries(producer_env: ProducerEnv, closed_port: int) -> None:
    producer_env.set(REDIS_URL=f"redis://127.0.0.1:{closed_port}/0")
    with pytest.raises(QueueUnavailable):
        lambda_handler(load_event("s3_put"), None)


def test_s3_removals_are_answered_with_no_tasks(producer_env: ProducerEnv) -> None:
    event = load_event("s3_put")
    event["Records"][0]["eventName"] = "ObjectRemoved:Delete"
    assert lambda_handler(event, None) == {"task_ids": []}
    assert producer_env.all_jobs() == []


def test_a_broken_s3_record_is_refused_not_retried(producer_env: ProducerEnv) -> None:
    event = load_event("s3_put")
    del event["Records"][0]["s3"]["object"]["key"]
    answer = lambda_handler(event, None)
    assert answer == {"error": "Records[0]: not a valid S3 event record (missing 'key')"}
    assert producer_env.all_jobs() == []


def test_an_eventbridge_events_detail_is_its_task_enqueued_once(producer_env: ProducerEnv) -> None:
    # GIVEN an EventBridge rule whose target is the function, without an input transformer: the whole event
    # WHEN EventBridge invokes it twice for the same event (delivery is at least once)
    first = lambda_handler(load_event("eventbridge_custom"), None)
    second = lambda_handler(load_event("eventbridge_custom"), None)
    # THEN the event's detail is the task, enqueued once, under one id both times
    assert first == second
    (job,) = producer_env.jobs()
    assert first == {"task_ids": [job["task_id"]]}
    assert (job["type"], job["data"]["call_session"]) == ("start_transcribe", "1751353080.711222")


def test_an_eventbridge_batch_and_a_bad_detail(producer_env: ProducerEnv) -> None:
    event = load_event("eventbridge_custom")
    event["detail"] = {"tasks": [{"type": "a"}, {"type": "b"}]}
    assert len(lambda_handler(event, None)["task_ids"]) == 2
    # a detail that is no task is refused with the reason, nothing enqueued (the seed enqueued a sample job)
    event = load_event("eventbridge_custom")
    event["id"] = "another-event"
    event["detail"] = {"state": "running", "instance-id": "i-0abc"}
    answer = lambda_handler(event, None)
    assert "type" in answer["error"] and [j["type"] for j in producer_env.jobs()] == ["a", "b"]


def test_s3_object_created_through_eventbridge_becomes_a_task_once(producer_env: ProducerEnv) -> None:
    # GIVEN S3 sends its notifications to EventBridge, and a rule sends Object Created events to the function
    producer_env.set(S3_TASK_TYPE="transcribe_upload")
    first = lambda_handler(load_event("eventbridge_s3_object_created"), None)
    # and the same object's notification also arrives the classic way (both are configured)
    classic = load_event("s3_put")
    record = classic["Records"][0]["s3"]
    record["bucket"]["name"] = "esales-et-callrecordings"
    record["object"]["key"] = "recordings/2025/07/01/call+one%2B1.wav"  # URL-encoded, as S3 sends it there
    record["object"]["sequencer"] = "00617F08299329D189"
    second = lambda_handler(classic, None)
    # THEN one job, with the key as it is (EventBridge does not URL-encode it)
    assert first == second
    (job,) = producer_env.jobs()
    assert job["type"] == "transcribe_upload"
    assert job["data"]["s3_key"] == "recordings/2025/07/01/call one+1.wav"
    assert job["data"]["s3_size"] == 5242880


def test_other_s3_events_through_eventbridge_ask_for_no_work(producer_env: ProducerEnv) -> None:
    event = load_event("eventbridge_s3_object_created")
    event["detail-type"] = "Object Deleted"
    assert lambda_handler(event, None) == {"task_ids": []}
    assert producer_env.all_jobs() == []


def test_eventbridge_with_redis_down_raises_so_lambda_retries(
    producer_env: ProducerEnv, closed_port: int
) -> None:
    producer_env.set(REDIS_URL=f"redis://127.0.0.1:{closed_port}/0")
    with pytest.raises(QueueUnavailable):
        lambda_handler(load_event("eventbridge_custom"), None)


def test_an_eventbridge_event_through_sqs_is_read_as_one(producer_env: ProducerEnv) -> None:
    # GIVEN an EventBridge rule whose target is an SQS queue that triggers the function
    event = load_event("sqs_mixed")
    record = event["Records"][0]
    record["body"] = json.dumps(load_event("eventbridge_custom"))
    event["Records"] = [record]
    # WHEN it arrives, and the same event once more in another message (EventBridge delivers at least once)
    assert failures(lambda_handler(event, None)) == []
    record["messageId"] = "another-message"
    assert failures(lambda_handler(event, None)) == []
    # THEN its detail is the task, enqueued once
    (job,) = producer_env.jobs()
    assert (job["type"], job["data"]["call_session"]) == ("start_transcribe", "1751353080.711222")


def test_an_eventbridge_event_without_an_id_through_sqs_is_keyed_by_its_message(
    producer_env: ProducerEnv,
) -> None:
    event = load_event("sqs_mixed")
    record = event["Records"][0]
    body = load_event("eventbridge_custom")
    del body["id"]
    record["body"] = json.dumps(body)
    event["Records"] = [record]
    # WHEN SQS delivers the same message twice
    assert failures(lambda_handler(event, None)) == []
    assert failures(lambda_handler(event, None)) == []
    # THEN one job
    assert len(producer_env.jobs()) == 1


def test_sqs_a_record_reusing_a_task_id_in_its_batch_is_reported(producer_env: ProducerEnv) -> None:
    # GIVEN the mixed batch whose batch message gives one task id to tasks for two queues
    event = load_event("sqs_mixed")
    qa, qb = producer_env.queues
    record = next(r for r in event["Records"] if r["messageId"] == GOOD_BATCH)
    record["body"] = json.dumps(
        {
            "tasks": [
                {"type": "a", "task_id": "dupA", "queue": qa},
                {"type": "a", "task_id": "dupA", "queue": qb},
            ]
        }
    )
    # WHEN handled THEN that message fails with the bad one (a partial batch failure) and the good one waits
    answer = lambda_handler(event, None)
    assert failures(answer) == [GOOD_BATCH, BAD]
    assert [j["type"] for j in producer_env.all_jobs()] == ["start_transcribe"]
