"""Size edges of what GPUs send back (issue 11 item 6): errors longer than their TEXT column, results too big
for one database packet alone or together. Each is applied or refused with a clear reason; none is a 500,
a 503 round after round, or a slot left to its lease."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler

import httpx
import pytest

from dispatcher.gpus.tokens import make_token
from tests.dispatcher.harness import SECRET, push_jobs, states, wait_final
from tests.dispatcher.helpers import http_server, wait_for

MIB = 1024 * 1024


def _running(stack, n: int):
    """A dispatcher and ``n`` tasks running on a GPU that never calls back: the test sends the callbacks."""
    fleet = stack.fleet(gpus=2, faults=["lost_callback"])
    d = stack.dispatcher(fleet)
    ids = push_jobs(stack.rds, stack.queues[0], n)
    wait_for(lambda: states(stack.engine, ids)["processing"] == n, 20, what=f"{n} tasks running")
    return d, ids


def _callback(d, task_id: str, **body) -> httpx.Response:
    return httpx.post(
        f"{d.url}/callback",
        content=json.dumps({"task_id": task_id, **body}),
        headers={"Authorization": f"Bearer {make_token(SECRET.encode(), task_id, 1)}"},
        timeout=60,
    )


def _row(stack, task_id: str):
    with stack.engine.connect() as conn:
        return conn.exec_driver_sql(
            "SELECT t.state, t.error, LENGTH(t.result), a.error FROM tasks t"
            " LEFT JOIN attempts a ON a.task_id = t.task_id WHERE t.task_id = %s",
            (task_id,),
        ).one()


def test_an_error_longer_than_its_column_is_cut_with_a_marker(stack):
    d, [task_id] = _running(stack, 1)
    # WHEN a GPU reports a failure whose error is 65,536 characters (131,072 bytes in UTF-8)
    res = _callback(d, task_id, status="failed", error="é" * 65536)
    # THEN it is applied (it was a 500, three times), cut to the column with a marker saying so
    assert res.status_code == 200, res.text
    state, error, _, history = _row(stack, task_id)
    assert state == "failed"
    for text in (error, history):
        assert text.endswith(" [... truncated: 131072 bytes in all]")
        assert len(text.encode()) <= 65535
        assert text.startswith("éé")


@pytest.mark.slow  # 56 MiB of results through the database
def test_eight_results_of_7_mib_at_once_are_all_stored(stack):
    # GIVEN eight running tasks WHEN their GPUs call back at once, each with a 7 MiB result
    d, ids = _running(stack, 8)
    result = "r" * (7 * MIB)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda t: _callback(d, t, status="finished", result=result), ids))
    # THEN every one is applied (7 of 8 were answered 503 at every round: one statement over the packet)
    assert [a.status_code for a in answers] == [200] * 8, [a.text[:200] for a in answers]
    wait_final(stack.engine, ids, timeout=30)
    assert {_row(stack, t)[2] for t in ids} == {len(result) + 2}  # the JSON string, quotes included


def test_a_result_the_database_cannot_take_fails_its_attempt_with_the_reason(stack):
    # GIVEN a result of 4,194,200 quotes: 8.4 MB as JSON (the callback body limit is 8 MiB), 16.8 MB once
    # escaped into the statement: more than MariaDB's 16 MiB packet
    d, [task_id] = _running(stack, 1)
    res = _callback(d, task_id, status="finished", result='"' * 4_194_200)
    # THEN the attempt fails at once with the reason (it was a 503 at every try), and frees its slot
    assert res.status_code == 200, res.text
    assert res.json()["state"] == "failed"
    state, error, stored, _ = _row(stack, task_id)
    assert (state, stored) == ("failed", None)
    assert error.startswith("the result is 8388402 bytes as JSON, more than the ")
    with stack.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM slots WHERE task_id IS NOT NULL").scalar_one() == 0


class _SyncFailure(BaseHTTPRequestHandler):
    """A synchronous GPU service that fails every job with a 70 KB error."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"status": "failed", "error": "E" * 70_000}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def failing_gpu() -> Iterator[str]:
    with http_server(_SyncFailure) as url:
        yield f"{url}/run"


def test_a_synchronous_failure_with_a_70_kb_error_fails_the_task_at_once(stack, failing_gpu):
    # GIVEN a synchronous GPU answering every job {"status": "failed", "error": <70 KB>}
    stack.dispatcher(GPU_ENDPOINTS=f"g0={failing_gpu}")
    ids = push_jobs(stack.rds, stack.queues[0], 3)
    # THEN each task fails at once with the GPU's error, cut to fit (it was lost in an uncaught exception,
    # the slot held until the lease ran out)
    wait_final(stack.engine, ids, timeout=15, final=("failed",))
    for task_id in ids:
        _, error, _, history = _row(stack, task_id)
        assert error.startswith("EEEE") and error.endswith(" [... truncated: 70000 bytes in all]")
        assert history == error
    with stack.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM slots WHERE task_id IS NOT NULL").scalar_one() == 0


def test_a_result_with_nan_is_refused_not_stored_as_text_no_json_reader_takes(stack):
    # GIVEN a running task WHEN its GPU calls back with NaN in its result (Python's JSON readers take it)
    d, [task_id] = _running(stack, 1)
    res = _callback(d, task_id, status="finished", result={"score": float("nan")})
    # THEN the attempt fails with the reason: the result was stored as {"score":NaN}, which no strict JSON
    # reader (a browser, MySQL's JSON functions) takes, and which GET /tasks showed as null
    assert res.status_code == 200, res.text
    state, error, stored, _ = _row(stack, task_id)
    assert (state, stored) == ("failed", None)
    assert error.startswith("the result cannot be stored as JSON"), error
