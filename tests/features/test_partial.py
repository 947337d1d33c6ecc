"""Partial output (SPEC §4): a ``running`` callback may carry ``"partial"``; subscribers of
``GET /tasks/{id}/events`` get each as a ``partial`` event, in order; it is not stored; a partial over
``PARTIAL_MAX_BYTES`` is refused with 413."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from dispatcher.gpus.tokens import make_token
from tests.dispatcher.conftest import Stack
from tests.dispatcher.harness import SECRET, push_jobs, states
from tests.dispatcher.helpers import wait_for
from tests.features.test_events import read_events


def _running_task(stack: Stack, queue: str) -> tuple[str, str]:
    """One job pushed to ``queue`` and running (its GPU never calls back: the test does): its id and the
    callback token of its first attempt."""
    [task_id] = push_jobs(stack.rds, queue, 1)
    wait_for(lambda: states(stack.engine, [task_id])["processing"] == 1, 20, 0.02, what="running")
    return task_id, make_token(SECRET.encode(), task_id, 1)


def _watch(url: str, task_id: str, gpu: Callable[[], None]) -> list[tuple[str, dict[str, Any]]]:
    """The task's event stream through the dispatcher at ``url``, read to its end; ``gpu`` (the callbacks
    the test sends) runs once the first ``state`` event shows the subscription is live."""
    seen: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream("GET", f"{url}/tasks/{task_id}/events", timeout=30) as res:
        assert res.status_code == 200
        for name, data in read_events(res):
            seen.append((name, data))
            if len(seen) == 1 and name == "state":
                gpu()
    return seen


@pytest.mark.slow  # 12 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_sse_client_receives_every_partial_in_order(stack: Stack) -> None:
    # GIVEN a task running on a GPU that streams its output through running callbacks
    fleet = stack.fleet(gpus=1, slots=1, service_time="fixed:60", faults=["lost_callback"])
    d = stack.dispatcher(fleet, PARTIAL_MAX_BYTES="1000")
    task_id, token = _running_task(stack, stack.queues[0])

    def callback(**body: Any) -> httpx.Response:
        return d.post_callback({"task_id": task_id, **body}, token)

    def gpu() -> None:
        # WHEN the GPU sends 30 partials, one of them too large, then finishes
        for i in range(30):
            if i == 7:
                big = callback(status="running", partial={"i": i, "text": "x" * 2000})
                assert big.status_code == 413 and "PARTIAL_MAX_BYTES" in big.text
                continue
            beat = callback(status="running", partial={"i": i, "tokens": ["tok"] * i})
            assert beat.status_code == 200, beat.text
        assert callback(status="finished", result={"text": "done"}).status_code == 200

    seen = _watch(d.url, task_id, gpu)
    # THEN the subscriber got every partial that was accepted, in order, before the end of the task
    names = [n for n, _ in seen]
    partials = [data for name, data in seen if name == "partial"]
    assert [p["partial"]["i"] for p in partials] == [i for i in range(30) if i != 7]
    assert all(p["partial"]["tokens"] == ["tok"] * p["partial"]["i"] for p in partials)
    assert all(p["attempt"] == 1 for p in partials)
    assert names[0] == "state" and names[-1] == "finished"
    assert names.index("finished") > max(i for i, n in enumerate(names) if n == "partial")
    # and nothing of them was stored: the task shows its result only
    task = httpx.get(f"{d.url}/tasks/{task_id}", timeout=10).json()
    assert "partial" not in str(task)
    assert task["result"] == {"text": "done"}


def test_partial_for_an_attempt_no_longer_current_is_409_and_not_passed_on(stack: Stack) -> None:
    fleet = stack.fleet(gpus=1, slots=1, service_time="0")
    d = stack.dispatcher(fleet)
    [task_id] = push_jobs(stack.rds, stack.queues[0], 1)
    wait_for(lambda: states(stack.engine, [task_id])["finished"] == 1, 20, 0.02, what="finished")
    token = make_token(SECRET.encode(), task_id, 1)
    late = d.post_callback({"task_id": task_id, "status": "running", "partial": "late"}, token)
    assert late.status_code == 409


@pytest.mark.slow  # 6 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_partials_reaching_two_dispatchers_arrive_in_order(stack: Stack) -> None:
    # GIVEN a task run through d1 and a client watching through d2
    fleet = stack.fleet(gpus=1, slots=1, service_time="fixed:60", faults=["lost_callback"])
    q1, q2 = stack.queues
    d1 = stack.dispatcher(fleet, name="d1", TASK_QUEUES=q1)
    d2 = stack.dispatcher(None, name="d2", TASK_QUEUES=q2)
    task_id, token = _running_task(stack, q1)

    def gpu() -> None:
        # WHEN the GPU's partials go alternately to d1 and d2 (as behind a load balancer)
        for i in range(40):
            beat = (d1 if i % 2 else d2).post_callback(
                {"task_id": task_id, "status": "running", "partial": i}, token
            )
            assert beat.status_code == 200, beat.text
        d1.post_callback({"task_id": task_id, "status": "finished"}, token)

    seen = _watch(d2.url, task_id, gpu)
    # THEN the watcher got them all, in the order they were sent
    assert [d["partial"] for n, d in seen if n == "partial"] == list(range(40))


def test_partial_orjson_cannot_encode_is_passed_on_not_a_500(stack: Stack) -> None:
    # GIVEN a running task (review of issue 16: a partial holding an integer past 64 bits, valid JSON that
    # the parser accepts, made the size check's orjson.dumps raise: 500 and the heartbeat lost)
    fleet = stack.fleet(gpus=1, slots=1, service_time="fixed:60", faults=["lost_callback"])
    d = stack.dispatcher(fleet)
    task_id, token = _running_task(stack, stack.queues[0])
    big = 123456789012345678901234567890

    def gpu() -> None:
        # WHEN the GPU streams such a partial, then finishes
        beat = httpx.post(
            f"{d.url}/callback",
            content=b'{"task_id": "%s", "status": "running", "partial": {"n": %d}}' % (task_id.encode(), big),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            timeout=10,
        )
        assert beat.status_code == 200, beat.text
        done = d.post_callback({"task_id": task_id, "status": "finished"}, token)
        assert done.status_code == 200, done.text

    seen = _watch(d.url, task_id, gpu)
    # THEN it was accepted and passed on to the subscriber (the SSE side reads it back with orjson, which
    # turns an integer that large into a float: the value arrives, its last digits may not)
    [partial] = [data["partial"] for name, data in seen if name == "partial"]
    assert float(partial["n"]) == float(big)
