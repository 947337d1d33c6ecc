"""``GET /tasks/{id}/events``: a task's state changes as Server-Sent Events, from any dispatcher process."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from dispatcher.gpus.tokens import make_token
from producer.job import Job
from tests.dispatcher.conftest import Stack
from tests.dispatcher.harness import SECRET, wait_final
from tests.dispatcher.helpers import wait_for

AUTH = {"Authorization": "Bearer events-token-0123456"}


#: How far ahead the watched tasks are scheduled: the event stream must be open before they are due.
SCHEDULED_FOR = 5.0


def read_events(response: httpx.Response) -> Any:
    """(event name, data) of each SSE message of a streaming response."""
    name = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            yield name, json.loads(line[len("data: ") :])


def _state(url: str, headers: dict[str, str] | None = None) -> str | None:
    """The task's state, once recorded (a job still in Redis answers ``queued`` too)."""
    res = httpx.get(url, headers=headers)
    return res.json()["state"] if res.status_code == 200 else None


@pytest.mark.slow  # 8 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_events_stream_from_another_dispatcher(stack: Stack) -> None:
    """The task runs through d1 (its GPU calls back there); the client watches through d2, which only
    hears of it through Redis: scheduled -> queued -> dispatched -> heartbeat with progress -> finished.

    The test plays the GPU (which accepts and never calls back) so that the heartbeat cannot come after the
    end of the job, and the task is due 5 s after it is pushed so that the stream opens while it waits,
    however slow a loaded machine is at the poll and the two requests before (1.5 s once was not enough)."""
    fleet = stack.fleet(gpus=1, slots=1, service_time="0", faults=["lost_callback"])
    q1, q2 = stack.queues
    d1 = stack.dispatcher(fleet, name="d1", API_TOKEN="events-token-0123456", TASK_QUEUES=q1)
    d2 = stack.dispatcher(None, name="d2", API_TOKEN="events-token-0123456", TASK_QUEUES=q2)
    not_before = datetime.now(UTC) + timedelta(seconds=SCHEDULED_FOR)
    stack.rds.rpush(
        q1, Job(task_id="watched", type="start_transcribe", queue=q1, not_before=not_before).to_redis()
    )
    wait_for(lambda: _state(f"{d2.url}/tasks/watched", AUTH) == "scheduled", 10, 0.05)

    assert httpx.get(f"{d2.url}/tasks/watched/events").status_code == 401
    seen: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream("GET", f"{d2.url}/tasks/watched/events", headers=AUTH, timeout=20) as res:
        assert res.status_code == 200
        assert res.headers["content-type"].startswith("text/event-stream")
        for name, data in read_events(res):
            seen.append((name, data))
            if name == "dispatched":  # the GPU works on it: report progress as a GPU service would
                token = make_token(SECRET.encode(), "watched", data["attempt"])
                beat = httpx.post(
                    f"{d1.url}/callback",
                    json={"task_id": "watched", "status": "running", "progress": 0.5, "stage": "decoding"},
                    headers={"Authorization": f"Bearer {token}"},
                )
                assert beat.status_code == 200, beat.text
                done = httpx.post(
                    f"{d1.url}/callback",
                    json={"task_id": "watched", "status": "finished", "result": {"text": "ok"}},
                    headers={"Authorization": f"Bearer {token}"},
                )
                assert done.status_code == 200, done.text
    names = [n for n, _ in seen]
    assert names == ["state", "queued", "dispatched", "heartbeat", "finished"], names
    events = dict(seen)
    assert events["state"]["state"] == "scheduled"
    assert (events["dispatched"]["gpu_id"], events["dispatched"]["slot_index"]) == ("g0", 0)
    assert events["dispatched"]["attempt"] == 1
    assert events["heartbeat"]["progress"] == {"progress": 0.5, "stage": "decoding"}
    assert events["finished"]["result"] is not None and events["finished"]["outcome"] == "finished"

    # a finished task: its state, and the stream ends
    wait_final(stack.engine, ["watched"])
    with httpx.stream("GET", f"{d1.url}/tasks/watched/events", headers=AUTH, timeout=10) as res:
        again = list(read_events(res))
    assert [(n, d["state"]) for n, d in again] == [("state", "finished")]
    assert httpx.get(f"{d1.url}/tasks/nobody/events", headers=AUTH).status_code == 404


@pytest.mark.slow  # 10 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_events_of_a_failing_attempt_then_retry(stack: Stack) -> None:
    fleet = stack.fleet(gpus=1, slots=1, service_time="fixed:0.3", faults=["fail_retry"])
    d = stack.dispatcher(fleet, MAX_ATTEMPTS="2", RETRY_BACKOFF_SECONDS="1")
    q1 = stack.queues[0]
    not_before = datetime.now(UTC) + timedelta(seconds=SCHEDULED_FOR)  # the stream opens before it is due
    stack.rds.rpush(
        q1, Job(task_id="flaky", type="start_transcribe", queue=q1, not_before=not_before).to_redis()
    )
    wait_for(lambda: _state(f"{d.url}/tasks/flaky") == "scheduled", 10, 0.05)
    with httpx.stream("GET", f"{d.url}/tasks/flaky/events", timeout=20) as res:
        names = [(n, data.get("attempt", data.get("attempts"))) for n, data in read_events(res)]
    assert names == [
        ("state", 0),
        ("queued", 0),
        ("dispatched", 1),
        ("retrying", 1),
        ("queued", 1),
        ("dispatched", 2),
        ("failed", 2),
    ], names


@pytest.mark.parametrize(
    ("state", "event", "dropped"),
    [
        (
            {"state": "scheduled", "attempt": 0},
            {"event": "scheduled", "run_after": "…"},
            True,
        ),  # the CI flake
        ({"state": "processing", "attempt": 2}, {"event": "dispatched", "attempt": 2}, True),
        (
            {"state": "processing", "attempt": 2},
            {"event": "dispatched", "attempt": 3},
            False,
        ),  # a new attempt
        ({"state": "scheduled", "attempt": 0}, {"event": "queued"}, False),
        ({"state": "processing", "attempt": 1}, {"event": "heartbeat", "attempt": 1}, False),
    ],
)
def test_a_streams_first_event_is_dropped_only_when_its_state_event_said_it(state, event, dropped):
    # Events go out after their commit: a stream subscribed, read the task (its change committed), then got
    # that change's event too ('state: scheduled', then 'scheduled'; a flaky CI run of the test above).
    from dispatcher.http.task_api import _said_already

    assert _said_already(state, event) is dropped
