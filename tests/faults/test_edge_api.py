"""What a client can send the dispatcher's HTTP API, answered cleanly (issue 11, items 6 and 7).

Found: non-ASCII digits in a callback token (``isdigit()`` true, ``int()`` fails) -> 500; ``since`` whose UTC
falls before year 1 -> 500; a cursor of 5,000 nested ``[`` -> 500; ``/readyz`` showed the stores' error text
(hosts, ports); ``/metrics`` was open whatever was set; a dispatcher started open to the network when
API_TOKEN was forgotten; a forged 8 MiB callback was parsed before its token was checked.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from types import SimpleNamespace
from typing import Any

import httpx
import orjson
import pytest

from dispatcher.db.engine import StoreUnavailable
from dispatcher.gpus.tokens import make_token
from dispatcher.http import callback
from dispatcher.metrics import Metrics
from producer.job import Job
from tests.dispatcher.harness import SECRET, DispatcherProc
from tests.dispatcher.helpers import wait_for
from tests.dispatcher.private_servers import PrivateRedis

TOKEN = "edge-api-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.slow  # 4 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_hostile_query_values_are_4xx(stack):
    d = stack.dispatcher(None, API_TOKEN=TOKEN)
    nested = base64.urlsafe_b64encode(b"[" * 5000).decode().rstrip("=")
    cases: list[dict[str, Any]] = [
        {"cursor": nested},
        {"cursor": base64.urlsafe_b64encode(b"[" * 200 + b"]" * 200).decode()},
        {"cursor": "1." + "00" * 1021},  # a task id longer than any
        {"state": "finished,nope"},
    ]
    for params in cases:
        res = httpx.get(f"{d.url}/tasks", params=params, headers=AUTH)
        assert res.status_code == 422, (params, res.status_code, res.text)
        body = res.json()
        assert body["code"] == "invalid_input" and body["errors"][0]["loc"] == ["query", next(iter(params))]
        assert next(iter(params)) in body["detail"]
    # a since whose UTC falls outside the years 1-9999 is before or after every task (it used to be a 500)
    # a row created now: a job waiting in Redis (no GPU takes it), cancelled
    queue = stack.queues[0]
    stack.rds.rpush(queue, Job(task_id="early", type="x", queue=queue).to_redis())
    assert httpx.get(f"{d.url}/tasks/early", headers=AUTH).json()["state"] == "queued"
    assert httpx.post(f"{d.url}/tasks/early/cancel", headers=AUTH).status_code == 200
    for since, expected in (("0001-01-01T00:00:00+01:00", ["early"]), ("9999-12-31T23:59:59-01:00", [])):
        res = httpx.get(f"{d.url}/tasks", params={"since": since}, headers=AUTH)
        assert res.status_code == 200, (since, res.text)
        assert [t["task_id"] for t in res.json()["tasks"]] == expected


def test_non_ascii_digits_in_a_callback_token_are_401(stack):
    d = stack.dispatcher(None)
    mac = make_token(SECRET.encode(), "t1", 1).split(".")[1]
    for head in ("²", "1²", "³³"):  # latin-1 on the wire, as HTTP headers are decoded
        res = httpx.post(
            f"{d.url}/callback",
            json={"task_id": "t1", "status": "finished"},
            headers={"Authorization": f"Bearer {head}.{mac}".encode("latin-1")},
        )
        assert res.status_code == 401, (head, res.status_code, res.text)


@pytest.mark.slow  # 3 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_readyz_names_the_store_that_is_down_without_its_error(stack):
    private = PrivateRedis()
    private.start()
    try:
        d = stack.dispatcher(None, REDIS_URL=private.url)
        private.stop()
        res = httpx.get(f"{d.url}/readyz", timeout=30)
        assert res.status_code == 503
        assert res.json() == {
            "detail": "not ready: redis unreachable",
            "code": "not_ready",
            "status": "not ready",
            "problems": {"redis": "unreachable"},
        }
        assert str(private.port) not in res.text
    finally:
        private.close()


def test_readyz_says_not_ready_while_callbacks_here_find_the_database_failing(stack, monkeypatch):
    """An outside attack filled the database's max_connections: every callback to one dispatcher got 503
    while its /readyz, whose SELECT 1 ran on a connection already open, said ready to the load balancer."""
    d = stack.dispatcher(None)
    assert httpx.get(f"{d.url}/readyz", timeout=30).status_code == 200

    async def no_connection(*_args: Any, **_kw: Any) -> Any:
        raise StoreUnavailable("(1040, 'Too many connections')")

    # GIVEN the callbacks' way to the database failing, while /readyz's own connection still works
    monkeypatch.setattr(d.dispatcher.ends, "end_attempt", no_connection)
    token = make_token(SECRET.encode(), "t-1", 1)
    res = httpx.post(
        f"{d.url}/callback",
        json={"task_id": "t-1", "status": "finished"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert res.status_code == 503
    # THEN /readyz says not ready, naming the store, not its error
    res = httpx.get(f"{d.url}/readyz", timeout=30)
    assert res.status_code == 503
    assert res.json()["problems"] == {"database": "failing callbacks"}
    assert "1040" not in res.text


@pytest.mark.slow  # 3 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_metrics_need_metrics_token_when_set(stack):
    d = stack.dispatcher(None, METRICS_TOKEN="scrape-me-please")
    assert httpx.get(f"{d.url}/metrics").status_code == 401
    assert httpx.get(f"{d.url}/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    res = httpx.get(f"{d.url}/metrics", headers={"Authorization": "Bearer scrape-me-please"})
    assert res.status_code == 200 and "gpuq_callbacks" in res.text
    open_ = stack.dispatcher(None, name="open")
    assert httpx.get(f"{open_.url}/metrics").status_code == 200


@pytest.mark.slow  # 8 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_no_api_token_beyond_loopback_refuses_to_start(stack):
    # GIVEN a dispatcher on MariaDB listening on every interface, with no API_TOKEN
    exposed = DispatcherProc({**stack.env(None), "CALLBACK_HOST": "0.0.0.0"})
    exposed.env.pop("API_TOKEN", None)
    run = exposed.run(timeout=120)  # it exits right after its imports; those took 20 s on a loaded machine
    # THEN it does not start, and says why in one line naming the variable and the way out
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "API_TOKEN" in lines[0] and "API_TOKEN=none" in lines[0], lines
    # AND with API_TOKEN=none said on purpose it starts, open
    d = stack.dispatcher(None, name="open", CALLBACK_HOST="0.0.0.0", API_TOKEN="none")
    assert httpx.get(f"{d.url}/gpus").status_code == 200
    # AND says so loudly in its log (it said nothing before)
    assert '"action": "open_api"' in d.log_path.read_text()


def test_a_forged_callback_is_refused_before_its_body_is_parsed(monkeypatch: pytest.MonkeyPatch):
    """In-process: the parser is replaced by one that fails the test if it is ever called."""

    class NoParse:
        def validate_json(self, raw: bytes) -> Any:
            raise AssertionError("the body was parsed before its token was checked")

    monkeypatch.setattr(callback, "_ADAPTER", NoParse())
    d: Any = SimpleNamespace(settings=SimpleNamespace(secret=SECRET.encode()), metrics=Metrics())
    big = orjson.dumps({"task_id": "victim", "status": "finished", "result": ["x" * 64] * 120_000})
    assert len(big) > 8_000_000
    forged = make_token(b"not-the-secret-0123456789", "victim", 1)
    for authorization in (f"Bearer {forged}", "Bearer 1.short", None, f"Bearer {forged[:-1]}²"):
        status, _, _ = _run(callback.handle(d, big, authorization))
        assert status == 401, authorization
    # AND one with a good token is parsed (and would be applied)
    with pytest.raises(AssertionError, match="parsed"):
        _run(callback.handle(d, big, f"Bearer {make_token(SECRET.encode(), 'victim', 1)}"))


def test_decoy_task_ids_do_not_get_a_forged_callback_parsed(monkeypatch: pytest.MonkeyPatch):
    """Past 64 distinct ``task_id`` values the pre-check used to hand the body to the parser: 65 decoys
    made any forged 8 MiB callback cost its full parse again. Now the first and last 64 are checked."""

    class NoParse:
        def validate_json(self, raw: bytes) -> Any:
            raise AssertionError("the body was parsed before its token was checked")

    monkeypatch.setattr(callback, "_ADAPTER", NoParse())
    d: Any = SimpleNamespace(settings=SimpleNamespace(secret=SECRET.encode()), metrics=Metrics())
    decoys = [{"task_id": f"decoy-{i}"} for i in range(200)]
    forged = make_token(b"not-the-secret-0123456789", "victim", 1)
    big = orjson.dumps({"task_id": "victim", "status": "finished", "result": [*decoys, "x" * 8_000_000]})
    status, _, _ = _run(callback.handle(d, big, f"Bearer {forged}"))
    assert status == 401
    # AND a real callback whose own task_id comes after a result listing many task ids is still parsed
    good = make_token(SECRET.encode(), "victim", 1)
    last = orjson.dumps({"status": "finished", "result": decoys, "task_id": "victim"})
    with pytest.raises(AssertionError, match="parsed"):
        _run(callback.handle(d, last, f"Bearer {good}"))


def test_a_token_for_one_task_never_applies_a_body_naming_another():
    """The pre-check finds ids with a regex; the parsed body's own task_id is what the token must match."""
    d: Any = SimpleNamespace(settings=SimpleNamespace(secret=SECRET.encode()), metrics=Metrics())
    token = f"Bearer {make_token(SECRET.encode(), 'A', 1)}"
    for raw in (
        b'{"task_id": "A", "task_id": "B", "status": "finished"}',  # duplicate keys: the last wins
        b'{"task_id": "A", "task\\u005fid": "B", "status": "finished"}',  # escaped key
        b'{"task\\u005fid": "B", "status": "finished", "result": {"task_id": "A"}}',  # A only nested
        b'{"task_id": "\\u0042", "status": "finished", "result": {"task_id": "A"}}',  # escaped value
    ):
        status, _, _ = _run(callback.handle(d, raw, token))
        assert status == 401, raw


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


class FreezableProxy:
    """A TCP proxy to MariaDB that can stop forwarding without closing anything: a database that hangs (SIGSTOP,
    a network blackhole, a failover in progress), which refuses nothing and resets nothing."""

    def __init__(self, host: str, port: int) -> None:
        import socket
        import threading

        self.target = (host, port)
        self.frozen = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: Any, dst: Any) -> None:
        while True:
            while self.frozen.is_set():
                time.sleep(0.01)
            try:
                data = src.recv(65536)
                if not data:
                    return
                while self.frozen.is_set():  # read before the freeze: held, not passed on
                    time.sleep(0.01)
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.server.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()


@pytest.mark.slow  # ~15 s: a database frozen long enough to be said
def test_a_database_that_hangs_is_said_in_the_log_and_by_readyz_at_once(stack, database_url):
    """An outside trial froze MariaDB (SIGSTOP) for 75 s under two busy dispatchers: neither wrote a line, and
    every /readyz probe went unanswered (8 s client timeouts) instead of a 503 naming the database."""
    from sqlalchemy.engine import make_url

    from tests.conftest import MYSQL_HOST, MYSQL_PORT

    proxy = FreezableProxy(MYSQL_HOST, MYSQL_PORT)
    url = make_url(database_url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    d = stack.dispatcher(None, DATABASE_URL=url)
    try:
        assert httpx.get(f"{d.url}/readyz", timeout=30).status_code == 200
        # WHEN the database stops answering (its connections stay open)
        proxy.frozen.set()
        # THEN /readyz answers within its own deadline, naming the database
        res = httpx.get(f"{d.url}/readyz", timeout=10)
        assert res.status_code == 503 and res.json()["problems"] == {"database": "not answering"}, res.text

        # AND the log says it while it lasts
        def said(what: str) -> list[dict[str, Any]]:
            lines = [json.loads(x) for x in d.log_path.read_text().splitlines() if x.startswith("{")]
            return [r for r in lines if r.get("action") == "db_stalled" and what in r["msg"]]

        wait_for(lambda: said("not answering"), 20, what="the stall said in the log")
        assert said("not answering")[0]["level"] == "warning"
        # AND its end, and /readyz is ready again
        proxy.frozen.clear()
        wait_for(lambda: said("answering again"), 20, what="the stall's end said in the log")
        wait_for(
            lambda: httpx.get(f"{d.url}/readyz", timeout=10).status_code == 200,
            20,
            what="/readyz ready again",
        )
    finally:
        proxy.frozen.clear()
        d.stop()
        proxy.close()
