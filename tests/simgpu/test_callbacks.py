"""The callback client retries what may succeed later (errors, 5xx) and never what cannot (4xx)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import httpx

from simgpu import CallbackReceiver, SimFleet
from simgpu.testing import poll_until
from tests.simgpu.helpers import job


def test_5xx_is_retried_until_answered(
    make_fleet: Callable[..., SimFleet], receiver: CallbackReceiver, http: httpx.Client
) -> None:
    fleet = make_fleet(gpus=1)
    receiver.answer_with(503, 500)

    http.post(fleet.url("g0"), json=job("r1", receiver))

    calls = receiver.wait_for(3)
    assert [c.body["task_id"] for c in calls] == ["r1"] * 3
    stats = fleet.wait_until(lambda s: s["totals"]["callbacks_pending"] == 0, jobs=True)
    assert stats["totals"]["callbacks_answered"] == {"200": 1}
    assert stats["totals"]["callback_retries"] == 2
    assert stats["jobs"][0]["callback_status"] == 200


def test_4xx_is_final(
    make_fleet: Callable[..., SimFleet], receiver: CallbackReceiver, http: httpx.Client
) -> None:
    fleet = make_fleet(gpus=1)
    receiver.answer_with(409, 401)

    http.post(fleet.url("g0"), json=job("x1", receiver))
    http.post(fleet.url("g0"), json=job("x2", receiver))

    stats = fleet.wait_until(lambda s: sum(s["totals"]["callbacks_answered"].values()) == 2, jobs=True)
    assert len(receiver.calls) == 2
    assert stats["totals"]["callbacks_answered"] == {"409": 1, "401": 1}
    assert stats["totals"]["callback_retries"] == 0
    assert {j["callback_status"] for j in stats["jobs"]} == {409, 401}


def test_an_unreachable_receiver_is_given_up_after_the_tries(
    make_fleet: Callable[..., SimFleet], http: httpx.Client
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    fleet = make_fleet(gpus=1, callback_tries=3)
    body = job("u1", callback_url=f"http://127.0.0.1:{port}/callback", callback_token="t")

    assert http.post(fleet.url("g0"), json=body).status_code == 202

    stats = fleet.wait_until(lambda s: s["totals"]["callbacks_answered"], jobs=True)
    assert stats["totals"]["callbacks_answered"] == {"no_answer": 1}
    assert stats["totals"]["callback_retries"] == 2
    assert stats["jobs"][0]["callback_status"] is None
    assert stats["jobs"][0]["callback_sent_at"] is not None


def test_a_callback_answered_too_late_is_sent_again(
    make_fleet: Callable[..., SimFleet], http: httpx.Client
) -> None:
    slow_first: list[bool] = []

    async def stall_once(body: Any) -> None:
        if not slow_first:
            slow_first.append(True)
            await asyncio.sleep(2.5)

    # the retry must be answered within the timeout: 1 s leaves a loaded machine room (0.2 s did not)
    fleet = make_fleet(gpus=1, callback_timeout=1.0)
    with CallbackReceiver(before_answer=stall_once) as receiver:
        http.post(fleet.url("g0"), json=job("s1", receiver))
        stats = fleet.wait_until(lambda s: s["totals"]["callbacks_answered"])

    assert len(receiver.calls) == 2
    assert stats["totals"]["callbacks_answered"] == {"200": 1}
    assert stats["totals"]["callback_retries"] == 1


def test_each_callback_carries_its_own_token_on_a_shared_url(
    make_fleet: Callable[..., SimFleet], receiver: CallbackReceiver, http: httpx.Client
) -> None:
    """Every task's callback has its own token, all to one dispatcher URL: a client that made each URL's
    request head once (the lean client's cache) would send the first task's token for them all."""
    fleet = make_fleet(gpus=2)
    ids = [f"k{i}" for i in range(6)]
    for i, task_id in enumerate(ids):
        assert http.post(fleet.url(f"g{i % 2}"), json=job(task_id, receiver)).status_code == 202

    calls = receiver.wait_for(len(ids))
    assert sorted((c.body["task_id"], c.authorization) for c in calls) == [(t, f"Bearer cb-{t}") for t in ids]
    assert all(c.content_type == "application/json" for c in calls)


def test_callback_connections_are_opened_at_a_gpus_first_job_and_then_reused(
    make_fleet: Callable[..., SimFleet], receiver: CallbackReceiver, http: httpx.Client
) -> None:
    """One simulator process is the whole fleet: its first wave of callbacks each opened a connection, one
    after the other in one loop, and the first reached the wire 19-35 ms after its job ended (the benchmark's
    first-wave turnarounds). A GPU's first job opens one connection per slot of that GPU, GPUs starting
    together open theirs side by side, and a GPU that never gets a job opens none (an outside trial: 400
    warm-ups from a fleet the dispatcher barely used filled its HTTP_MAX_CONNECTIONS)."""
    fleet = make_fleet(gpus=3, slots=3, service_time="fixed:0.3")

    http.post(fleet.url("g0"), json=job("w1", receiver))
    http.post(fleet.url("g1"), json=job("w2", receiver))
    poll_until(lambda: len(receiver.warmups) >= 6, what=lambda: f"6 warm-ups ({receiver.warmups})")
    calls = receiver.wait_for(2)
    assert len(set(receiver.warmups)) == 6  # six connections, one GET each: g0's three and g1's three
    assert {c.peer for c in calls} <= set(receiver.warmups)  # the callbacks came over them
    http.post(fleet.url("g0"), json=job("w3", receiver))  # not its first job: no more
    receiver.wait_for(3)
    assert len(receiver.warmups) == 6  # g2 got no job: none of its own
    assert receiver.calls[2].peer in set(receiver.warmups)


def test_warm_ups_go_to_the_healthz_beside_the_callback_path(
    make_fleet: Callable[..., SimFleet], receiver: CallbackReceiver, http: httpx.Client
) -> None:
    """Behind a path prefix (a proxy's /gpuq/callback) the GETs go to /gpuq/healthz, not the proxy's own."""
    fleet = make_fleet(gpus=1, slots=2, service_time="fixed:0.2")
    body = job("p1", receiver)
    body["callback_url"] = receiver.url.replace("/callback", "/gpuq/callback")
    http.post(fleet.url("g0"), json=body)
    poll_until(lambda: len(receiver.prefixed_warmups) >= 2, what="2 warm-ups under /gpuq")
    assert receiver.warmups == []


def test_cold_callbacks_open_no_connection_ahead(
    make_fleet: Callable[..., SimFleet], receiver: CallbackReceiver, http: httpx.Client
) -> None:
    fleet = make_fleet(gpus=2, slots=3, warm_callbacks=False)
    http.post(fleet.url("g0"), json=job("c1", receiver))
    receiver.wait_for(1)
    assert receiver.warmups == []
