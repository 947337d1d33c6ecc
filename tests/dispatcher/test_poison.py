"""The poison corpus against two dispatchers (issue 11): jobs that crashed or froze every dispatcher (and did
so again after every restart), pushed raw as the seed's producers push, each with three good jobs behind it;
and the producer's share, refused at the door while the good tasks sent with them run. All good jobs finish,
every bad one is dead-lettered with its reason, no dispatcher exits."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from producer.handler import lambda_handler
from producer.job import MAX_JOB_BYTES, REWRITE_ALLOWANCE, Job
from producer.keys import Keys
from tests.dispatcher.harness import received_per_task, redis_leftovers, states, wait_final
from tests.dispatcher.helpers import wait_for
from tests.operators.conftest import gpuq, gpuq_env  # noqa: F401 - the fixtures, shared
from tests.producer.conftest import PRODUCER_VARS, reset_caches
from tests.producer.test_poison import POISON

T = "start_transcribe"


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _with_data(data: str) -> str:
    """A job whose data is written as given: JSON text no encoder would produce."""
    return '{"type": "' + T + '", "data": ' + data + "}"


# (name, the raw job as pushed, what its dead letter's reason must say)
RAW: list[tuple[str, str | bytes, str]] = [
    ("year 1 not_before", json.dumps({"type": T, "not_before": "0001-01-01T00:00:00+01:00"}), "not_before"),
    (
        "year 9999 not_before",
        json.dumps({"type": T, "not_before": "9999-12-31T23:59:59-01:00"}),
        "not_before",
    ),
    (
        "year 1 enqueued_at",
        json.dumps({"type": T, "enqueued_at": "0001-01-01T00:00:00+01:00"}),
        "enqueued_at",
    ),
    ("attempt past INT", json.dumps({"type": T, "attempt": 99999999999}), "attempt"),
    ("negative attempt", json.dumps({"type": T, "attempt": -1}), "attempt"),
    # JSON true is no number (Python's bool is an int): it was read as attempt 1
    ("attempt true", json.dumps({"type": T, "attempt": True}), "attempt: must be a number, not true"),
    ("attempt false", json.dumps({"type": T, "attempt": False}), "attempt: must be a number, not false"),
    ("priority true", json.dumps({"type": T, "priority": True}), "priority"),
    ("data 5,000 deep", _with_data('{"x": ' + _deep(5000) + "}"), "nested too deeply"),
    ("data 40 deep", _with_data('{"x": ' + _deep(40) + "}"), "nested deeper than 32"),
    ("surrogate, no id", _with_data('{"text": "\\ud800"}'), "UTF-8"),
    ("surrogate with an id", _with_data('{"task_id": "sur-1", "t": "\\ud800"}'), "UTF-8"),
    ("bytes not UTF-8", b'{"type": "start_transcribe", "data": {"text": "\xff\xfe"}}', "UTF-8"),
    ("20 MB", json.dumps({"type": T, "data": {"blob": "x" * 20_000_000}}), "MAX_JOB_BYTES"),
    ("65-bit integer", _with_data('{"n": 36893488147419103232}'), "64-bit"),
    ("NaN", _with_data('{"x": NaN}'), "not a JSON number"),
    ("id with a slash", json.dumps({"type": T, "task_id": "a/b"}), "task_id"),
    ("id with a bidi override", json.dumps({"type": T, "task_id": "x\u202ey"}), "U+202E"),
    ("zero-width id in data", json.dumps({"type": T, "data": {"task_id": "a\u200bb"}}), "U+200B"),
    ("id of 300 characters", json.dumps({"type": T, "task_id": "x" * 300}), "task_id"),
    ("id an object", json.dumps({"type": T, "task_id": {"a": 1}}), "task_id"),
    # A "retry" (attempt > 0) of a task no dispatcher recorded is a new task: today's id rules apply
    (
        "retry of an unknown task, id with a slash",
        json.dumps({"type": T, "task_id": "r/1", "attempt": 1}),
        "of a task never recorded",
    ),
    (
        "retry of an unknown task, id with %2F",
        json.dumps({"type": T, "task_id": "r%2Fevents", "attempt": 2}),
        "'%'",
    ),
    (
        "retry of an unknown task, bidi id",
        json.dumps({"type": T, "task_id": "r\u202ez", "attempt": 1}),
        "U+202E",
    ),
    # Within MAX_JOB_BYTES + its rewrite allowance as pushed, but not as a dispatcher writes it back (the
    # id and enqueue time it adds, numbers written out): its first retry was refused, its task left queued
    (
        "job at the allowance, no id",
        _with_data(
            '{"blob": "' + "x" * (MAX_JOB_BYTES + REWRITE_ALLOWANCE - len(_with_data('{"blob": ""}'))) + '"}'
        ),
        "as a dispatcher stores it",
    ),
    (
        "short floats grown",
        _with_data('{"v": [' + ",".join(["1e15"] * 50_000) + "]}"),
        "as a dispatcher stores",
    ),
    ("no type", json.dumps({"data": {}}), "type"),
    ("unknown priority", json.dumps({"type": T, "priority": "urgent"}), "priority"),
    ("data a list", json.dumps({"type": T, "data": [1]}), "data"),
    ("an array", "[1, 2]", "JSON object"),
    ("null", "null", "JSON object"),
    ("not JSON", "{", "not JSON"),
]


def _good(queue: str, n: int = 3) -> list[Job]:
    return [
        Job(task_id=f"good-{uuid.uuid4().hex[:10]}", type=T, queue=queue, data={"ok": True}) for _ in range(n)
    ]


@pytest.fixture
def producer_on(stack, monkeypatch):
    """The producer (lambda_handler) pushing into this stack's Redis, prefix and queues."""
    for name in PRODUCER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REDIS_URL", stack.redis_url)
    monkeypatch.setenv("REDIS_KEY_PREFIX", stack.prefix)
    monkeypatch.setenv("TASK_QUEUES", ",".join(stack.queues))
    monkeypatch.setenv("POWERTOOLS_LOG_LEVEL", "WARNING")
    reset_caches()
    yield lambda_handler
    reset_caches()


def _api(handler: Any, body: Any) -> dict[str, Any]:
    event = {
        "version": "2.0",
        "routeKey": "POST /tasks",
        "rawPath": "/tasks",
        "requestContext": {"http": {"method": "POST"}, "requestId": uuid.uuid4().hex},
        "body": json.dumps(body),
        "isBase64Encoded": False,
    }
    answer: dict[str, Any] = handler(event, None)
    return answer


@pytest.mark.slow  # the whole poison corpus through two dispatchers
def test_poison_corpus_against_two_dispatchers(stack, producer_on):
    q = stack.queues[0]
    keys = Keys(stack.prefix)
    fleet = stack.fleet(gpus=2, service_time="0")
    # GIVEN every raw poison job, each followed by three good jobs, in the seed's way (RPUSH)
    good: list[str] = []
    for _, raw, _ in RAW:
        stack.rds.rpush(q, raw)
        jobs = _good(q)
        stack.rds.rpush(q, *[j.to_redis() for j in jobs])
        good += [j.task_id for j in jobs]
    # AND every poison task sent through the producer (API Gateway), each followed by a good one
    for name, task, reason in POISON:
        refused = _api(producer_on, task)
        assert refused["statusCode"] == 400, (name, refused)
        assert reason in json.loads(refused["body"])["error"], name
        accepted = _api(producer_on, {"type": T, "data": {"after": name}})
        assert accepted["statusCode"] == 202, accepted
        good += json.loads(accepted["body"])["task_ids"]
    # WHEN two dispatchers serve the queue
    d1 = stack.dispatcher(fleet, name="d1")
    d2 = stack.dispatcher(fleet, name="d2")
    # THEN every good job finishes, once
    wait_final(stack.engine, good, timeout=90)
    assert max(received_per_task(fleet.stats()).values()) == 1
    # AND every bad one is in the dead-letter list with its reason, in its queue
    wait_for(lambda: stack.rds.llen(keys.dead) == len(RAW), 30, what="every bad job dead-lettered")
    dead = [json.loads(x) for x in stack.rds.lrange(keys.dead, 0, -1)]
    reasons = sorted(d["reason"] for d in dead)
    for name, _, expected in RAW:
        assert any(expected in r for r in reasons), f"{name}: no dead letter says {expected!r}: {reasons}"
    assert all(d["queue"] == q for d in dead)
    assert not any("Error:" in r for r in reasons), reasons  # each one foreseen, none a crash caught late
    # AND both dispatchers still run, nothing is left behind, no slot is held
    for d in (d1, d2):
        assert d.alive(), d.logs()
        assert httpx.get(f"{d.url}/healthz", timeout=5).status_code == 200
    assert redis_leftovers(stack.rds, stack.prefix, stack.queues) == {}
    wait_for(lambda: states(stack.engine)["processing"] == 0, 10, what="no task processing")
    with stack.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM slots WHERE task_id IS NOT NULL").scalar_one() == 0
    metrics = httpx.get(f"{d1.url}/metrics", timeout=5).text
    assert f"gpuq_dead_letter_jobs {float(len(RAW))}" in metrics


@pytest.mark.slow
def test_a_poison_job_does_not_come_back_after_a_restart(stack):
    # GIVEN the job that killed every dispatcher at once, and again at each restart, with good jobs behind it
    q = stack.queues[0]
    fleet = stack.fleet(gpus=1, service_time="0")
    stack.rds.rpush(q, json.dumps({"type": T, "not_before": "0001-01-01T00:00:00+01:00"}))
    jobs = _good(q, 5)
    stack.rds.rpush(q, *[j.to_redis() for j in jobs])
    d = stack.process(fleet)
    wait_final(stack.engine, [j.task_id for j in jobs], timeout=30)
    # WHEN the dispatcher restarts
    assert d.term() == 0
    d.start()
    # THEN it stays up, and the job stays dead-lettered (it is not handed back to its queue)
    assert stack.rds.llen(Keys(stack.prefix).dead) == 1
    assert stack.rds.llen(q) == 0
    assert d.proc is not None and d.proc.poll() is None


def test_a_reused_task_id_is_dead_lettered_not_dropped(stack, producer_on, gpuq):  # noqa: F811
    # GIVEN task "invoice-7" sent through the producer and finished
    q = stack.queues[0]
    keys = Keys(stack.prefix)
    fleet = stack.fleet(gpus=1, service_time="0")
    d = stack.dispatcher(fleet)
    assert producer_on({"type": T, "task_id": "invoice-7", "data": {"v": 1}}, None) == {
        "task_ids": ["invoice-7"]
    }
    wait_final(stack.engine, ["invoice-7"])
    # AND the very job recorded comes back (as a copy swept from a dead dispatcher would): dropped quietly
    with stack.engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT data, enqueued_at FROM tasks WHERE task_id = 'invoice-7'").one()
    copy = Job(task_id="invoice-7", type=T, queue=q, data=json.loads(row.data), enqueued_at=row.enqueued_at)
    stack.rds.rpush(q, copy.to_redis())
    wait_for(lambda: not redis_leftovers(stack.rds, stack.prefix, stack.queues), 20, what="the copy taken")
    assert stack.rds.llen(keys.dead) == 0
    # WHEN its idempotency mark has expired and a new task comes with the same id and other data
    stack.rds.delete(keys.idem(q, "task:invoice-7"))
    assert producer_on({"type": T, "task_id": "invoice-7", "data": {"v": 2}}, None) == {
        "task_ids": ["invoice-7"]
    }
    # THEN the new job is dead-lettered with the reason, the task keeps its data and ran once
    wait_for(lambda: stack.rds.llen(keys.dead) == 1, 20, what="the reused id dead-lettered")
    entry = json.loads(stack.rds.lindex(keys.dead, 0))
    assert entry["reason"] == "task id already used: task invoice-7 exists (finished)"
    assert json.loads(entry["raw"])["data"] == {"v": 2}
    assert received_per_task(fleet.stats())["invoice-7"] == 1
    assert "gpuq_task_ids_reused_total 1.0" in httpx.get(f"{d.url}/metrics", timeout=5).text
    listed = gpuq("queue", "list", "--dead", DATABASE_URL=stack.database_url, REDIS_URL=stack.redis_url,
                  REDIS_KEY_PREFIX=stack.prefix, TASK_QUEUES=",".join(stack.queues))  # fmt: skip
    assert listed.exit_code == 0, listed
    assert "task id already used: task invoice-7 exists (finished)" in listed.stdout
