"""Fixtures for the simulator's tests: a callback receiver, fleets that stop themselves, an HTTP client.

Everything is real HTTP over loopback; the fleets run on their own loops in background threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from simgpu import CallbackReceiver, SimFleet


@pytest.fixture
def receiver() -> Iterator[CallbackReceiver]:
    with CallbackReceiver() as rx:
        yield rx


@pytest.fixture
def make_fleet() -> Iterator[Callable[..., SimFleet]]:
    fleets: list[SimFleet] = []

    def make(**options: Any) -> SimFleet:
        options.setdefault("callback_backoff", 0.01)
        fleet = SimFleet(**options).start()
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        fleet.stop()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0) as client:
        yield client
