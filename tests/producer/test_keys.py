"""The key layout's promise (producer/keys.py, SPEC §10): every key of a queue hashes to the Redis Cluster slot
of the queue's own list, for any queue name the settings accept; names for which it cannot hold are refused."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from dispatcher.settings import DispatcherSettings
from producer.errors import ConfigError
from producer.keys import Keys, Priority, queue_key, scope_problem
from producer.settings import ProducerSettings, load
from tests.conftest import scaled

_NAMES = st.text(alphabet="abcXYZ019_.:-{}", min_size=1, max_size=12)


def _slot(key: str) -> int:
    return int(key_slot(key.encode()))


@settings(max_examples=scaled(300))
@given(_NAMES)
@example("task_queue_1")
@example("{jobs}emails")
@example("a{b")
@example("{{a}")
@example("x{}y{z}")
def test_every_key_of_an_accepted_queue_is_in_its_slot(queue: str) -> None:
    if scope_problem(queue) is not None:
        return  # refused at start (see below)
    keys = Keys("gpuq:")
    slot = _slot(queue)
    names = [queue_key(queue, p) for p in Priority]
    names += [keys.idem(queue, "task:t1"), keys.proc(queue, "d-1"), keys.parked(queue, "embed")]
    names.append(keys.fence(queue))
    assert {_slot(name) for name in names} == {slot}, names


@pytest.mark.parametrize("queue", ["a}b", "{}x", "q}"])
def test_a_queue_name_whose_keys_cannot_share_its_slot_is_refused(queue: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(ProducerSettings, task_queues=f"ok,{queue}")
    assert err.value.message.startswith("TASK_QUEUES:")
    assert "braces" in err.value.message


def test_two_queues_sharing_their_keys_are_refused() -> None:
    with pytest.raises(ConfigError) as err:
        load(ProducerSettings, task_queues="q,{q}")
    assert "share their keys" in err.value.message


@pytest.mark.parametrize("queues", ["a,a", "a, b ,a", "{q},{q}"])
@pytest.mark.parametrize("kind", [ProducerSettings, DispatcherSettings])
def test_a_queue_listed_twice_is_said_so(queues: str, kind: type[ProducerSettings]) -> None:
    # An outside trial: TASK_QUEUES=a,a was refused as two names that "share their keys (like q and {q})"
    with pytest.raises(ConfigError) as err:
        load(kind, task_queues=queues, callback_secret="0123456789abcdef")
    assert "is listed twice" in err.value.message and "share their keys" not in err.value.message
    assert err.value.message.startswith("TASK_QUEUES:")


def test_a_cluster_refuses_a_key_prefix_with_a_hash_tag_and_one_redis_keeps_it() -> None:
    assert load(ProducerSettings, redis_key_prefix="{gpuq}:").redis_key_prefix == "{gpuq}:"
    with pytest.raises(ConfigError) as err:
        load(ProducerSettings, redis_key_prefix="{gpuq}:", redis_cluster=True)
    assert err.value.message.startswith("REDIS_CLUSTER:")


@pytest.mark.parametrize("where", [{"redis_url": "redis://127.0.0.1:7000/3"}, {"redis_db": 2}])
def test_a_cluster_refuses_a_database_other_than_0(where: dict[str, object]) -> None:
    # A cluster has database 0 only: redis-py refused it at the first connection, and the dispatcher said
    # "Redis unreachable" (the producer: 503 on every push) instead of naming the setting.
    assert load(ProducerSettings, **where).redis_cluster is False
    with pytest.raises(ConfigError) as err:
        load(ProducerSettings, **where, redis_cluster=True)
    assert err.value.message.startswith("REDIS_CLUSTER:") and "database 0" in err.value.message
    assert load(ProducerSettings, redis_url="redis://h:7000/0", redis_cluster=True).redis_cluster


@pytest.mark.parametrize("names", ["a,{a}:high", "{a}:low,a", "{j}x,{j}x:high"])
def test_a_queue_named_like_another_queues_priority_list_is_refused(names: str) -> None:
    # queue a's high-priority list is {a}:high: a queue of that name would share it, each taking the other's jobs
    with pytest.raises(ConfigError) as err:
        load(ProducerSettings, task_queues=names)
    assert err.value.message.startswith("TASK_QUEUES:") and "list" in err.value.message
    assert load(ProducerSettings, task_queues="a,a:high,{a}x").queues == ["a", "a:high", "{a}x"]
