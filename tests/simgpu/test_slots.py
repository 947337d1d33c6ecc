"""Slot accounting: how tests prove a GPU never got more jobs than it has slots."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import httpx

from simgpu import CallbackReceiver, SimFleet
from tests.simgpu.helpers import job


def test_a_fifth_job_on_a_four_slot_gpu_is_an_oversubscription(
    make_fleet: Callable[..., SimFleet], receiver: CallbackReceiver, http: httpx.Client
) -> None:
    fleet = make_fleet(gpus=2, slots=4, service_time="fixed:0.3")
    url = fleet.url("g0")

    answers = [http.post(url, json=job(f"o{i}", receiver)).status_code for i in range(5)]

    assert answers == [202] * 5, "a full GPU still accepts, so the test sees the fifth job"
    busy = fleet.stats()["gpus"]["g0"]
    assert (busy["in_flight"], busy["max_in_flight"], busy["oversubscriptions"]) == (5, 5, 1)
    # the overlap names the request that found no slot and the jobs holding them all
    [overlap] = fleet.stats()["totals"]["overlaps"]
    assert (overlap["gpu"], overlap["task_id"], overlap["attempt"]) == ("g0", "o4", 1)
    assert [h["task_id"] for h in overlap["holding"]] == ["o0", "o1", "o2", "o3"]
    receiver.wait_for(5)
    done = fleet.wait_until(lambda s: s["gpus"]["g0"]["in_flight"] == 0)["gpus"]
    assert (done["g0"]["max_in_flight"], done["g0"]["oversubscriptions"]) == (5, 1)
    assert done["g1"]["oversubscriptions"] == 0


def test_concurrent_sync_requests_are_counted_the_same_way(
    make_fleet: Callable[..., SimFleet], http: httpx.Client
) -> None:
    fleet = make_fleet(gpus=1, slots=4, mode="sync", service_time="fixed:0.3")

    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda i: http.post(fleet.url("g0"), json=job(f"c{i}")), range(5)))

    assert [a.json()["status"] for a in answers] == ["finished"] * 5
    g0 = fleet.stats()["gpus"]["g0"]
    assert (g0["in_flight"], g0["max_in_flight"], g0["oversubscriptions"]) == (0, 5, 1)


def test_jobs_within_the_slots_are_no_oversubscription(
    make_fleet: Callable[..., SimFleet], receiver: CallbackReceiver, http: httpx.Client
) -> None:
    fleet = make_fleet(gpus=1, slots=4, service_time="fixed:0.1")

    for i in range(4):
        http.post(fleet.url("g0"), json=job(f"a{i}", receiver))
    receiver.wait_for(4)
    fleet.wait_until(lambda s: s["totals"]["in_flight"] == 0)
    for i in range(4):
        http.post(fleet.url("g0"), json=job(f"b{i}", receiver))

    g0 = fleet.stats()["gpus"]["g0"]
    assert (g0["max_in_flight"], g0["oversubscriptions"], g0["received"]) == (4, 0, 8)


def test_a_slot_is_free_once_its_callback_is_sent_before_it_is_answered(
    make_fleet: Callable[..., SimFleet],
) -> None:
    """A dispatcher may hand the slot to the next job before answering the callback (SPEC §4)."""
    fleet = make_fleet(gpus=1, slots=1)
    chained: list[int] = []

    async def dispatch_next_then_answer(body: Any) -> None:
        if body["task_id"] == "first":
            async with aiohttp.ClientSession() as session:
                async with session.post(fleet.url("g0"), json=job("second", receiver)) as answer:
                    chained.append(answer.status)

    with CallbackReceiver(before_answer=dispatch_next_then_answer) as receiver:
        with httpx.Client() as client:
            client.post(fleet.url("g0"), json=job("first", receiver))
        receiver.wait_for(2)

    assert chained == [202]
    g0 = fleet.stats()["gpus"]["g0"]
    assert (g0["received"], g0["max_in_flight"], g0["oversubscriptions"]) == (2, 1, 0)


def test_stats_and_reset(
    make_fleet: Callable[..., SimFleet], receiver: CallbackReceiver, http: httpx.Client
) -> None:
    fleet = make_fleet(gpus=2, faults=["fail"], gpu_faults={"g1": ["http_500"]})
    for i in range(3):
        http.post(fleet.url("g0"), json=job(f"r{i}", receiver))
    http.post(fleet.url("g1"), json=job("r3", receiver))
    receiver.wait_for(3)
    stats = fleet.wait_until(lambda s: s["totals"]["callbacks_answered"].get("200") == 3, jobs=True)

    assert stats["totals"]["received"] == 4
    assert stats["totals"]["answers"] == {"202": 3, "500": 1}
    assert stats["totals"]["callbacks_sent"] == {"failed": 3}
    assert [j["task_id"] for j in stats["jobs"]] == ["r0", "r1", "r2", "r3"]
    assert set(stats["jobs"][0]) >= {
        "task_id",
        "attempt",
        "gpu",
        "received_at",
        "callback_sent_at",
        "callback_status",
    }
    assert "jobs" not in fleet.stats(jobs=False)

    fleet.configure(faults=[])
    fleet.reset()
    cleared = fleet.stats()
    assert cleared["totals"]["received"] == 0
    assert cleared["totals"]["answers"] == {}
    assert cleared["jobs"] == []
    assert cleared["gpus"]["g1"]["config"]["faults"] == []

    fleet.reset(config=True)
    restored = fleet.stats()["gpus"]
    assert restored["g0"]["config"]["faults"] == ["fail"]
    assert restored["g1"]["config"]["faults"] == ["fail", "http_500"]


def test_control_endpoints_over_http(make_fleet: Callable[..., SimFleet], http: httpx.Client) -> None:
    fleet = make_fleet(gpus=2)
    control = fleet.control_url

    def bad(body: Any) -> str:
        answer = http.post(f"{control}/_control", json=body)
        assert answer.status_code == 400
        return str(answer.json()["error"])

    assert "unknown fault 'nope'" in bad({"faults": ["nope"]})
    assert "unknown GPU" in bad({"gpu": "g9", "mode": "sync"})
    assert "fleet-wide" in bad({"gpu": "g0", "token": "x"})
    assert "service time" in bad({"service_time": "exp"})
    assert "slots" in bad({"slots": 0})
    assert "unknown setting" in bad({"colour": "red"})
    assert "not JSON" in http.post(f"{control}/_control", content=b"{").json()["error"]

    changed = http.post(
        f"{control}/_control", json={"gpu": ["g1"], "service_time": 0.5, "faults": ["hang@0.25"]}
    )
    assert changed.status_code == 200
    assert changed.json()["gpus"]["g1"] | {"url": ""} == {
        "url": "",
        "slots": 4,
        "service_time": "fixed:0.5",
        "mode": "async",
        "faults": ["hang@0.25"],
    }
    assert changed.json()["gpus"]["g0"]["faults"] == []
    assert http.get(f"{control}/_control").json() == changed.json()
    assert "jobs" not in http.get(f"{control}/_stats", params={"jobs": "0"}).json()
    assert http.post(f"{control}/_reset", json={"config": True}).json() == {"reset": True}
    assert http.get(f"{control}/_control").json()["gpus"]["g1"]["faults"] == []
