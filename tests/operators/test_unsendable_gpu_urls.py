"""GPU URLs that parse but to which no request can be made (an outside trial, 2026-12-04).

Before: a URL with a password in it (``http://admin:pw@host/g``) beside BEARER_TOKEN made aiohttp raise
ValueError ("Cannot combine AUTHORIZATION header ...") on every POST: each used up an attempt; once the GPU
left rotation its first probe raised the same ValueError, which killed the housekeeping task and stopped the
dispatcher, again on every restart, until someone removed the GPU. A host with an empty label
(``http://a..b/x``, a typo) did the same through the resolver's UnicodeError, and ``gpuq gpu add`` printed
a traceback for it. The password was shown in clear by ``gpuq gpu list``, ``GET /gpus`` and the dashboard.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from dispatcher.db.gpus import register_gpu
from dispatcher.gpus.endpoints import parse_gpu_endpoints
from dispatcher.gpus.gpu_client import GpuClient, Verdict
from dispatcher.gpus.same_service import shown_url
from dispatcher.settings import DispatcherSettings
from tests.dispatcher.harness import push_jobs, reconcile, states, wait_final
from tests.dispatcher.helpers import wait_for
from tests.operators.wrong_gpu import log_records

JOB = {
    "task_id": "t1",
    "type": "x",
    "data": {},
    "attempt": 1,
    "callback_url": "http://c/",
    "callback_token": "k",
}


@pytest.mark.parametrize(
    "url",
    [
        "http://a..b/x",
        "http://gpu-host..internal:9000/x",
        f"http://{'a' * 64}.io/x",
        "http://gpu\u00ad1:9/x",  # a soft hyphen pasted in: invisible, and aiohttp refuses it
        "https://a\u200db/x",  # a zero-width joiner
        "https://10.0.5:9443/x",  # not an IPv4 address (aiohttp refuses it; others read 10.0.0.5)
        "http://256.1.1.1/x",
        "http://1.2.3.4.5/x",
    ],
)
def test_a_host_no_client_can_look_up_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"is not a host name|is not an IPv4 address"):
        parse_gpu_endpoints(f"g0={url}")


def test_a_refusal_never_repeats_a_password() -> None:
    for raw in (
        "g1=http://alice:s3cretPW@gpu..host:9000/x",
        "g1=http://alice:s3cretPW@h:99999/x",
        "=http://alice:s3cretPW@h/x",
    ):
        with pytest.raises(ValueError) as info:
            parse_gpu_endpoints(raw)
        assert "s3cretPW" not in str(info.value) and "alice:***@" in str(info.value), info.value
    assert shown_url("https://TOKEN123@h/x") == "https://***@h/x"  # a name alone is sent as Basic auth too


def test_hosts_that_are_names_still_parse() -> None:
    eps = parse_gpu_endpoints("g0=http://gpu-1.internal./x,g1=http://[::1]:9/x,g2=http://bücher.example/x")
    assert [e.gpu_id for e in eps] == ["g0", "g1", "g2"]


def test_gpu_add_refuses_such_a_host_in_one_line(gpuq) -> None:
    res = gpuq("gpu", "add", "c1", "http://gpu-host..internal:9000/x")
    assert res.exit_code == 2, res
    assert res.stderr.count("\n") == 1 and "is not a host name" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def _settings(**extra: str) -> DispatcherSettings:
    return DispatcherSettings(
        _env_file=None,  # type: ignore[call-arg]
        callback_secret="a-secret-of-some-length",
        **extra,
    )


def test_credentials_in_gpu_endpoints_beside_a_bearer_token_are_refused_at_start() -> None:
    with pytest.raises(ValueError, match="GPU g1: its URL carries credentials"):
        _settings(bearer_token="tok", gpu_endpoints="g0=http://h/x,g1=http://admin:pw@h/y")
    # without a bearer token the URL's credentials are what is sent (Basic auth): allowed
    assert _settings(gpu_endpoints="g1=http://admin:pw@h/y").endpoints[0].url == "http://admin:pw@h/y"


def test_a_password_is_masked_wherever_a_gpu_url_is_shown(gpuq) -> None:
    assert shown_url("http://admin:s3cret@h:9/x?q=1") == "http://admin:***@h:9/x?q=1"
    assert shown_url("http://h:9/x") == "http://h:9/x"
    assert gpuq("db", "init").exit_code == 0
    res = gpuq("gpu", "add", "cred", "http://admin:s3cret@127.0.0.1:9/x", "--no-probe")
    assert res.exit_code == 0 and "s3cret" not in res.stdout + res.stderr, res
    for args in (("gpu", "list"), ("gpu", "list", "--json")):
        out = gpuq(*args).stdout
        assert "admin:***@" in out and "s3cret" not in out, out
    res = gpuq("gpu", "set", "cred", "--cancel-url", "http://bob:CANCELpw@127.0.0.1:9/cancel")
    assert res.exit_code == 0 and "CANCELpw" not in res.stdout + res.stderr, res


def test_the_client_answers_for_such_urls_and_never_raises() -> None:
    async def scenario() -> None:
        client = GpuClient(bearer_token="tok", connect_timeout=1, request_timeout=1)
        await client.start()
        try:
            for url in ("http://admin:pw@127.0.0.1:9/x", "http://a..b/x"):
                # a request that cannot be made is about the GPU's registration: refused (no attempt used,
                # the GPU counts a failure), not a failed attempt
                answer = await client.send(url, JOB)
                assert answer.verdict == Verdict.REFUSED and answer.unhealthy, answer
                ok, detail = await client.probe(url)
                assert not ok and "probe failed" in detail
                ok, detail = await client.cancel(url + "/cancel", {"task_id": "t1", "attempt": 1})
                assert not ok and "cancel failed" in detail
            answer = await client.send("http://admin:pw@127.0.0.1:9/x", JOB)
            assert "carries credentials" in (answer.error or ""), answer
            # URLs parse_gpu_endpoints refuses now, stored before it did: aiohttp's InvalidURL (also a
            # ClientError) was taken as "sent, no answer" and left to the lease; its text held the password
            for url in ("https://10.0.5:9443/x", "http://admin:s3cretPW@gpu\u00ad1:9/x"):
                answer = await client.send(url, JOB)
                assert answer.verdict == Verdict.REFUSED and "s3cretPW" not in (answer.error or ""), answer
                ok, detail = await client.probe(url)
                assert not ok and "s3cretPW" not in detail, detail
        finally:
            await client.close()

    asyncio.run(scenario())


@pytest.mark.slow  # ~6 s: a dispatcher, two GPUs and a third probed several times
def test_a_gpu_with_a_password_beside_bearer_token_leaves_rotation_and_the_dispatcher_lives(stack) -> None:
    # GIVEN g9, registered (gpuq gpu add) at a URL with credentials, beside two working GPUs, and a
    # dispatcher with BEARER_TOKEN set; every job with one attempt only
    fleet = stack.fleet(gpus=2, service_time="fixed:0.05")
    d = stack.dispatcher(fleet, MAX_ATTEMPTS="1", GPU_FAILURE_THRESHOLD="2", GPU_PROBE_SECONDS="0.2")
    with stack.engine.begin() as conn:
        url = fleet.control_url.replace("http://", "http://admin:pw@") + "/g9"
        register_gpu(conn, gpu_id="g9", url=url, pool="default", slot_count=4, now=datetime.now(UTC))
    ids = push_jobs(stack.rds, stack.queues[0], 40)
    # THEN every job finishes (those g9 refused used no attempt), g9 is out of rotation, probed again and
    # again without stopping the dispatcher
    wait_final(stack.engine, ids, timeout=60, final=("finished", "failed"))
    assert states(stack.engine, ids) == {"finished": 40}

    def g9():
        with stack.engine.connect() as conn:
            return conn.execute(
                text("SELECT healthy, last_error, down_until FROM gpus WHERE gpu_id='g9'")
            ).one()

    seen: set = set()

    def probed_times() -> int:  # each failed probe moves down_until on
        seen.add(g9().down_until)
        return len(seen)

    wait_for(lambda: probed_times() >= 4, 20, what="g9 probed several times")
    assert not g9().healthy and "carries credentials" in (g9().last_error or ""), g9()
    assert d.alive()
    lines = log_records(d)
    assert not any(r.get("action") == "fatal" for r in lines)
    assert "pw@" not in d.log_path.read_text()
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)
