"""A dispatcher looks at its CALLBACK_URL once it serves (``dispatcher/http/callback_check.py``): an outside
trial's ``.../calback`` (a typo) started cleanly, and every job waited out its lease and failed."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from dispatcher.http.callback_check import check_callback_url
from dispatcher.testing import free_port
from tests.dispatcher.harness import SECRET
from tests.dispatcher.helpers import wait_for


def _checks(d) -> list[dict]:
    lines = [json.loads(x) for x in d.log_path.read_text().splitlines() if x.startswith("{")]
    return [r for r in lines if r.get("action") in ("callback_check", "callback_refused")]


@pytest.mark.slow  # two dispatchers
def test_a_callback_url_with_a_wrong_path_is_an_error_in_the_log_and_a_right_one_is_not(stack):
    fleet = stack.fleet(gpus=1, service_time="0")
    port = free_port()
    typo = stack.dispatcher(
        fleet, name="typo", CALLBACK_PORT=str(port), CALLBACK_URL=f"http://127.0.0.1:{port}/calback"
    )
    wait_for(lambda: _checks(typo), 20, what="the CALLBACK_URL check")
    (line,) = _checks(typo)
    assert line["level"] == "error" and line["status"] == 404 and "/callback" in line["msg"], line
    typo.stop()
    port = free_port()
    right = stack.dispatcher(
        fleet, name="right", CALLBACK_PORT=str(port), CALLBACK_URL=f"http://127.0.0.1:{port}/callback"
    )
    wait_for(lambda: _checks(right), 20, what="the CALLBACK_URL check")
    # the look is not a refused callback: no callback_refused line, no 401 counted
    assert [(r["action"], r["level"]) for r in _checks(right)] == [("callback_check", "info")]
    assert 'gpuq_callbacks_total{code="401"}' not in httpx.get(f"{right.url}/metrics", timeout=10).text
    # AND a dispatcher with another CALLBACK_SECRET whose CALLBACK_URL reaches it (behind one load balancer)
    # is told so (an outside trial: told "reaches a gpuq /callback", then every callback was answered 401 and
    # every job ran again after its lease)
    stranger = stack.dispatcher(
        fleet,
        name="stranger",
        CALLBACK_SECRET="another-secret-0123456789abcdef",
        CALLBACK_URL=f"{right.url}/callback",
    )
    wait_for(lambda: _checks(stranger), 20, what="the CALLBACK_URL check")
    (line,) = _checks(stranger)
    assert line["level"] == "error" and "CALLBACK_SECRET" in line["msg"], line
    assert 'gpuq_callbacks_total{code="401"}' not in httpx.get(f"{right.url}/metrics", timeout=10).text


def test_a_callback_url_nobody_answers_here_is_only_mentioned(caplog):
    with caplog.at_level("INFO", logger="gpuq.dispatcher"):
        verdict = asyncio.run(
            check_callback_url(
                f"http://127.0.0.1:{free_port()}/callback", SECRET.encode(), tries=2, pause=0.01
            )
        )
    assert verdict == "unreachable"
    (record,) = [r for r in caplog.records if getattr(r, "action", None) == "callback_check"]
    assert record.levelname == "INFO" and "not reachable from this host" in record.getMessage()


def test_a_proxy_answering_502_until_the_dispatcher_serves_is_looked_at_again(caplog):
    """uvicorn binds after the dispatcher's start: a proxy in front answers 502 to the first looks."""
    answers = [502, 503, 200]

    def reply(request: httpx.Request) -> httpx.Response:
        status = answers.pop(0)
        body = b'{"callback_check": "token accepted"}' if status == 200 else b"bad gateway"
        return httpx.Response(status, content=body)

    real = httpx.AsyncClient

    def client(**kw):
        return real(transport=httpx.MockTransport(reply), **kw)

    with caplog.at_level("INFO", logger="gpuq.dispatcher"), pytest.MonkeyPatch.context() as mp:
        mp.setattr("dispatcher.http.callback_check.httpx.AsyncClient", client)
        verdict = asyncio.run(
            check_callback_url("https://lb.example/callback", SECRET.encode(), tries=5, pause=0.01)
        )
    assert verdict == "ok" and answers == []


@pytest.mark.parametrize("url", ["http://h:80OO/callback", "http://h:abc/callback"])
def test_a_callback_url_no_gpu_could_call_is_an_error(url, caplog):
    with caplog.at_level("INFO", logger="gpuq.dispatcher"):
        assert asyncio.run(check_callback_url(url, SECRET.encode(), tries=2, pause=0.01)) == "wrong"
    (record,) = [r for r in caplog.records if getattr(r, "action", None) == "callback_check"]
    assert record.levelname == "ERROR" and "not a URL a GPU can call" in record.getMessage()
