"""The first wave: a lone dispatcher that fills a pool's last free slots fills that pool's ready buffer too
(``ReadyBuffer.prime``), so the first slots to free find a job at hand and a standby bound, as later ones do.
Before, a pool's buffer was filled only after a slot of it had been seen freed here, so the first wave of a
backlog (every slot at once) waited for the loop: bench/RESULTS.md measured its turnarounds at 50-90 ms, the
whole run's p99.

Step by step in-process (see test_handoff.py) against real MariaDB / SQLite and Redis and a simulated GPU that
never calls back: the test plays the callbacks and the standby rounds.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from dispatcher.loop import ready
from dispatcher.loop.core import Dispatcher
from dispatcher.testing import settle
from producer.keys import Priority, queue_key
from tests.dispatcher.test_handoff import World, finish, run, world  # noqa: F401 - world: a fixture
from tests.dispatcher.test_handoff_order import buffered
from tests.dispatcher.test_standby_loop import _next_of


def _queued(w: World) -> list[str]:
    """Task ids in the queue's normal list, head first."""
    return [
        str(json.loads(raw)["task_id"]) for raw in w.rds.lrange(queue_key(w.queue, Priority.NORMAL), 0, -1)
    ]


def _parked(w: World) -> list[str]:
    return [
        str(json.loads(raw)["task_id"])
        for key in w.rds.scan_iter(f"{w.prefix}*parked*")
        for raw in w.rds.lrange(key, 0, -1)
    ]


def _held_in_demand(monkeypatch: pytest.MonkeyPatch) -> None:
    """No clock in it: the pools stay in demand until the test lapses them (``_lapse``), however slowly a
    loaded machine runs the steps before."""
    monkeypatch.setattr(ready, "DEMAND_SECONDS", 3600.0)


def _lapse(monkeypatch: pytest.MonkeyPatch) -> None:
    """DEMAND_SECONDS pass with no slot freed."""
    monkeypatch.setattr(ready, "DEMAND_SECONDS", -1.0)


async def _fill_and_buffer(w: World, d: Dispatcher, n: int) -> list[str]:
    """Push ``n`` jobs; one pass fills the 2 slots (priming the pool), the next buffers the rest."""
    ids = w.push(n)
    assert await d.dispatch_once()
    await settle(d)
    await d.dispatch_once()
    await settle(d)
    return ids


def test_a_lone_dispatcher_that_fills_a_pool_buffers_and_binds_its_next_jobs_at_once(world: World) -> None:  # noqa: F811
    w = world

    async def body(d: Dispatcher) -> None:
        assert d.intake.alone  # nobody else's heartbeat at the start's sweep
        ids = w.push(6)  # 1 GPU x 2 slots
        assert await d.dispatch_once()  # ids[0], ids[1] on the two slots: the pool is full
        await settle(d)
        assert [w.state(i) for i in ids[:2]] == ["processing", "processing"]
        # THEN the next pass buffers the jobs behind them, before any slot of the pool was freed
        assert await d.dispatch_once()
        await settle(d)
        assert buffered(d, "default") == ids[2:]
        assert _queued(w) == []
        await d.standbys.step()  # and binds standbys to the busy slots
        await settle(d)
        assert sorted(_next_of(w).values()) == sorted(ids[2:4])
        # WHEN the first slot's job calls back, its standby was sent before that callback's transaction
        standby = _next_of(w)[ids[0]]
        sent: list[bool] = []
        end_many = d.handoffs.end_many

        async def watching(items: list[dict[str, Any]]) -> Any:
            sent.append(d.requests.pool_of(standby, 1) is not None)
            return await end_many(items)

        d.ends.hand_off_with(watching)
        assert await finish(d, ids[0]) == "applied"
        assert sent == [True]
        await settle(d)
        assert standby in w.received()
        assert w.state(standby) == "processing"

    run(w, w.settings(["g0"]), body)


def test_with_another_dispatcher_running_a_full_pool_takes_nothing_more(world: World) -> None:  # noqa: F811
    """Callbacks may reach the other one (one CALLBACK_URL behind a balancer): jobs buffered here would wait
    while it starts younger ones. So only a lone dispatcher primes."""
    w = world

    async def body(d: Dispatcher) -> None:
        other = "another-dispatcher"
        w.rds.set(d.keys.alive(other), "1", ex=30)
        w.rds.sadd(d.keys.dispatchers, other)
        await d.intake.sweep_dead()
        assert not d.intake.alone
        ids = await _fill_and_buffer(w, d, 6)
        assert buffered(d, "default") == []
        assert _queued(w) == ids[2:]  # still in their queue, in order, visible
        w.rds.delete(d.keys.alive(other))
        await d.intake.sweep_dead()  # it is gone: this one is alone again
        assert d.intake.alone

    run(w, w.settings(["g0"]), body)


def test_jobs_primed_for_slots_that_never_free_go_back_to_the_head_of_their_queue(
    world: World,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Long jobs: no slot frees within DEMAND_SECONDS. The buffered jobs go back where they were, in order
    and ahead of jobs pushed since, not to the parked lists."""
    _held_in_demand(monkeypatch)
    w = world

    async def body(d: Dispatcher) -> None:
        ids = await _fill_and_buffer(w, d, 6)
        assert buffered(d, "default") == ids[2:]
        later = w.push(2)
        _lapse(monkeypatch)
        await d.dispatch_once()  # the demand lapsed: the pass gives them back
        await settle(d)
        assert buffered(d, "default") == []
        assert _queued(w) == ids[2:] + later
        assert w.processing_list(d) == []
        assert _parked(w) == []
        returned = {"pool": "default", "to": "queue"}  # counted (gpuq_jobs_returned)
        assert d.metrics.registry.get_sample_value("gpuq_jobs_returned_total", returned) == 4
        # and the next pass does not take them again for a pool it did not fill
        await d.dispatch_once()
        await settle(d)
        assert _queued(w) == ids[2:] + later

    run(w, w.settings(["g0"], standby_jobs=False), body)


def test_standbys_bound_when_a_pool_was_filled_are_taken_back_if_none_of_its_slots_frees(
    world: World,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A high-priority job must not wait behind standbys bound to slots whose jobs run for an hour: once the
    priming lapses with no slot freed, the standbys go back to their queue with the buffered jobs."""
    _held_in_demand(monkeypatch)
    w = world

    async def body(d: Dispatcher) -> None:
        ids = await _fill_and_buffer(w, d, 6)
        await d.standbys.step()
        await settle(d)
        assert sorted(_next_of(w).values()) == sorted(ids[2:4])
        _lapse(monkeypatch)
        await d.standbys.step()  # takes them back (to the buffer: the pool is not in demand, nothing binds)
        await settle(d)
        assert _next_of(w) == {}
        assert {w.state(i) for i in ids[2:4]} == {"queued"}
        await d.dispatch_once()  # gives the buffer back to the queue, oldest first
        await settle(d)
        await d.standbys.step()
        await settle(d)
        assert _next_of(w) == {}
        assert _queued(w) == ids[2:]
        assert w.processing_list(d) == []
        # AND when the first slot frees at last, the next job runs on it, in order
        assert await finish(d, ids[0]) == "applied"
        await d.dispatch_once()
        await settle(d)
        assert w.state(ids[2]) == "processing"

    run(w, w.settings(["g0"]), body)


def test_standbys_taken_back_past_the_buffers_size_push_no_younger_job_ahead(
    world: World,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by review: the take-back put the standbys in front of a full buffer, whose youngest jobs went to
    the parked list (served first) while the older ones went back to the queue: job 4 started before job 2."""
    _held_in_demand(monkeypatch)
    w = world

    async def body(d: Dispatcher) -> None:
        ids = w.push(10)
        assert await d.dispatch_once()  # ids[0], ids[1] on the 2 slots: primed
        await settle(d)
        await d.dispatch_once()  # ids[2], ids[3] buffered (HANDOFF_BUFFER=2)
        await settle(d)
        await d.standbys.step()  # and bound as standbys
        await settle(d)
        assert sorted(_next_of(w).values()) == sorted(ids[2:4])
        await d.dispatch_once()  # the buffer refilled: ids[4], ids[5]
        await settle(d)
        assert buffered(d, "default") == ids[4:6]
        _lapse(monkeypatch)
        await d.standbys.step()  # the priming lapsed: ids[2], ids[3] taken back, ahead of ids[4], ids[5]
        await settle(d)
        await d.dispatch_once()  # every one of them back to the queue, in order
        await settle(d)
        assert _parked(w) == []
        assert _queued(w) == ids[2:]
        assert await finish(d, ids[0]) == "applied"
        await d.dispatch_once()
        await settle(d)
        assert [i for i in ids[2:] if w.state(i) == "processing"] == [ids[2]]

    run(w, w.settings(["g0"], handoff_buffer=2), body)


def test_a_priming_that_lapses_during_a_pass_gives_back_the_jobs_it_took_after_the_older_ones(
    world: World,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by review: the pass read the deficit while the pool was primed and took younger jobs; by the time
    it buffered them the priming had lapsed, and they were parked (served first) while the buffered older ones
    went back to the queue."""
    _held_in_demand(monkeypatch)
    w = world

    async def body(d: Dispatcher) -> None:
        ids = w.push(4)
        assert await d.dispatch_once()  # ids[0], ids[1] running: primed
        await settle(d)
        await d.dispatch_once()  # ids[2], ids[3] buffered; room for 2 more
        await settle(d)
        assert buffered(d, "default") == ids[2:4]
        ids += w.push(4)
        take = d.intake.take

        async def slow_take(*args: Any, **kwargs: Any) -> Any:  # as a slow round trip, a loaded loop
            out = await take(*args, **kwargs)
            _lapse(monkeypatch)  # meanwhile
            return out

        monkeypatch.setattr(d.intake, "take", slow_take)
        await d.dispatch_once()  # the deficit read while primed; the priming lapses during the take
        await settle(d)
        monkeypatch.setattr(d.intake, "take", take)
        assert _parked(w) == []
        assert _queued(w) == ids[2:]
        assert await finish(d, ids[0]) == "applied"
        await d.dispatch_once()
        await settle(d)
        assert [i for i in ids[2:] if w.state(i) == "processing"] == [ids[2]]

    run(w, w.settings(["g0"], handoff_buffer=4, standby_jobs=False), body)
