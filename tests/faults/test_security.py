"""Security (issue 6, item 5): callback tokens bound to one task and one attempt, compared in constant time;
CALLBACK_SECRET, BEARER_TOKEN and API_TOKEN never in a log line; the operator routes behind API_TOKEN;
oversized bodies refused with 413 without the body landing in memory. tests/dispatcher/test_callbacks.py has
the basic token cases (none, wrong, another task's, another secret's, a retried attempt's)."""

from __future__ import annotations

import hmac
import socket
import time

import httpx
import pytest

import dispatcher.gpus.tokens
from dispatcher.gpus.tokens import make_token, verify_token
from dispatcher.testing import ProcessFailed
from tests.dispatcher.harness import SECRET, DispatcherProc, free_port, push_jobs, states, wait_final
from tests.dispatcher.helpers import wait_for
from tests.faults.support import full_log, memory_kib

MIB = 1024 * 1024


def _state(engine, task_id):
    with engine.connect() as conn:
        return tuple(
            conn.exec_driver_sql("SELECT state, attempt FROM tasks WHERE task_id = %s", (task_id,)).one()
        )


@pytest.mark.slow  # 7 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_a_token_speaks_for_one_task_and_one_attempt_only(stack):
    # GIVEN two tasks running (attempt 1) on a GPU that never calls back: the test is the GPU
    fleet = stack.fleet(gpus=1, service_time="0", faults=["lost_callback"])
    d = stack.dispatcher(fleet, MAX_ATTEMPTS="3", TASK_TIMEOUT_SECONDS="60")
    a, b = push_jobs(stack.rds, stack.queues[0], 2)
    wait_for(lambda: states(stack.engine)["processing"] == 2, 20, what="two running")
    key = SECRET.encode()
    a1 = make_token(key, a, 1)
    attempt_part, _, mac = a1.partition(".")
    # a token for an attempt that does not exist yet (signed, so only a leak of the secret makes one): 409
    assert d.post_callback({"task_id": a, "status": "finished"}, make_token(key, a, 2)).status_code == 409
    # attempt 1's MAC relabelled as attempt 2, or another task's MAC under a's attempt number: 401
    assert d.post_callback({"task_id": a, "status": "finished"}, f"2.{mac}").status_code == 401
    assert (
        d.post_callback(
            {"task_id": a, "status": "finished"}, f"1.{make_token(key, b, 1).partition('.')[2]}"
        ).status_code
        == 401
    )
    # the MAC alone, truncated, extended, or with its case flipped: 401
    for forged in (mac, a1[:-1], a1 + "A", attempt_part + "." + mac.swapcase(), f" {a1}x"):
        assert d.post_callback({"task_id": a, "status": "finished"}, forged).status_code == 401, forged
    # a's token in a body naming b, or naming a prefix or extension of a's id: 401
    for other in (b, a[:-1], a + "0", a.upper()):
        assert d.post_callback({"task_id": other, "status": "finished"}, a1).status_code == 401, other
    assert _state(stack.engine, a) == ("processing", 1)
    assert _state(stack.engine, b) == ("processing", 1)
    # once attempt 1 of a has failed with retry, its token is worth nothing for attempt 2
    assert (
        d.post_callback({"task_id": a, "status": "failed", "retry": True}, a1).json()["state"] == "retrying"
    )
    wait_for(lambda: _state(stack.engine, a) == ("processing", 2), 20, what="attempt 2 running")
    for body in ({"status": "finished"}, {"status": "running"}, {"status": "failed", "retry": True}):
        assert d.post_callback({"task_id": a, **body}, a1).status_code == 409
    assert _state(stack.engine, a) == ("processing", 2)
    # and neither the callback token nor the GPU bearer token opens the operator routes (nor the reverse)
    d2 = stack.dispatcher(fleet, name="with-api-token", API_TOKEN="operator-token-123")
    assert httpx.get(f"{d2.url}/gpus", headers={"Authorization": f"Bearer {a1}"}).status_code == 401
    assert d2.post_callback({"task_id": b, "status": "finished"}, "operator-token-123").status_code == 401


def test_tokens_are_compared_in_constant_time(monkeypatch):
    """Behaviour, not timing (this shared 2-core machine is far too noisy to time a MAC comparison): every
    well-formed token, wherever it differs from the right one, reaches ``hmac.compare_digest`` with the full
    MAC of the right length on both sides, so the time spent never depends on how many leading characters
    matched. Malformed tokens (no attempt number) are refused before any MAC is computed."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(dispatcher.gpus.tokens.hmac, "compare_digest", spy)
    key = b"k" * 32
    right = make_token(key, "task-1", 3)
    head, _, mac = right.partition(".")
    wrong = [
        head + "." + ("B" if mac[0] != "B" else "C") + mac[1:],  # differs at the first character
        head + "." + mac[:-1] + ("B" if mac[-1] != "B" else "C"),  # differs at the last
        head + "." + mac[: len(mac) // 2],  # a prefix
        head + "." + mac + "AAAA",  # longer
        head + ".",  # empty MAC
    ]
    assert verify_token(key, "task-1", right) == 3
    for token in wrong:
        assert verify_token(key, "task-1", token) is None, token
    assert len(calls) == 1 + len(wrong)
    for given, expected in calls:
        assert len(expected) == len(mac)
        assert isinstance(given, bytes) and isinstance(expected, bytes)
    for malformed in ("", "abc", "x.y", "-1." + mac, "1234567890." + mac):
        assert verify_token(key, "task-1", malformed) is None
    assert len(calls) == 1 + len(wrong)


CALLBACK_SECRET = "cb-secret-Zq8vX2mK9pL4wR7t"
BEARER_TOKEN = "gpu-bearer-Hn3sJ6dF1gY5uE0c"
API_TOKEN = "api-token-Vb7nM4xQ2kT8rW1z"
SECRETS = (CALLBACK_SECRET, BEARER_TOKEN, API_TOKEN)


@pytest.mark.slow
def test_secrets_never_reach_a_log_line(stack):
    # GIVEN a dispatcher logging at DEBUG with the three secrets set, GPUs that answer 500, close, lose
    # callbacks, call back twice, one that refuses the bearer token and one that is down
    fleet = stack.fleet(
        gpus=3,
        token=BEARER_TOKEN,
        service_time="fixed:0.01",
        faults=["http_500@0.2", "lost_callback@0.2", "duplicate_callback@0.3", "close@0.1"],
    )
    wrong_bearer = stack.fleet(gpus=1, token="another-bearer", service_time="0")
    urls = fleet.urls | {"g9": wrong_bearer.url("g0"), "g8": f"http://127.0.0.1:{free_port()}/down"}
    env = {
        "GPU_ENDPOINTS": ",".join(f"{k}={v}" for k, v in urls.items()),
        "CALLBACK_SECRET": CALLBACK_SECRET,
        "BEARER_TOKEN": BEARER_TOKEN,
        "API_TOKEN": API_TOKEN,
        "LOG_LEVEL": "DEBUG",
        "TASK_TIMEOUT_SECONDS": "1",
        "MAX_ATTEMPTS": "4",
        "GPU_FAILURE_THRESHOLD": "2",
        "GPU_PROBE_SECONDS": "0.3",
        "GPU_REQUEST_TIMEOUT_SECONDS": "1",
    }
    d = stack.process(None, **env)
    ids = push_jobs(stack.rds, stack.queues[0], 60)
    stack.rds.rpush(stack.queues[0], "not a job")
    # WHEN it runs them all (some end failed), gets bad callbacks and bad API calls, and is stopped
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {API_TOKEN}"}):
        httpx.get(f"{d.url}/gpus", headers=headers)
    httpx.post(
        f"{d.url}/callback",
        json={"task_id": ids[0], "status": "finished"},
        headers={"Authorization": "Bearer 1.x"},
    )
    httpx.get(f"{d.url}/tasks/{ids[0]}", headers={"Authorization": f"Bearer {API_TOKEN}"})
    wait_final(stack.engine, ids, timeout=90, final=("finished", "failed"))
    assert d.term() == 0
    # and a dispatcher that refuses to start on a bad setting (a too short secret, next to the others)
    bad = DispatcherProc({**stack.env(), **env, "CALLBACK_SECRET": "short-sekret"}, name="bad")
    bad.log_path = d.log_path.with_name("bad.log")
    with pytest.raises(ProcessFailed, match="exited with 2"):
        bad.start(timeout=60)  # it exits at once; the bound is for a loaded machine
    bad_log = bad.log_path.read_text()
    assert "CALLBACK_SECRET" in bad_log
    # THEN no log line holds any of the secrets
    log = full_log(d)
    for expected in ('"level": "debug"', '"action": "attempt_end"', "lease expired", "dead_letter"):
        assert expected in log, expected
    with stack.engine.connect() as conn:
        errors = list(conn.exec_driver_sql("SELECT error FROM attempts WHERE error IS NOT NULL").scalars())
    assert any("GPU answered 401" in e for e in errors) and any("GPU answered 500" in e for e in errors)
    for secret in (*SECRETS, "short-sekret"):
        assert secret not in log, secret
        assert secret not in bad_log, secret


def test_operator_routes_honour_api_token(stack):
    fleet = stack.fleet(gpus=1, service_time="0")
    d = stack.dispatcher(fleet, API_TOKEN=API_TOKEN)
    [task_id] = push_jobs(stack.rds, stack.queues[0], 1)
    wait_final(stack.engine, [task_id])
    routes = ["/gpus", f"/tasks/{task_id}", "/tasks/no-such-task", "/tasks", "/api/overview"]
    refused = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {API_TOKEN[:-1]}"},
        {"Authorization": f"Bearer {API_TOKEN}x"},
        {"Authorization": f"Basic {API_TOKEN}"},
        {"Authorization": API_TOKEN},
        {"X-Api-Token": API_TOKEN},
    ]
    with httpx.Client(base_url=d.url, timeout=10) as client:
        for route in routes:
            for headers in refused:
                res = client.get(route, headers=headers)
                # 401 even for an unknown task: no answer tells an outsider whether a task exists
                assert res.status_code == 401, (route, headers, res.status_code)
                assert res.headers["www-authenticate"] == "Bearer"
            for scheme in ("Bearer", "bearer", "BEARER"):
                res = client.get(route, headers={"Authorization": f"{scheme} {API_TOKEN}"})
                assert res.status_code == (404 if "no-such" in route else 200), (route, res.text)
        # the open routes stay open
        for route in ("/healthz", "/readyz", "/metrics"):
            assert client.get(route).status_code == 200


#: Shaped like a callback token (a callback whose token is not is refused before its body is read).
SHAPED_TOKEN = "1." + "A" * 43


def _chunked_post(port: int, path: str, total: int, chunk: int = 256 * 1024) -> int:
    """POST ``total`` bytes with chunked transfer encoding (no Content-Length); the HTTP status."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {SHAPED_TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        piece = f"{chunk:x}\r\n".encode() + b"x" * chunk + b"\r\n"
        sent = 0
        try:
            while sent < total:
                sock.sendall(piece)
                sent += chunk
            sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the end: the answer is already there
        answer = b""
        while b"\r\n" not in answer:
            more = sock.recv(4096)
            if not more:
                break
            answer += more
        return int(answer.split(b" ", 2)[1])
    finally:
        sock.close()


@pytest.mark.slow  # a real process, whose memory is measured while 150 MB arrive
def test_oversized_chunked_bodies_are_refused_without_growing_memory(stack):
    fleet = stack.fleet(gpus=1, service_time="0")
    d = stack.process(fleet)
    assert d.proc is not None
    before = memory_kib(d.proc.pid)
    # WHEN 50 MB arrive chunked (no Content-Length) at the callback and at routes that take no body
    answers = {path: _chunked_post(d.port, path, 50 * MIB) for path in ("/callback", "/gpus", "/nowhere")}
    time.sleep(0.2)
    after = memory_kib(d.proc.pid)
    # THEN the callback says 413, the others refuse the request, and the peak RSS grew by far less than 50 MB
    assert answers["/callback"] == 413
    assert answers["/gpus"] in (405, 413) and answers["/nowhere"] in (404, 413), answers
    grew = (after["VmHWM"] - before["VmHWM"]) * 1024
    assert grew < 20 * MIB, f"peak RSS grew by {grew / MIB:.1f} MiB"
    assert httpx.get(f"{d.url}/healthz").status_code == 200
