"""A GPU that is down: 503 on a shared port, connections refused on a port of its own."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from simgpu import CallbackReceiver, SimFleet
from tests.simgpu.helpers import job


def test_down_gpu_on_a_shared_port_answers_503_until_it_is_back(
    make_fleet: Callable[..., SimFleet], receiver: CallbackReceiver, http: httpx.Client
) -> None:
    fleet = make_fleet(gpus=2)

    fleet.configure(gpu="g1", faults=["down"])
    refused = http.post(fleet.url("g1"), json=job("d1", receiver))
    probe = http.get(fleet.url("g1"))
    other = http.post(fleet.url("g0"), json=job("d2", receiver))
    fleet.configure(gpu="g1", faults=[])
    back = http.post(fleet.url("g1"), json=job("d3", receiver))

    assert refused.status_code == 503
    assert probe.status_code == 503
    assert probe.json()["down"] is True
    assert other.status_code == 202
    assert back.status_code == 202
    assert fleet.stats()["gpus"]["g1"]["answers"] == {"503": 1, "202": 1}


def test_down_gpu_on_its_own_port_refuses_connections_until_it_is_back(
    make_fleet: Callable[..., SimFleet], receiver: CallbackReceiver, http: httpx.Client
) -> None:
    fleet = make_fleet(gpus=2, gpu_ports=0)
    g0, g1 = fleet.url("g0"), fleet.url("g1")
    assert g0 != g1
    assert not g1.startswith(fleet.control_url)
    assert http.post(g1, json=job("k1", receiver)).status_code == 202  # leaves a keep-alive connection open

    fleet.configure(gpu="g1", faults=["down"])
    with pytest.raises(httpx.TransportError):
        http.post(g1, json=job("k2", receiver))
    with httpx.Client() as fresh, pytest.raises(httpx.ConnectError):
        fresh.post(g1, json=job("k3", receiver))
    assert http.post(g0, json=job("k4", receiver)).status_code == 202

    fleet.configure(gpu="g1", faults=[])
    assert fleet.url("g1") == g1
    assert http.post(g1, json=job("k5", receiver)).status_code == 202
    assert http.get(g1).json()["down"] is False


def test_a_gpu_can_start_down(make_fleet: Callable[..., SimFleet]) -> None:
    fleet = make_fleet(gpus=2, gpu_ports=0, gpu_faults={"g0": ["down"]})

    with httpx.Client() as client, pytest.raises(httpx.ConnectError):
        client.get(fleet.url("g0"))
    assert fleet.stats()["gpus"]["g0"]["down"] is True
