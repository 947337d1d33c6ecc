"""The one Redis module (producer/enqueue.py), against the real Redis."""

from __future__ import annotations

import pytest
import redis.retry

from producer.enqueue import push
from producer.errors import QueueUnavailable
from producer.events import Planned, plan, split_payload
from producer.keys import IDEMPOTENCY_TTL_SECONDS, Legacy
from producer.settings import get_settings

from .conftest import ProducerEnv


def planned(payload: object, delivery_key: str | None = None) -> list[Planned]:
    return plan(split_payload(payload, delivery_key=delivery_key), get_settings())


def test_jobs_are_pushed_oldest_first_and_by_priority(producer_env: ProducerEnv) -> None:
    # GIVEN a batch of three normal tasks and one urgent one
    batch = {
        "tasks": [
            {"type": "a", "data": {"n": 1}},
            {"type": "a", "data": {"n": 2}},
            {"type": "a", "data": {"n": 3}, "priority": "high"},
            {"type": "a", "data": {"n": 4}},
        ]
    }
    # WHEN pushed
    result = push(planned(batch), get_settings())
    # THEN the normal list holds them oldest first, the high one sits in {<queue>}:high
    queue = producer_env.queues[0]
    assert [j["data"]["n"] for j in producer_env.jobs(queue)] == [1, 2, 4]
    assert [j["data"]["n"] for j in producer_env.jobs(f"{{{queue}}}:high")] == [3]
    assert result.duplicates == 0
    assert [j["task_id"] for j in producer_env.jobs(queue)] == [result.task_ids[i] for i in (0, 1, 3)]
    job = producer_env.jobs(queue)[0]
    assert set(job) == {"task_id", "type", "data", "queue", "priority", "attempt", "enqueued_at"}
    assert (job["queue"], job["priority"], job["attempt"]) == (queue, "normal", 0)


def test_a_redelivery_returns_the_first_ids_and_pushes_nothing(producer_env: ProducerEnv) -> None:
    # GIVEN a batch of two from SQS message m1, pushed once
    batch = {"tasks": [{"type": "a"}, {"type": "b"}]}
    first = push(planned(batch, "sqs:m1"), get_settings())
    # WHEN the same message is delivered again (its tasks get fresh uuids this time)
    again = push(planned(batch, "sqs:m1"), get_settings())
    # THEN the first delivery's ids come back, marked as duplicates, and the list still holds two jobs
    assert again.task_ids == first.task_ids
    assert again.duplicates == 2
    assert len(producer_env.jobs()) == 2
    # AND each mark maps its delivery key to the task id for a day
    mark = producer_env.keys.idem(producer_env.queues[0], "sqs:m1#1")
    assert producer_env.rds.get(mark) == first.task_ids[1].encode()
    assert IDEMPOTENCY_TTL_SECONDS - 5 < producer_env.rds.ttl(mark) <= IDEMPOTENCY_TTL_SECONDS


def test_a_task_repeated_inside_one_batch_is_pushed_once(producer_env: ProducerEnv) -> None:
    batch = {"tasks": [{"type": "a", "task_id": "same"}, {"type": "a", "task_id": "same"}]}
    result = push(planned(batch), get_settings())
    assert (result.task_ids, result.duplicates) == (["same", "same"], 1)
    assert len(producer_env.jobs()) == 1


def test_nothing_is_written_when_one_key_of_the_delivery_is_unusable(producer_env: ProducerEnv) -> None:
    # GIVEN the second queue's key holds a string, not a list
    producer_env.rds.set(producer_env.queues[1], "not a list")
    batch = {"tasks": [{"type": "a"}, {"type": "a", "queue": producer_env.queues[1]}]}
    # WHEN a batch for both queues is pushed THEN it fails as a whole
    with pytest.raises(QueueUnavailable) as err:
        push(planned(batch), get_settings())
    assert "WRONGTYPE" in err.value.detail
    # AND neither the first job nor any mark was left behind
    assert producer_env.jobs() == []
    assert producer_env.marks() == []


def test_dispatchers_are_woken_after_a_push_but_not_after_a_pure_redelivery(
    producer_env: ProducerEnv,
) -> None:
    pubsub = producer_env.rds.pubsub()
    pubsub.subscribe(producer_env.keys.wake)
    try:
        # every wait below ends as soon as its message arrives; the timeouts only bound a failure
        confirmed = pubsub.get_message(timeout=10)
        assert confirmed is not None and confirmed["type"] == "subscribe"
        push(planned({"type": "a", "task_id": "w1"}), get_settings())
        message = pubsub.get_message(timeout=10)
        assert message is not None and message["data"] == b"job"
        push(planned({"type": "a", "task_id": "w1"}), get_settings())
        # a marker published after the redelivery is the next message: the redelivery published nothing
        producer_env.rds.publish(producer_env.keys.wake, "marker")
        message = pubsub.get_message(timeout=10)
        assert message is not None and message["data"] == b"marker"
    finally:
        pubsub.close()


def test_an_unreachable_redis_is_reported_quickly(
    producer_env: ProducerEnv, closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN REDIS_URL points at a port that refuses connections
    producer_env.set(REDIS_URL=f"redis://127.0.0.1:{closed_port}/0")
    jobs = planned({"type": "a"})
    waits: list[float] = []
    monkeypatch.setattr(redis.retry, "sleep", waits.append)  # the retry budget, not this machine's speed
    # WHEN pushing THEN QueueUnavailable, within the short retry budget, with the cause for the logs
    with pytest.raises(QueueUnavailable) as err:
        push(jobs, get_settings())
    assert 1 <= len(waits) <= 3 and sum(waits) <= 0.75, waits
    assert "ConnectionError" in err.value.detail
    assert err.value.message == "The job queue (Redis) is unreachable."


def test_an_idempotency_mark_of_the_old_key_layout_is_honoured(producer_env: ProducerEnv) -> None:
    # GIVEN a delivery accepted before issue 15, whose mark sits under the old name (no queue tag)
    producer_env.rds.set(Legacy(producer_env.prefix).idem("task:before-upgrade"), "before-upgrade", ex=600)
    # WHEN it is delivered again THEN it is a duplicate, not a second job
    result = push(planned({"type": "a", "task_id": "before-upgrade"}), get_settings())
    assert (result.task_ids, result.duplicates) == (["before-upgrade"], 1)
    assert producer_env.jobs() == []
