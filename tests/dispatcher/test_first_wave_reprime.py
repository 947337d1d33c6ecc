"""A priming renewed (a pass fills the pool's last slots again: a GPU joined, a slot freed by a cancel or a
lease expiry, not by a callback here) moved ``_primed`` forward; ``unprimed`` then returned the newer time and
the standbys bound during the *first* priming (no slot seen freed in between) were never taken back: they
waited behind long jobs while younger ones started (a second outside review, 2026-12-02). ``unprimed`` now
returns the first priming since a slot was seen freed (``ReadyBuffer._primed_first``)."""

from __future__ import annotations

import pytest

from dispatcher.loop.core import Dispatcher
from dispatcher.testing import settle
from tests.dispatcher.helpers import add_gpu
from tests.dispatcher.test_first_wave import _fill_and_buffer, _held_in_demand, _lapse, _queued
from tests.dispatcher.test_handoff import World, finish, run, world  # noqa: F401
from tests.dispatcher.test_standby_loop import _next_of


async def _primed_twice(w: World, d: Dispatcher) -> tuple[list[str], list[str]]:
    """Ten jobs on g0's 2 slots (primed: j2, j3 bound as standbys of j0, j1), then, with no callback at all,
    a GPU joins and a pass fills its slots: the pool is full again, primed again. The jobs, and those on g1."""
    j = await _fill_and_buffer(w, d, 10)
    await d.standbys.step()  # j2, j3 standbys of j0, j1 (bound after the first priming)
    await settle(d)
    assert sorted(_next_of(w).values()) == sorted(j[2:4])
    add_gpu(w.engine, "g1", 2, url=w.fleet.url("g1"), now=d.now())
    d.wake.look_now()
    await d.dispatch_once()
    await settle(d)
    on_g1 = [i for i in j if w.state(i) == "processing" and w.rows()[i].gpu_id == "g1"]
    assert len(on_g1) == 2
    return j, on_g1


def test_standbys_of_a_renewed_priming_are_taken_back_when_it_lapses(
    world: World,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _held_in_demand(monkeypatch)
    w = world

    async def body(d: Dispatcher) -> None:
        await _primed_twice(w, d)
        _lapse(monkeypatch)  # no slot of the pool freed: the priming lapses
        await d.standbys.step()
        await settle(d)
        await d.dispatch_once()
        await settle(d)
        # README: "gets its buffered jobs and the standbys it bound since back at the head of their queue
        # ... a long-job pool holds jobs outside its queue for those 2 s only"
        assert _next_of(w) == {}, "standbys bound during the first priming stay bound behind long jobs"

    run(w, w.settings(["g0"]), body)


def test_renewed_priming_lets_a_younger_job_start_before_the_older_standbys(
    world: World,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _held_in_demand(monkeypatch)
    w = world

    async def body(d: Dispatcher) -> None:
        j, on_g1 = await _primed_twice(w, d)
        _lapse(monkeypatch)
        await d.standbys.step()
        await settle(d)
        await d.dispatch_once()
        await settle(d)
        waiting = _queued(w)
        assert await finish(d, on_g1[0]) == "applied"  # a (short) job on g1 ends: its slot frees
        await settle(d)
        d.wake.look_now()
        await d.dispatch_once()
        await settle(d)
        standbys = sorted(_next_of(w).values())
        started = [i for i in waiting if w.state(i) == "processing"]
        assert not (standbys and started and max(j.index(s) for s in standbys) < j.index(started[0])), (
            f"{started} started while the older {standbys} wait as standbys of long jobs"
        )

    run(w, w.settings(["g0"]), body)
