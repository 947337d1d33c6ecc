"""End to end on a real Redis Cluster (3 masters + 3 replicas on loopback, ``tests/redis_cluster.py``):
producer (``REDIS_CLUSTER=true``) -> queues in several slots -> dispatcher processes -> simulated GPUs.

The scenarios of the plain-Redis suite that a cluster changes: a backlog over two queues (two slots), kill -9 of
a dispatcher mid-run, and a master killed under acknowledged pushes (``REDIS_WAIT_REPLICAS``): its replica
takes over and every acknowledged job still finishes exactly once.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop
from redis.exceptions import RedisClusterException, RedisError

from dispatcher.queues.intake import Intake, Settlement
from dispatcher.queues.task_events import EventPublisher
from producer import connect, enqueue
from producer.connect import async_client, initialized
from producer.errors import QueueUnavailable
from producer.events import plan, split_payload
from producer.handler import lambda_handler
from producer.keys import Keys
from producer.settings import get_settings
from tests.dispatcher.conftest import Stack
from tests.dispatcher.harness import push_jobs, received_per_task, reconcile, states, wait_final, wait_swept
from tests.dispatcher.helpers import wait_for
from tests.producer.helpers import load_event
from tests.redis_cluster import Cluster

pytestmark = pytest.mark.slow


@pytest.fixture
def producer(cluster_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The Lambda handler configured for the cluster; ``set`` changes its environment."""

    def configure(**env: str) -> None:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        enqueue.close_clients()

    configure(
        REDIS_URL=cluster_stack.redis_url,
        REDIS_CLUSTER="true",
        REDIS_KEY_PREFIX=cluster_stack.prefix,
        TASK_QUEUES=",".join(cluster_stack.queues),
        TASK_ROUTES="",
        REDIS_WAIT_REPLICAS="0",
    )
    yield configure
    get_settings.cache_clear()
    enqueue.close_clients()


def _batch(stack: Stack, start: int, n: int) -> dict[str, Any]:
    """``n`` tasks alternating over both queues (two cluster slots), every fifth one high priority."""
    tasks = []
    for i in range(start, start + n):
        task: dict[str, Any] = {"type": "start_transcribe", "task_id": f"c-{i}", "data": {"i": i}}
        task["queue"] = stack.queues[i % 2]
        if i % 5 == 0:
            task["priority"] = "high"
        tasks.append(task)
    return {"tasks": tasks}


def test_a_backlog_over_two_slots_runs_once_each(cluster_stack: Stack, producer: Any) -> None:
    # GIVEN 300 jobs pushed through the Lambda handler over two queues in two slots, some high priority,
    # and 100 pushed the seed's way (RPUSH onto the queue's plain name)
    s = cluster_stack
    ids: list[str] = []
    for start in range(0, 300, 50):
        answer = lambda_handler(_batch(s, start, 50), None)
        ids += answer["task_ids"]
    ids += push_jobs(s.rds, s.queues[1], 100)
    # AND a redelivery of the first batch is recognised in both slots
    assert lambda_handler(_batch(s, 0, 50), None)["task_ids"] == ids[:50]
    fleet = s.fleet(gpus=3, service_time="exp:0.01")
    # WHEN two dispatchers run them
    s.process(fleet, name="a")
    s.process(fleet, name="b")
    wait_final(s.engine, ids, timeout=180)
    # THEN each ran exactly once, no GPU was oversubscribed, nothing is left in any slot
    stats = fleet.stats()
    assert stats["totals"]["oversubscriptions"] == 0
    assert max(received_per_task(stats).values()) == 1
    assert set(received_per_task(stats)) == set(ids)
    reconcile(s.engine, s.rds, s.prefix, s.queues, ids)


def test_kill_9_of_a_dispatcher_mid_run_loses_nothing(cluster_stack: Stack) -> None:
    # GIVEN 400 jobs of 30 ms on 2 GPUs and a dispatcher that is killed mid-run
    s = cluster_stack
    fleet = s.fleet(gpus=2, service_time="fixed:0.03")
    ids = push_jobs(s.rds, s.queues[0], 200) + push_jobs(s.rds, s.queues[1], 200)
    d = s.process(fleet, name="doomed", TASK_TIMEOUT_SECONDS="5")
    wait_for(lambda: states(s.engine, ids)["finished"] > 40, 60, 0.02, what="some finished")
    d.kill()
    # WHEN another dispatcher takes over
    s.process(fleet, name="heir", TASK_TIMEOUT_SECONDS="5")
    # THEN every job finishes, none twice beyond those in flight at the kill, and the dead one's
    # processing lists (one per queue, in two slots) are swept back
    wait_final(s.engine, ids, timeout=180)
    wait_swept(s.rds, s.prefix, s.queues, timeout=60)
    assert fleet.stats()["totals"]["oversubscriptions"] == 0
    reconcile(s.engine, s.rds, s.prefix, s.queues, ids)


def test_a_delivery_without_enough_replicas_is_refused_and_its_retry_is_safe(
    cluster_stack: Stack, producer: Any
) -> None:
    # GIVEN a producer that wants 3 replicas per write, where each master has one
    s = cluster_stack
    producer(REDIS_WAIT_REPLICAS="3", REDIS_WAIT_TIMEOUT_SECONDS="0.2")
    batch = _batch(s, 0, 4)
    # WHEN it pushes a batch over two queues THEN it says it could not enqueue durably
    with pytest.raises(QueueUnavailable) as err:
        enqueue.push(plan(split_payload(batch, what="event"), get_settings()), get_settings())
    assert "replicas" in err.value.detail
    # AND the API answer is a 503 (the caller retries)
    api = load_event("apigw_v1_single")
    assert lambda_handler(api, None)["statusCode"] == 503
    # WHEN the retry comes with enough replicas THEN the jobs already written are not written twice
    producer(REDIS_WAIT_REPLICAS="1", REDIS_WAIT_TIMEOUT_SECONDS="5")
    assert lambda_handler(batch, None)["task_ids"] == [f"c-{i}" for i in range(4)]
    queued = [s.rds.llen(q) for q in s.queues] + [s.rds.llen(f"{{{q}}}:high") for q in s.queues]
    assert sum(queued) == 4 + 1  # the batch once, and the API's job (written, though not acknowledged)


def test_a_master_killed_after_acknowledged_pushes_loses_none(
    cluster_stack: Stack, producer: Any, redis_cluster: Cluster
) -> None:
    # GIVEN a dispatcher at work and a producer that acknowledges a push once a replica holds it
    s = cluster_stack
    producer(REDIS_WAIT_REPLICAS="1", REDIS_WAIT_TIMEOUT_SECONDS="5")
    fleet = s.fleet(gpus=2, service_time="fixed:0.05")
    s.process(fleet, name="a", REDIS_WAIT_REPLICAS="1", TASK_TIMEOUT_SECONDS="10")
    acknowledged: list[str] = []
    for start in range(0, 200, 20):
        acknowledged += lambda_handler(_batch(s, start, 20), None)["task_ids"]
    # WHEN the master of the first queue's slot is killed right after the last acknowledged push
    victim = redis_cluster.master_of(s.queues[0])
    victim.kill()
    try:
        # THEN its replica takes over, and pushes work again (retried until the failover is done)
        redis_cluster.wait_ok(timeout=60)
        deadline = time.monotonic() + 60
        while "task_ids" not in (answer := lambda_handler(_batch(s, 200, 20), None)):
            assert time.monotonic() < deadline, answer  # a direct call answers {"error": ...} meanwhile
            time.sleep(0.5)
        acknowledged += answer["task_ids"]
        # AND every acknowledged job finishes exactly once
        wait_final(s.engine, acknowledged, timeout=240)
        assert max(received_per_task(fleet.stats()).values()) == 1
        assert set(acknowledged) <= set(received_per_task(fleet.stats()))
        wait_swept(s.rds, s.prefix, s.queues, timeout=60)
        reconcile(s.engine, s.rds, s.prefix, s.queues, acknowledged)
        assert s.rds.llen(Keys(s.prefix).dead) == 0
    finally:
        # the killed node comes back as a replica: the rest of the session has its 3 + 3 again
        victim.start()
        redis_cluster.wait_ok(timeout=60)
        redis_cluster.wait_replicated(timeout=60)


def test_a_wake_up_published_on_one_node_reaches_a_subscriber_on_another(redis_cluster: Cluster) -> None:
    """Dispatchers wake each other with plain PUBLISH; on a cluster a message published on any node is
    forwarded to every node's subscribers, so the channel's slot (or the node a client picked) never
    matters. (Without it the idle poll would still find the jobs, only later.)"""
    first, second = redis_cluster.nodes[0], redis_cluster.nodes[1]
    with first.client() as sub_client, second.client() as pub_client:
        sub = sub_client.pubsub(ignore_subscribe_messages=True)
        sub.subscribe("gpuq-test:wake")
        sub.get_message(timeout=1)
        deadline = time.monotonic() + 10
        message = None
        while message is None and time.monotonic() < deadline:
            pub_client.publish("gpuq-test:wake", "job")
            message = sub.get_message(timeout=1)
        sub.close()
    assert message is not None and message["data"] == b"job"


def test_task_events_reach_a_subscriber_on_a_cluster(redis_cluster: Cluster) -> None:
    """Task events go out in batches; a cluster's pipeline refuses PUBLISH, and every event was lost that way
    (seen in a kill -9 run's log: "Task exception was never retrieved"). Channels over many slots, a listener
    on one node: each event arrives once."""
    keys = Keys("gpuq-test-events:")
    task_ids = [f"ev-{i}" for i in range(60)]
    with redis_cluster.nodes[1].client() as sub_client:
        sub = sub_client.pubsub(ignore_subscribe_messages=True)
        sub.subscribe(*(keys.task_events(t) for t in task_ids))
        for _ in task_ids:  # the subscriptions confirmed
            sub.get_message(timeout=1)

        async def publish_all() -> None:
            client = await initialized(async_client(redis_cluster.url, cluster=True))
            work: list[asyncio.Task[None]] = []
            events = EventPublisher(client, keys, lambda coro: work.append(asyncio.ensure_future(coro)))
            for t in task_ids:
                events.publish("dispatched", t, attempt=1)
            for t in task_ids:  # in the same batch: each task's events must arrive in their order
                events.publish("finished", t, attempt=1)
            while work:
                await work.pop()
            await client.aclose()

        asyncio.run(publish_all())
        got: dict[str, list[str]] = {}
        deadline = time.monotonic() + 10
        while sum(map(len, got.values())) < 2 * len(task_ids) and time.monotonic() < deadline:
            message = sub.get_message(timeout=1)
            if message is not None:
                ev = json.loads(message["data"])
                got.setdefault(ev["task_id"], []).append(ev["event"])
        sub.close()
    assert got == {t: ["dispatched", "finished"] for t in task_ids}


def test_one_tasks_long_chain_of_events_does_not_hold_back_the_other_tasks_on_a_cluster(
    redis_cluster: Cluster,
) -> None:
    """On a cluster each task's events go one after another, a few tasks at a time. In groups of 32 every task
    of the next group waited for the longest chain before it: a GPU posting partials of one task over several
    connections held back every other task's events for as long (a review). Now a chain holds one worker:
    40 tasks with one event each, queued behind a task with 300, all arrive before that task's last one."""
    keys = Keys("gpuq-test-events-chain:")
    flood, others = "chain-flood", [f"chain-{i}" for i in range(40)]
    with redis_cluster.nodes[1].client() as sub_client:
        sub = sub_client.pubsub(ignore_subscribe_messages=True)
        sub.subscribe(*(keys.task_events(t) for t in [flood, *others]))
        for _ in range(1 + len(others)):  # the subscriptions confirmed
            sub.get_message(timeout=1)

        async def publish_all() -> None:
            client = await initialized(async_client(redis_cluster.url, cluster=True))
            work: list[asyncio.Task[None]] = []
            events = EventPublisher(client, keys, lambda coro: work.append(asyncio.ensure_future(coro)))
            for n in range(300):
                events.publish("partial", flood, n=n)
            for t in others:  # one batch with the flood's (500 events at most)
                events.publish("finished", t, attempt=1)
            while work:
                await work.pop()
            await client.aclose()

        asyncio.run(publish_all())
        order: list[tuple[str, Any]] = []
        deadline = time.monotonic() + 10
        while len(order) < 300 + len(others) and time.monotonic() < deadline:
            message = sub.get_message(timeout=1)
            if message is not None:
                ev = json.loads(message["data"])
                order.append((ev["task_id"], ev.get("n")))
        sub.close()
    assert [n for t, n in order if t == flood] == list(range(300))  # the chain itself in its order
    last_of_flood = order.index((flood, 299))
    late = [t for t, _ in order[last_of_flood:] if t != flood]
    assert sorted(t for t, _ in order if t != flood) == sorted(others)
    assert late == []


def test_a_cluster_clients_write_on_a_transport_closed_under_it_is_a_lost_connection(
    redis_cluster: Cluster,
) -> None:
    """A master killed between a connect and its first command made uvloop raise RuntimeError on the write,
    which passed every ``except RedisError`` and stopped the dispatcher (CI of 550edbe, the failover test
    above). The cluster client takes no connection class: ``async_client`` sets it on every node."""

    async def scenario() -> None:
        client: Any = await initialized(async_client(redis_cluster.url, cluster=True, socket_timeout=5))
        assert {type(n).__name__ for n in client.get_nodes()} == {"ClusterNode"}
        assert {n.connection_class for n in client.get_nodes()} == {connect.Connection}
        keys = [f"gpuq-test:closed:{i}" for i in range(16)]  # over every master
        for key in keys:
            await client.set(key, "1")
        for node in client.get_nodes():
            for conn in node._free:
                conn._writer.transport.abort()
        await asyncio.sleep(0.01)
        for key in keys:
            try:
                value = await client.get(key)
            except (RedisError, RedisClusterException):  # a lost connection may surface once; nothing else
                value = await client.get(key)
            assert value == b"1"
        for key in keys:
            await client.delete(key)
        await client.aclose()

    uvloop.run(scenario())


def test_a_settlement_during_a_cluster_reinitialization_never_blocks_the_loop(
    redis_cluster: Cluster, key_prefix: str
) -> None:
    """The hang of the failover test above (CI of 24d7d42, then 1 run in 5 of this file; found with the
    SIGUSR1 dump): a settlement was a MULTI/EXEC pipeline, and redis-py's asyncio cluster client queues each
    command of one by running it in a new thread on an event loop of its own, joined from the caller's
    loop. After a failover that command re-initialized the client there, waiting for the client's lock held by
    a re-initialization of the caller's loop, which the join blocked: loop, leases and heartbeat stopped for
    good. Here a re-initialization is in flight (the lock held) while a settlement runs: the settlement must
    wait for it on the loop, and the loop keep turning."""
    q = f"settle-{key_prefix}"

    async def scenario() -> list[Any]:
        client: Any = await initialized(async_client(redis_cluster.url, cluster=True, socket_timeout=5))
        keys = Keys(key_prefix)
        intake = Intake(client, keys, "d1", [q])
        proc = intake.procs[q]
        a, b = f"{q}\n" + '{"task_id": "a"}', f"{q}\n" + '{"task_id": "b"}'
        await client.rpush(proc, a, b)
        client._initialize = True  # as after a lost connection (a failover)
        if client._lock is None:
            client._lock = asyncio.Lock()
        ticks = 0

        async def ticking() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(ticking())
        async with client._lock:  # a re-initialization in flight on this loop
            settling = asyncio.create_task(
                intake.settle(Settlement(ack=[a], back=[(b, '{"task_id": "b"}', None)]))
            )
            before = ticks
            await asyncio.sleep(0.3)
            assert ticks > before + 5, "the loop stopped turning while a settlement waited"
            assert not settling.done()
        await asyncio.wait_for(settling, 10)
        ticker.cancel()
        out = [await client.lrange(proc, 0, -1), await client.lrange(q, 0, -1)]
        for key in (proc, q):
            await client.delete(key)
        await client.aclose()
        return out

    result: list[Any] = []
    # in a thread of its own: a loop blocked for good must fail this test, not hang the suite
    runner = threading.Thread(target=lambda: result.append(uvloop.run(scenario())), daemon=True)
    runner.start()
    runner.join(60)
    assert not runner.is_alive(), "the settlement blocked the event loop (a thread joined from it?)"
    proc_left, queue_now = result[0]
    assert proc_left == []  # "a" acknowledged, "b" handed back
    assert queue_now == [b'{"task_id": "b"}']
