"""The request/callback contract of SPEC §4, as a GPU service honours it."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from simgpu import CallbackReceiver, SimFleet
from tests.simgpu.helpers import TOKEN, auth, job


def test_async_mode_accepts_then_calls_back_with_the_task_token(
    make_fleet: Callable[..., SimFleet], receiver: CallbackReceiver, http: httpx.Client
) -> None:
    fleet = make_fleet(gpus=2, token=TOKEN, service_time="fixed:0.05")

    answer = http.post(fleet.url("g1"), json=job("t1", receiver, attempt=2), headers=auth())

    assert answer.status_code == 202
    assert answer.json() == {"task_id": "t1", "status": "accepted"}
    [call] = receiver.wait_for(1)
    assert call.authorization == "Bearer cb-t1"
    assert call.content_type == "application/json"
    assert call.body == {
        "task_id": "t1",
        "status": "finished",
        "result": {"gpu": "g1", "type": "embed", "data": {"text": "t1"}, "service_time": 0.05},
    }
    stats = fleet.wait_until(lambda s: s["totals"]["callbacks_answered"].get("200") == 1, jobs=True)
    [record] = stats["jobs"]
    assert record["task_id"] == "t1"
    assert record["attempt"] == 2
    assert record["gpu"] == "g1"
    assert record["callback_status"] == 200
    assert record["callback_sent_at"] - record["received_at"] >= 0.045
    assert record["callback_sent_mono"] - record["received_mono"] >= 0.045
    assert record["callback_answered_mono"] >= record["callback_sent_mono"]
    assert stats["gpus"]["g1"]["answers"] == {"202": 1}
    assert stats["gpus"]["g0"]["received"] == 0


def test_sync_mode_answers_the_result_and_never_calls_back(
    make_fleet: Callable[..., SimFleet], receiver: CallbackReceiver, http: httpx.Client
) -> None:
    fleet = make_fleet(gpus=1, mode="sync", service_time="fixed:0.02")

    finished = http.post(fleet.url("g0"), json=job("s1", receiver))
    no_callback_url = http.post(fleet.url("g0"), json=job("s2"))
    fleet.configure(faults=["fail"])
    failed = http.post(fleet.url("g0"), json=job("s3"))

    assert finished.status_code == 200
    assert finished.json()["status"] == "finished"
    assert finished.json()["result"]["gpu"] == "g0"
    assert no_callback_url.json()["status"] == "finished"
    assert failed.status_code == 200
    assert failed.json() == {"task_id": "s3", "status": "failed", "error": "simulated failure on g0"}
    stats = fleet.stats()
    assert stats["totals"]["callbacks_sent"] == {}
    assert stats["gpus"]["g0"]["in_flight"] == 0
    # the moment each slot was freed, which a benchmark needs to measure slot turnaround in sync mode
    first = stats["jobs"][0]
    assert first["answered_mono"] - first["received_mono"] >= 0.015
    assert first["callback_sent_mono"] is None
    assert receiver.calls == []


def test_bearer_token_is_required_when_configured(
    make_fleet: Callable[..., SimFleet], receiver: CallbackReceiver, http: httpx.Client
) -> None:
    fleet = make_fleet(gpus=1, token=TOKEN)
    url = fleet.url("g0")

    assert http.post(url, json=job("a", receiver)).status_code == 401
    assert http.post(url, json=job("b", receiver), headers=auth("wrong")).status_code == 401
    assert http.post(url, json=job("c", receiver), headers=auth()).status_code == 202
    fleet.configure(token="rotated")
    assert http.post(url, json=job("d", receiver), headers=auth()).status_code == 401
    assert http.post(url, json=job("e", receiver), headers=auth("rotated")).status_code == 202

    receiver.wait_for(2)
    assert sorted(body["task_id"] for body in receiver.bodies()) == ["c", "e"]
    assert fleet.stats()["gpus"]["g0"]["answers"] == {"401": 3, "202": 2}


def test_a_malformed_job_is_answered_400_naming_the_field(
    make_fleet: Callable[..., SimFleet], http: httpx.Client
) -> None:
    url = make_fleet(gpus=1).url("g0")

    not_json = http.post(url, content=b"{nope", headers={"Content-Type": "application/json"})
    no_task_id = http.post(url, json={"type": "x", "callback_url": "http://x/", "callback_token": "t"})
    no_callback = http.post(url, json={"task_id": "x"})
    bad_url = http.post(url, json={"task_id": "x", "callback_url": "ftp://x", "callback_token": "t"})

    assert not_json.status_code == 400
    assert "not JSON" in not_json.json()["error"]
    assert "task_id" in no_task_id.json()["error"]
    assert "callback_url" in no_callback.json()["error"]
    assert "callback_url" in bad_url.json()["error"]


def test_gpu_url_answers_a_probe(make_fleet: Callable[..., SimFleet], http: httpx.Client) -> None:
    fleet = make_fleet(gpus=2, slots=3)

    probe = http.get(fleet.url("g1"))

    assert probe.status_code == 200
    assert probe.json() == {"gpu": "g1", "slots": 3, "in_flight": 0, "down": False}


def test_gpu_endpoints_lists_every_gpu_url(make_fleet: Callable[..., SimFleet]) -> None:
    fleet = make_fleet(gpus=3)

    endpoints = fleet.gpu_endpoints()

    pairs = dict(item.split("=", 1) for item in endpoints.split(","))
    assert pairs == fleet.urls
    assert list(pairs) == ["g0", "g1", "g2"]
    assert pairs["g2"] == f"{fleet.control_url}/g2"
