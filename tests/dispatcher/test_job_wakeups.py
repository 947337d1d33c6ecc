"""A producer's wake-up ("job") reads the free slots again only when one may be free (``Wakeups.job_pushed``).

Every push publishes "job"; each made every dispatcher read every slot (a snapshot), 46 reads in the
benchmark's first 0.35 s while the fleet was full, beside its first callbacks. Now a pass that read the slots
and left none free lets the pushes that follow only refill the buffer, until a slot is freed here, a wake-up
says one was freed elsewhere, or one idle poll has passed. A job must never wait longer than that for a free
slot: these tests push each way and look where the job went.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from dispatcher.loop import placing
from dispatcher.loop.core import Dispatcher
from dispatcher.testing import settle
from tests.dispatcher.test_handoff import World, finish, run, world  # noqa: F401


@pytest.fixture
def snapshots(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """When each pass read every slot (the read a full fleet's "job" wake-ups no longer cost)."""
    seen: list[float] = []
    real = placing.snapshot

    def counted(*args: Any, **kwargs: Any) -> Any:
        seen.append(time.monotonic())
        return real(*args, **kwargs)

    monkeypatch.setattr(placing, "snapshot", counted)
    return seen


def test_a_job_pushed_to_a_full_fleet_refills_the_buffer_without_reading_the_slots(
    world: World,  # noqa: F811
    snapshots: list[float],
) -> None:
    w = world

    async def body(d: Dispatcher) -> None:
        ids = w.push(2)
        assert await d.dispatch_once()  # a new dispatcher looks: both slots of g0 taken, none left
        await settle(d)
        assert [w.state(i) for i in ids] == ["processing", "processing"]
        assert len(snapshots) == 1
        more = w.push(2)
        d.wake.event.clear()
        d.wake.job_pushed()
        # THEN the loop is woken (for the buffer) but does not look at the slots
        assert d.wake.event.is_set()
        assert not d.wake.look
        await d.dispatch_once()
        await settle(d)
        assert len(snapshots) == 1
        assert [r.job.task_id for r in d.handoffs.buffer.pop("default", 9)] == more[:2]

    run(w, w.settings(["g0"], handoff_buffer=2, standby_jobs=False), body)


def test_a_job_pushed_after_a_slot_was_freed_here_is_placed_at_once(world: World) -> None:  # noqa: F811
    """HANDOFF_BUFFER=0: nothing is buffered, so only a look places the job pushed after the slot is freed."""
    w = world

    async def body(d: Dispatcher) -> None:
        ids = w.push(2)
        assert await d.dispatch_once()
        await settle(d)
        assert await finish(d, ids[0]) == "applied"  # the slot is free: the fleet is no longer full
        later = w.push(1)
        d.wake.job_pushed()
        assert d.wake.look
        assert await d.dispatch_once()  # on the hand-off's count of free slots, or a read of them
        await settle(d)
        assert w.state(later[0]) == "processing"

    run(w, w.settings(["g0"], handoff_buffer=0, standby_jobs=False), body)


def test_a_job_pushed_while_a_slot_was_left_free_looks(world: World, snapshots: list[float]) -> None:  # noqa: F811
    w = world

    async def body(d: Dispatcher) -> None:
        ids = w.push(1)
        assert await d.dispatch_once()  # one of two slots taken: one left free, nothing for it
        await settle(d)
        assert w.state(ids[0]) == "processing"
        later = w.push(1)
        d.wake.job_pushed()
        assert d.wake.look
        assert await d.dispatch_once()
        await settle(d)
        assert w.state(later[0]) == "processing"
        assert len(snapshots) == 2

    run(w, w.settings(["g0"], handoff_buffer=0, standby_jobs=False), body)


def test_a_full_count_is_trusted_for_one_idle_poll_only(world: World, snapshots: list[float]) -> None:  # noqa: F811
    """A slot freed with no wake-up at all (none is known; a lost one): the job waits one idle poll, no more."""
    w = world

    async def body(d: Dispatcher) -> None:
        w.push(2)
        assert await d.dispatch_once()
        await settle(d)
        d.wake.job_pushed()
        assert not d.wake.look
        await asyncio.sleep(d.settings.idle_poll_seconds + 0.05)
        d.wake.job_pushed()
        assert d.wake.look

    run(w, w.settings(["g0"], handoff_buffer=0, standby_jobs=False, idle_poll_seconds=0.1), body)


@pytest.mark.parametrize("message", ["slot", "cancel", "look"])
def test_the_listener_looks_on_any_other_wake_up(world: World, message: str) -> None:  # noqa: F811
    """Through Redis: "job" with the fleet full does not look, anything else (a slot freed by another
    dispatcher, an operator's change, a cancel) does."""
    w = world

    async def body(d: Dispatcher) -> None:
        w.push(2)
        assert await d.dispatch_once()
        await settle(d)
        assert not d.wake.look
        listener = asyncio.create_task(d._listen())
        try:
            await _until_subscribed(w, d)
            d.wake.event.clear()
            w.rds.publish(d.keys.wake, "job")
            await _until(d.wake.event.is_set)
            assert not d.wake.look
            w.rds.publish(d.keys.wake, message)
            await _until(lambda: d.wake.look)
        finally:
            d.rt.stopping.set()
            await asyncio.wait_for(listener, 10)

    run(w, w.settings(["g0"], handoff_buffer=0, standby_jobs=False, idle_poll_seconds=30), body)


async def _until_subscribed(w: World, d: Dispatcher) -> None:
    await _until(lambda: bool(w.rds.pubsub_numsub(d.keys.wake)[0][1]))


async def _until(cond: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "not within 10 s"
        await asyncio.sleep(0.01)
