"""The reference GPU service with the real model (all-MiniLM-L6-v2): its contract alone, then through gpuq.

One service process for the module (loading torch and the model takes seconds); a fresh dispatcher per test.
"""

from __future__ import annotations

import math
from datetime import datetime

import httpx
import pytest

from tests.dispatcher.harness import BEARER, push_jobs, reconcile, wait_final
from tests.dispatcher.helpers import wait_for
from tests.reference.conftest import HEARTBEAT_SECONDS
from tests.reference.receiver import Receiver

AUTH = {"Authorization": f"Bearer {BEARER}"}
PARAPHRASE = ("A man is playing the guitar.", "A man plays a guitar.")
UNRELATED = "The central bank raised interest rates again."
TEXT = "the quick brown fox jumps over the lazy dog while a gentle rain falls on the quiet town"

pytestmark = pytest.mark.slow  # loads the reference model (torch): up to 100 s on a loaded machine


def sentence(i: int, words: int = 12) -> str:
    vocabulary = TEXT.split(" ")
    return " ".join(vocabulary[(i + k) % len(vocabulary)] for k in range(words)) + f" {i}"


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def check_vectors(result: dict, n: int) -> list[list[float]]:
    assert result["model"] == "all-MiniLM-L6-v2"
    assert result["dim"] == 384
    vectors = result["embeddings"]
    assert len(vectors) == n
    for v in vectors:
        assert len(v) == 384
        assert math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, abs_tol=1e-4), "unit-normalised"
    return vectors


def job(task_id: str, texts: object, receiver: Receiver | None = None) -> dict:
    body = {"task_id": task_id, "type": "embed", "data": {"input": texts}, "attempt": 1}
    if receiver is not None:
        body |= {"callback_url": receiver.url, "callback_token": f"cb-{task_id}"}
    return body


@pytest.fixture
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


def test_bearer_token_is_required(service):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": BEARER}):
        # checked before the body: a caller without the token learns nothing about what a good body is
        r = httpx.post(service.url, json={"not": "a job"}, headers=headers)
        assert r.status_code == 401, (headers, r.text)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"type": "embed", "data": {"input": "x"}}, 422),  # no task_id
        ({"task_id": "t", "type": "embed", "data": "x"}, 422),  # data not an object
        ({"task_id": "t", "type": "embed", "data": {"input": "x"}, "callback_url": "http://h/cb"}, 422),
        (
            {
                "task_id": "t",
                "type": "embed",
                "data": {"input": "x"},
                "callback_url": "ftp://h",
                "callback_token": "k",
            },
            422,
        ),
        ({"task_id": "t", "type": "embed", "data": {}}, 400),  # no input
        ({"task_id": "t", "type": "embed", "data": {"input": ""}}, 400),
        ({"task_id": "t", "type": "embed", "data": {"input": []}}, 400),
        ({"task_id": "t", "type": "embed", "data": {"input": ["ok", 3]}}, 400),
        ({"task_id": "t", "type": "embed", "data": {"input": ["x"] * 257}}, 400),
        ({"task_id": "t", "type": "embed", "data": {"input": "x", "hold_seconds": 3600}}, 400),  # > max
        ({"task_id": "t", "type": "embed", "data": {"input": "x", "hold_seconds": "1"}}, 400),
    ],
)
def test_bad_bodies(service, body, status):
    r = httpx.post(service.url, json=body, headers=AUTH)
    assert r.status_code == status, r.text
    assert r.json()["detail"]


def test_synchronous_answer_without_callback_url(service):
    r = httpx.post(service.url, json=job("sync-1", [*PARAPHRASE, UNRELATED]), headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "finished"
    a, b, c = check_vectors(r.json()["result"], 3)
    assert cosine(a, b) > cosine(a, c) + 0.3


def test_callback_token_retries_on_5xx_not_on_4xx_and_heartbeats(service, receiver):
    # GIVEN a callback receiver that answers 503 then 200 for one task, 409 for another
    receiver.script["r-5xx"] = [503, 503]
    receiver.script["r-409"] = [409]
    # and a job that keeps its slot 2 s whatever the hardware: 8 heartbeat intervals
    long_texts = [sentence(i, 20) for i in range(4)]
    long_job = job("r-long", long_texts)
    long_job["data"]["hold_seconds"] = 8 * HEARTBEAT_SECONDS
    for body in (job("r-5xx", "hello"), job("r-409", "hello"), long_job):
        r = httpx.post(
            service.url,
            json=body | {"callback_url": receiver.url, "callback_token": f"cb-{body['task_id']}"},
            headers=AUTH,
        )
        assert r.status_code == 202, r.text
    # THEN the 5xx callback is delivered on its third try, with the task's own token each time
    wait_for(lambda: len(receiver.finals("r-5xx")) == 3, 20, what="three tries of the r-5xx callback")
    calls = receiver.finals("r-5xx")
    assert {c["auth"] for c in calls} == {"Bearer cb-r-5xx"}
    assert all(c["body"] == calls[0]["body"] for c in calls)
    assert calls[0]["body"]["status"] == "finished"
    check_vectors(calls[0]["body"]["result"], 1)
    # AND the long job calls back once after heartbeats all along
    wait_for(lambda: receiver.finals("r-long"), 60, what="the long job's callback")
    check_vectors(receiver.finals("r-long")[0]["body"]["result"], len(long_texts))
    # several beats: how many exactly depends on how promptly a loaded machine wakes the service up
    assert receiver.beats("r-long") >= 2, receiver.beats("r-long")
    # AND the 409 was the dispatcher's final word: asked once
    assert len(receiver.finals("r-409")) == 1
    assert receiver.finals("r-409")[0]["auth"] == "Bearer cb-r-409"


def test_fifth_concurrent_job_gets_429(service, receiver):
    # four jobs that keep their slots 3 s each (data.hold_seconds), however fast the model is
    texts = [sentence(i) for i in range(4)]
    ids = [f"slot-{i}" for i in range(4)]
    for task_id in ids:
        body = job(task_id, texts, receiver)
        body["data"]["hold_seconds"] = 3
        assert httpx.post(service.url, json=body, headers=AUTH).status_code == 202
    r = httpx.post(service.url, json=job("slot-5th", "hello", receiver), headers=AUTH)
    assert r.status_code == 429, r.text
    assert r.headers["Retry-After"]
    wait_for(lambda: all(receiver.finals(t) for t in ids), 60, what="the four jobs' callbacks")
    assert httpx.get(f"{service.base}/healthz").json()["busy"] == 0
    assert httpx.post(service.url, json=job("slot-5th", "hello", receiver), headers=AUTH).status_code == 202
    wait_for(lambda: receiver.finals("slot-5th"), 30, what="the fifth job's callback once a slot was free")


def test_embeddings_through_gpuq(stack, service):
    # GIVEN a dispatcher with the reference service as its only GPU, and leases far shorter than a long batch
    # (held 2.5 leases by the service, data.hold_seconds: on a fast machine the model alone may beat a lease).
    # 4 s, not 2: 2 s (a stall of 1.75 s) expired a single sentence's lease on a loaded machine (a retry, which
    # the test rightly counts as a failure)
    lease = 4.0
    d = stack.dispatcher(None, GPU_ENDPOINTS=f"g0={service.url}", TASK_TIMEOUT_SECONDS=str(lease))
    q = stack.queues[0]
    # WHEN embed jobs are queued: three single sentences, a batch of 32, and a long batch that outlives the lease
    # (heartbeats every 0.25 s: a lease of 4 s survives a stall of 3.75 s of either process)
    singles = [
        push_jobs(stack.rds, q, 1, task_type="embed", input=text)[0] for text in (*PARAPHRASE, UNRELATED)
    ]
    batch_texts = [PARAPHRASE[0]] + [sentence(i) for i in range(31)]
    [batch] = push_jobs(stack.rds, q, 1, task_type="embed", input=batch_texts)
    long_batch = [sentence(i, 50) for i in range(8)]
    [slow] = push_jobs(stack.rds, q, 1, task_type="embed", input=long_batch, hold_seconds=2.5 * lease)
    ids = [*singles, batch, slow]
    wait_final(stack.engine, ids, timeout=90, final=("finished", "failed"))
    tasks = {t: httpx.get(f"{d.url}/tasks/{t}").json() for t in ids}
    # THEN each ran once and came back as unit vectors of dimension 384
    summary = {t: (v["state"], v["attempts"], v["error"]) for t, v in tasks.items()}
    assert all(state == "finished" and attempts == 1 for state, attempts, _ in summary.values()), summary
    a, b, c = (check_vectors(tasks[t]["result"], 1)[0] for t in singles)
    # AND the paraphrase pair is far closer than the unrelated pair
    print(f"\ncosine: paraphrases {cosine(a, b):.3f}, unrelated {cosine(a, c):.3f} / {cosine(b, c):.3f}")
    assert cosine(a, b) > 0.7
    assert cosine(a, b) > cosine(a, c) + 0.3
    assert cosine(b, c) < cosine(a, b)
    # AND a sentence embeds the same alone and inside a padded batch
    assert cosine(check_vectors(tasks[batch]["result"], 32)[0], a) > 0.9999
    # AND heartbeats kept the long batch's attempt alive past its lease: one attempt, no lease expiry
    history = tasks[slow]["history"]
    assert [h["outcome"] for h in history] == ["finished"], history
    took = _seconds(tasks[slow]["started_at"], tasks[slow]["finished_at"])
    print(f"\nlong batch: {took:.1f} s against a {lease} s lease")
    assert took > lease, "the long batch must outlive its lease to prove the heartbeats"
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)


def _seconds(start: str, end: str) -> float:
    return (
        datetime.fromisoformat(end.rstrip("Z")) - datetime.fromisoformat(start.rstrip("Z"))
    ).total_seconds()


def test_cancel_stops_a_job_without_its_callback(service, receiver):
    # GIVEN a long job at work
    texts = [sentence(i, 200) for i in range(16)]
    assert httpx.post(service.url, json=job("to-cancel", texts, receiver), headers=AUTH).status_code == 202
    # WHEN the dispatcher cancels it
    stop = {"task_id": "to-cancel", "attempt": 1}
    r = httpx.post(f"{service.url}/cancel", json=stop, headers=AUTH, timeout=30)
    # THEN the answer comes once it no longer runs: its slot is free and no final callback was or will be sent
    assert r.status_code == 200, r.text
    assert r.json() == {"task_id": "to-cancel", "attempt": 1, "cancelled": True}
    assert httpx.get(f"{service.base}/healthz").json()["busy"] == 0
    assert receiver.finals("to-cancel") == []
    # AND a cancel for a job that is not running here is 200 cancelled false; without the token 401
    assert httpx.post(f"{service.url}/cancel", json=stop, headers=AUTH).json()["cancelled"] is False
    assert httpx.post(f"{service.url}/cancel", json=stop).status_code == 401
    # AND a later job runs and calls back as usual, and the cancelled one never does
    assert (
        httpx.post(service.url, json=job("after-cancel", "hello", receiver), headers=AUTH).status_code == 202
    )
    wait_for(lambda: receiver.finals("after-cancel"), 30, what="the next job's callback")
    assert receiver.finals("to-cancel") == []
