"""A dispatcher started on a Redis that still holds the key layout before issue 15 moves what it finds there."""

from __future__ import annotations

from producer.job import Job
from producer.keys import Keys, Legacy, Priority, queue_key
from tests.dispatcher.harness import received_per_task, reconcile, wait_final, wait_swept
from tests.dispatcher.helpers import wait_for


def test_jobs_under_the_old_key_layout_are_moved_and_run_once(stack):
    # GIVEN what an older gpuq left in Redis: high and low lists named <queue>:high / <queue>:low, the
    # processing list of a dispatcher that died (one list for all queues, its heartbeat gone) and a parked list
    q, other = stack.queues
    old = Legacy(stack.prefix)

    def job(task_id: str, queue: str = q, priority: Priority = Priority.NORMAL) -> str:
        return Job(task_id=task_id, type="start_transcribe", queue=queue, priority=priority).to_redis()

    stack.rds.rpush(old.queue_key(q, Priority.HIGH), job("high-1", priority=Priority.HIGH))
    stack.rds.rpush(old.queue_key(q, Priority.HIGH), job("high-2", priority=Priority.HIGH))
    stack.rds.rpush(old.queue_key(other, Priority.LOW), job("low-1", other, Priority.LOW))
    stack.rds.rpush(old.proc("old-dispatcher"), f"{q}\n{job('taken-1')}")
    stack.rds.rpush(
        old.proc("old-dispatcher"),
        f"{old.queue_key(q, Priority.LOW)}\n{job('taken-2', priority=Priority.LOW)}",
    )
    stack.rds.sadd(Keys(stack.prefix).dispatchers, "old-dispatcher")
    stack.rds.rpush(old.parked("default"), job("parked-1", other))
    ids = ["high-1", "high-2", "low-1", "taken-1", "taken-2", "parked-1"]
    # WHEN a dispatcher of today starts
    fleet = stack.fleet(gpus=1, service_time="0")
    stack.dispatcher(fleet)
    # THEN every job runs exactly once and nothing is left under the old names
    wait_final(stack.engine, ids, timeout=60)
    assert received_per_task(fleet.stats()) == dict.fromkeys(ids, 1)
    leftovers = [
        old.queue_key(q, Priority.HIGH),
        old.queue_key(q, Priority.LOW),
        old.queue_key(other, Priority.LOW),
        old.proc("old-dispatcher"),
        old.parked("default"),
    ]
    wait_for(lambda: not any(stack.rds.exists(k) for k in leftovers), 20, what="old keys emptied")
    assert queue_key(q, Priority.HIGH) != old.queue_key(q, Priority.HIGH)
    assert not stack.rds.sismember(Keys(stack.prefix).dispatchers, "old-dispatcher")
    wait_swept(stack.rds, stack.prefix, stack.queues)
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)
