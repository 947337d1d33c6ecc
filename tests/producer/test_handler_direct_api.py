"""Direct invocations and API Gateway events through the Lambda handler, against the real Redis."""

from __future__ import annotations

import base64
import json

import pytest

from producer.handler import lambda_handler

from .conftest import ProducerEnv
from .helpers import api_body, load_event


def test_the_seed_single_task_event(producer_env: ProducerEnv) -> None:
    # GIVEN the seed README's single-task event WHEN invoked directly
    answer = lambda_handler(load_event("direct_single_seed"), None)
    # THEN one id comes back and the job waits on the first of TASK_QUEUES in the wire format
    (task_id,) = answer["task_ids"]
    (job,) = producer_env.jobs()
    assert answer == {"task_ids": [task_id]}
    assert job["task_id"] == task_id
    assert job["type"] == "start_transcribe"
    assert job["data"]["s3_key"] == "recordings/audio.wav"
    assert (job["queue"], job["priority"], job["attempt"]) == (producer_env.queues[0], "normal", 0)


def test_the_seed_batch_event_keeps_its_order(producer_env: ProducerEnv) -> None:
    answer = lambda_handler(load_event("direct_batch_seed"), None)
    jobs = producer_env.jobs()
    assert [j["task_id"] for j in jobs] == answer["task_ids"]
    assert [j["type"] for j in jobs] == ["start_transcribe", "send_email", "generate_report"]


def test_seed_queue_name_and_data_task_id(producer_env: ProducerEnv) -> None:
    # GIVEN the seed's fields: `queue_name` picks the queue, the id sits inside `data`
    event = load_event("direct_single_seed")
    event["queue_name"] = producer_env.queues[1]
    event["data"]["task_id"] = "call-1751353080"
    # WHEN invoked twice (a retried invocation)
    first = lambda_handler(event, None)
    second = lambda_handler(event, None)
    # THEN the id is kept, the job is on that queue, and it was enqueued once
    assert first == second == {"task_ids": ["call-1751353080"]}
    assert [j["task_id"] for j in producer_env.jobs(producer_env.queues[1])] == ["call-1751353080"]
    assert producer_env.jobs(producer_env.queues[0]) == []


def test_a_routed_type_goes_to_its_pool_queue(producer_env: ProducerEnv) -> None:
    lambda_handler({"type": "embed", "data": {"text": "hi"}}, None)
    assert [j["type"] for j in producer_env.jobs(producer_env.pool_queue)] == ["embed"]


def test_a_direct_batch_with_a_bad_task_enqueues_nothing(producer_env: ProducerEnv) -> None:
    event = load_event("direct_batch_seed")
    del event["tasks"][1]["type"]
    answer = lambda_handler(event, None)
    assert answer == {
        "error": "1 of 3 tasks are invalid: tasks[1].type: Field required",
        "errors": ["tasks[1].type: Field required"],
    }
    assert producer_env.all_jobs() == []


@pytest.mark.parametrize("event", [{"detail-type": "Scheduled Event", "source": "aws.events"}, [1, 2], 7])
def test_an_unknown_event_is_refused_and_nothing_is_enqueued(
    producer_env: ProducerEnv, event: object
) -> None:
    # The seed enqueued a sample job here; gpuq must not.
    answer = lambda_handler(event, None)
    assert set(answer) == {"error"}
    assert "event" in answer["error"]
    assert producer_env.all_jobs() == []
    assert producer_env.marks() == []


def test_direct_with_redis_down_answers_an_error(producer_env: ProducerEnv, closed_port: int) -> None:
    producer_env.set(REDIS_URL=f"redis://127.0.0.1:{closed_port}/0")
    answer = lambda_handler(load_event("direct_single_seed"), None)
    assert answer == {"error": "The job queue (Redis) is unreachable."}


def test_a_malformed_setting_is_named(producer_env: ProducerEnv) -> None:
    # GIVEN REDIS_PORT is not a number (and no REDIS_URL overrides it)
    producer_env.monkeypatch.delenv("REDIS_URL")
    producer_env.set(REDIS_PORT="sixty")
    # WHEN invoked THEN the answer names the variable, directly and through the API (500)
    assert lambda_handler(load_event("direct_single_seed"), None)["error"].startswith("REDIS_PORT: ")
    answer = lambda_handler(load_event("apigw_v1_single"), None)
    assert answer["statusCode"] == 500
    assert api_body(answer)["error"].startswith("REDIS_PORT: ")


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("apigw_v1_single", 1),
        ("apigw_v1_batch_base64", 3),
        ("apigw_v2_single", 1),
        ("apigw_v2_batch_base64", 3),
    ],
)
def test_api_gateway_accepts_with_202(producer_env: ProducerEnv, name: str, count: int) -> None:
    # GIVEN a recorded REST (v1) or HTTP API (v2) event, body plain or base64, single or batch
    answer = lambda_handler(load_event(name), None)
    # THEN 202 with the ids, JSON, and the jobs are waiting in that order
    assert answer["statusCode"] == 202
    assert answer["headers"]["Content-Type"] == "application/json"
    ids = api_body(answer)["task_ids"]
    assert len(ids) == count
    assert [j["task_id"] for j in producer_env.jobs()] == ids


def test_api_gateway_refuses_a_batch_with_bad_tasks_whole(producer_env: ProducerEnv) -> None:
    # GIVEN a batch whose 1st task is fine, 2nd lacks a type and 3rd has a bad priority
    tasks = [{"type": "a"}, {"data": {"x": 1}}, {"type": "c", "priority": "urgent"}]
    event = load_event("apigw_v2_single")
    event["body"] = json.dumps({"tasks": tasks})
    # WHEN posted THEN 400 with one reason per bad task, and nothing from the request was enqueued
    answer = lambda_handler(event, None)
    assert answer["statusCode"] == 400
    body = api_body(answer)
    assert body["errors"] == [
        "tasks[1].type: Field required",
        "tasks[2].priority: Input should be 'high', 'normal' or 'low'",
    ]
    assert body["error"].startswith("2 of 3 tasks are invalid")
    assert producer_env.all_jobs() == []
    assert producer_env.marks() == []


@pytest.mark.parametrize(
    ("body", "b64", "reason"),
    [
        ("", False, "body: empty"),
        ("[1, 2]", False, "body: must be a task object"),
        ("{bad json", False, "body: not valid JSON"),
        ("***", True, "not base64"),
    ],
)
def test_api_gateway_bad_bodies_get_400(producer_env: ProducerEnv, body: str, b64: bool, reason: str) -> None:
    event = load_event("apigw_v1_single")
    event.update(body=body, isBase64Encoded=b64)
    answer = lambda_handler(event, None)
    assert answer["statusCode"] == 400
    assert reason in api_body(answer)["error"]
    assert producer_env.all_jobs() == []


def test_api_gateway_with_redis_down_is_503_and_claims_nothing(
    producer_env: ProducerEnv, closed_port: int
) -> None:
    producer_env.set(REDIS_URL=f"redis://127.0.0.1:{closed_port}/0")
    answer = lambda_handler(load_event("apigw_v1_batch_base64"), None)
    assert answer["statusCode"] == 503
    assert answer["headers"]["Retry-After"] == "5"
    assert api_body(answer) == {"error": "The job queue (Redis) is unreachable."}


def test_api_gateway_bad_input_is_400_even_with_redis_down(
    producer_env: ProducerEnv, closed_port: int
) -> None:
    # Validation comes first: a caller with a broken request should fix it, not retry it.
    producer_env.set(REDIS_URL=f"redis://127.0.0.1:{closed_port}/0")
    event = load_event("apigw_v2_single")
    event["body"] = json.dumps({"data": {}})
    assert lambda_handler(event, None)["statusCode"] == 400


def test_api_gateway_retry_with_a_caller_task_id_is_enqueued_once(producer_env: ProducerEnv) -> None:
    # GIVEN a client that retries its POST (API Gateway gives each try a new requestId)
    task = {"type": "start_transcribe", "task_id": "client-7", "data": {"s3_key": "k"}}
    event = load_event("apigw_v1_single")
    event.update(body=base64.b64encode(json.dumps(task).encode()).decode(), isBase64Encoded=True)
    answers = [lambda_handler(event, None) for _ in range(2)]
    event["requestContext"]["requestId"] = "another-request-id"
    answers.append(lambda_handler(event, None))
    # THEN every try is accepted with the same id, and one job waits
    assert {a["statusCode"] for a in answers} == {202}
    assert {tuple(api_body(a)["task_ids"]) for a in answers} == {("client-7",)}
    assert [j["task_id"] for j in producer_env.jobs()] == ["client-7"]


def test_api_gateway_without_task_id_retries_are_separate_tasks(producer_env: ProducerEnv) -> None:
    # requestId is not a safe key (a client retry gets a new one), so no delivery key is derived from it:
    # two posts of the same body are two tasks. Callers wanting exactly-once send a task_id.
    event = load_event("apigw_v2_single")
    first = api_body(lambda_handler(event, None))["task_ids"]
    second = api_body(lambda_handler(event, None))["task_ids"]
    assert first != second
    assert len(producer_env.jobs()) == 2


@pytest.mark.parametrize("where", ["down", "not a cluster"])
def test_api_gateway_is_503_when_a_configured_cluster_cannot_be_reached(
    producer_env: ProducerEnv, closed_port: int, redis_url: str, where: str
) -> None:
    # GIVEN REDIS_CLUSTER=true and no cluster to talk to: nothing listening (a cold start while the cluster
    # is down) or a plain Redis (REDIS_CLUSTER set by mistake). The cluster client fails in its constructor.
    # (database 0: a cluster has no other, and the settings refuse another with REDIS_CLUSTER=true)
    url = f"redis://127.0.0.1:{closed_port}/0" if where == "down" else redis_url.rsplit("/", 1)[0] + "/0"
    producer_env.set(REDIS_URL=url, REDIS_CLUSTER="true")
    # WHEN a request comes THEN 503 (retry later), as for a plain Redis that is down: not a 500 "internal error"
    answer = lambda_handler(load_event("apigw_v1_batch_base64"), None)
    assert answer["statusCode"] == 503
    assert api_body(answer) == {"error": "The job queue (Redis) is unreachable."}
    assert producer_env.all_jobs() == []


def _direct_batch(producer_env: ProducerEnv, tasks: list[dict[str, object]]) -> dict[str, object]:
    answer: dict[str, object] = lambda_handler({"tasks": tasks}, None)
    return answer


def test_one_task_id_for_two_queues_in_one_request_is_refused(producer_env: ProducerEnv) -> None:
    # GIVEN a batch that gives the id "dupA" to a task for each queue (an outside trial: both were answered
    # as enqueued, and the dispatcher dead-lettered one as "task id already used by another job")
    qa, qb = producer_env.queues
    tasks = [
        {"type": "a", "task_id": "ok-1"},
        {"type": "a", "task_id": "dupA", "queue": qa},
        {"type": "a", "task_id": "dupA", "queue": qb},
    ]
    # WHEN invoked directly THEN the repeat is refused naming the id and the first task, nothing is enqueued
    answer = _direct_batch(producer_env, tasks)
    assert answer["errors"] == [
        "tasks[2].task_id: task_id 'dupA' appears more than once in this request (also tasks[1]) "
        "with a different queue or content; give each task its own task_id"
    ]
    assert str(answer["error"]).startswith("1 of 3 tasks are invalid")
    assert producer_env.all_jobs() == []
    assert producer_env.marks() == []


def test_one_task_id_for_two_pools_or_two_payloads_is_refused_over_the_api(producer_env: ProducerEnv) -> None:
    # GIVEN one id used for two types routed to different pools, another (in data, the seed's place) for two
    # payloads on one queue, which the idempotency mark would have dropped unsaid
    tasks = [
        {"type": "a", "task_id": "dupB"},
        {"type": "embed", "task_id": "dupB"},
        {"type": "a", "data": {"task_id": "dupC", "n": 1}},
        {"type": "a", "data": {"task_id": "dupC", "n": 2}},
    ]
    event = load_event("apigw_v2_single")
    event["body"] = json.dumps({"tasks": tasks})
    # WHEN posted THEN 400 naming each repeat, and nothing from the request is enqueued
    answer = lambda_handler(event, None)
    assert answer["statusCode"] == 400
    errors = api_body(answer)["errors"]
    assert [e.split(": ", 1)[0] for e in errors] == ["tasks[1].task_id", "tasks[3].data.task_id"]
    assert "task_id 'dupB' appears more than once in this request (also tasks[0])" in errors[0]
    assert "task_id 'dupC' appears more than once in this request (also tasks[2])" in errors[1]
    assert producer_env.all_jobs() == []


def test_an_exact_repeat_in_one_request_is_one_task_counted_as_a_duplicate(producer_env: ProducerEnv) -> None:
    # GIVEN a batch holding the same task twice (same id, queue and content), as a resent task would be
    task = {"type": "a", "task_id": "same-1", "data": {"k": 1}, "delay_seconds": 5}
    answer = _direct_batch(producer_env, [task, {"type": "b"}, dict(task)])
    # THEN it is enqueued once, both places answer its id, and the other task is enqueued
    ids = answer["task_ids"]
    assert isinstance(ids, list) and ids[0] == ids[2] == "same-1"
    assert sorted(j["task_id"] for j in producer_env.jobs()) == sorted(ids[:2])


def test_a_task_naming_two_different_queues_is_refused(producer_env: ProducerEnv) -> None:
    # GIVEN a task with both `queue` and the seed's `queue_name` (an outside trial: `queue` won silently)
    qa, qb = producer_env.queues
    answer = _direct_batch(
        producer_env,
        [
            {"type": "a"},
            {"type": "a", "queue": qa, "queue_name": qb},
            {"type": "a", "queue": qb, "queue_name": qb},
        ],
    )
    # THEN that task is refused naming both fields and values; equal values are fine
    assert answer["errors"] == [
        f"tasks[1]: queue {qa!r} and queue_name {qb!r} differ: give one of them "
        "(queue_name is the seed's name for queue)"
    ]
    assert producer_env.all_jobs() == []
    single = lambda_handler({"type": "a", "queue": qa, "queue_name": qb}, None)
    assert single["error"] == (
        f"task: queue {qa!r} and queue_name {qb!r} differ: give one of them (queue_name is the seed's name for queue)"
    )
    ok = lambda_handler({"type": "a", "queue": qb, "queue_name": qb}, None)
    assert [j["task_id"] for j in producer_env.jobs(qb)] == ok["task_ids"]


def test_a_task_setting_its_attempt_is_refused_saying_gpuq_sets_it(producer_env: ProducerEnv) -> None:
    # GIVEN tasks carrying fields of the job in Redis that gpuq writes (an outside trial sent "attempt": 999,
    # which once counted as attempts made: no retries left). SPEC §3: the caller's task has no such field.
    answer = _direct_batch(producer_env, [{"type": "a"}, {"type": "a", "attempt": 999, "enqueued_at": "x"}])
    # THEN it is refused naming each field and why, and nothing is enqueued
    assert answer["errors"] == [
        "tasks[1].attempt: set by gpuq, not by a caller: a new task always starts at its first attempt; "
        "tasks[1].enqueued_at: set by gpuq, not by a caller: the time the producer accepted the task"
    ]
    assert producer_env.all_jobs() == []
