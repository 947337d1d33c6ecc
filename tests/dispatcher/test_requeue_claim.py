"""Only the dispatcher that claims a due task says it is ``queued``, once per claim, in line with the events
it published before (``Housekeeping.requeue_due``, ``claim_due``, ``EventPublisher.publish_in_order``).

An outside review of the first fix (62b0e23: every process that read a due task published ``queued``, apart
from the buffer) played each interleaving below: a second dispatcher said ``queued`` after the task had been
placed and finished elsewhere; a cancel was followed by ``queued``; ``queued`` overtook the ``retrying`` still
in the buffer; a Redis that refused the push got a ``queued`` every tick (0.25 s). A review of the claim
added two claimers racing, a slow publisher, and an operator's priority change during the claim. The events
are read in order from the task's Redis channel, as ``GET /tasks/{id}/events`` gets them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
import redis
from redis.exceptions import ResponseError

from dispatcher.db import deferred
from dispatcher.db.attempts import cancel_task
from dispatcher.db.deferred import claim_due
from dispatcher.db.priority import set_priority
from dispatcher.db.reads import get_task
from dispatcher.errors import TRANSIENT
from dispatcher.loop import housekeeping
from dispatcher.loop.core import Dispatcher
from dispatcher.states import Outcome
from dispatcher.testing import in_process, settle
from producer.job import Job
from producer.keys import Priority, queue_key
from simgpu.fleet import SimFleet
from tests.dispatcher.test_refused_retry import _settings, fleet  # noqa: F401


def _drain(pubsub: Any) -> list[str]:
    names = []
    while (m := pubsub.get_message(timeout=0.3)) is not None:
        names.append(json.loads(m["data"])["event"])
    return names


def _subscribe(rds: redis.Redis, channel: str) -> Any:
    pubsub = rds.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel)
    pubsub.get_message(timeout=0.5)  # the confirmation
    return pubsub


async def _retrying(d: Dispatcher, rds: redis.Redis, queue: str, task_id: str) -> None:
    """The task ran once and waits ``retrying``, due at once (RETRY_BACKOFF_SECONDS 0)."""
    rds.rpush(queue, Job(task_id=task_id, type="t", queue=queue, data={}).to_redis())
    assert await d.dispatch_once()
    await settle(d)
    fin = await d.ends.end_attempt(task_id, 1, Outcome.FAILED_RETRY, error="boom")
    assert (fin.code, fin.state) == ("applied", "retrying"), fin
    await settle(d)


async def _requeue_place_finish(a: Dispatcher, task_id: str) -> None:
    """A whole life of the task's second attempt in dispatcher ``a``: requeued, placed, finished."""
    await a.housekeeping.requeue_due()
    assert await a.dispatch_once()
    await settle(a)
    fin = await a.ends.end_attempt(task_id, 2, Outcome.FINISHED, result={"ok": 1})
    assert fin.state == "finished", fin
    await settle(a)


def _slow_events(d: Dispatcher, seconds: float = 0.3) -> None:
    """The next pipeline of ``d``'s task events reaches Redis ``seconds`` late (a slow Redis, a busy
    process); the ones after it do not, so an event sent apart from the buffer would overtake it."""
    real = d.events._send
    slowed: list[bool] = []

    async def slow(batch: list[tuple[str, bytes]]) -> tuple[int, str]:
        if not slowed:
            slowed.append(True)
            await asyncio.sleep(seconds)
        return await real(batch)

    d.events._send = slow  # type: ignore[method-assign]


def _between_read_and_claim(
    monkeypatch: pytest.MonkeyPatch, meanwhile: Callable[[], Awaitable[None]]
) -> list[bool]:
    """Run ``meanwhile`` on the event loop inside the next claim's transaction, once its read found due
    tasks and before it claims them (the claim runs in a worker thread, which waits). Returns a list that
    gets one item when it ran."""
    loop = asyncio.get_running_loop()
    real_due = deferred.due_deferred
    ran: list[bool] = []

    def due(conn: Any, **kw: Any) -> Any:
        out = real_due(conn, **kw)
        if out and not ran:
            ran.append(True)
            asyncio.run_coroutine_threadsafe(meanwhile(), loop).result(30)
        return out

    monkeypatch.setattr(deferred, "due_deferred", due)
    return ran


def test_a_second_dispatcher_that_read_the_due_task_says_nothing_once_another_claimed_it(
    database_url: str,
    redis_url: str,
    key_prefix: str,
    rds: redis.Redis,
    fleet: SimFleet,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """B reads the task as due; inside B's transaction, before B claims it, A requeues it, places it and it
    finishes. B's claim finds it no longer due. (MariaDB: SQLite's BEGIN IMMEDIATE lets one writer in at a
    time, so there B's read and claim cannot be split.)"""
    queue = f"q-{uuid.uuid4().hex[:6]}"
    task_id = f"r-{uuid.uuid4().hex[:6]}"
    seen: list[str] = []
    claimed: list[Any] = []

    async def main() -> None:
        sa = _settings(database_url, redis_url, key_prefix, queue, fleet)
        sb = _settings(database_url, redis_url, key_prefix, queue, fleet)
        async with in_process(sa) as a, in_process(sb) as b:
            await _retrying(a, rds, queue, task_id)
            pubsub = _subscribe(rds, a.keys.task_events(task_id))
            interleaved = _between_read_and_claim(monkeypatch, lambda: _requeue_place_finish(a, task_id))
            real_db = b.rt.db

            async def b_db(fn: Any, **kw: Any) -> Any:
                out = await real_db(fn, **kw)
                if fn is claim_due:
                    claimed.append(out)
                return out

            b.rt.db = b_db  # type: ignore[method-assign]
            await b.housekeeping.requeue_due()
            monkeypatch.undo()
            await settle(b)
            assert interleaved
            seen.extend(_drain(pubsub))
            pubsub.close()

    asyncio.run(main())
    assert claimed == [[]]
    # before: ['queued', 'dispatched', 'finished', 'queued'] (B said it too, last)
    assert seen == ["queued", "dispatched", "finished"], seen


def test_a_task_cancelled_between_the_read_and_the_claim_gets_no_queued_event(
    database_url: str,
    redis_url: str,
    key_prefix: str,
    rds: redis.Redis,
    fleet: SimFleet,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The operator's cancel commits after housekeeping read the task as due (MariaDB, as above)."""
    queue = f"q-{uuid.uuid4().hex[:6]}"
    task_id = f"c-{uuid.uuid4().hex[:6]}"
    seen: list[str] = []
    state: list[str] = []

    async def main() -> None:
        async with in_process(_settings(database_url, redis_url, key_prefix, queue, fleet)) as d:
            await _retrying(d, rds, queue, task_id)
            pubsub = _subscribe(rds, d.keys.task_events(task_id))

            async def cancel() -> None:
                fin = await d.rt.db(cancel_task, task_id=task_id, now=d.rt.now(), backoff=d.backoff)
                assert fin.code == "applied"
                d.events.publish("cancelled", task_id, by="api")  # as cancel_api does
                await settle(d)

            interleaved = _between_read_and_claim(monkeypatch, cancel)
            await d.housekeeping.requeue_due()
            monkeypatch.undo()
            await settle(d)
            assert interleaved
            seen.extend(_drain(pubsub))
            pubsub.close()
            state.append((await d.rt.db(get_task, task_id=task_id))["state"])
            assert rds.llen(queue_key(queue, Priority.NORMAL)) == 0  # nothing pushed for it either

    asyncio.run(main())
    assert state == ["cancelled"]
    # before: ['cancelled', 'queued']
    assert seen == ["cancelled"], seen


def test_queued_comes_after_the_retrying_still_waiting_in_the_buffer(
    any_database_url: str,
    redis_url: str,
    key_prefix: str,
    rds: redis.Redis,
    fleet: SimFleet,  # noqa: F811
) -> None:
    """A GPU's refusal makes the task due at once; its "retrying" may still be on its way (a busy process, a
    slow Redis: 0.3 s here) when housekeeping requeues it."""
    queue = f"q-{uuid.uuid4().hex[:6]}"
    task_id = f"g-{uuid.uuid4().hex[:6]}"
    seen: list[str] = []

    async def main() -> None:
        async with in_process(_settings(any_database_url, redis_url, key_prefix, queue, fleet)) as d:
            rds.rpush(queue, Job(task_id=task_id, type="t", queue=queue, data={}).to_redis())
            assert await d.dispatch_once()
            await settle(d)
            pubsub = _subscribe(rds, d.keys.task_events(task_id))
            _slow_events(d)
            fin = await d.ends.end_attempt(task_id, 1, Outcome.GPU_REFUSED, error="404")
            assert (fin.code, fin.state) == ("applied", "retrying"), fin
            await d.housekeeping.requeue_due()
            await settle(d)
            seen.extend(_drain(pubsub))
            pubsub.close()

    asyncio.run(main())
    assert seen == ["retrying", "queued"], seen


def test_a_refused_push_says_queued_once_per_claim_and_the_task_comes_back_when_the_claim_runs_out(
    any_database_url: str,
    redis_url: str,
    key_prefix: str,
    rds: redis.Redis,
    fleet: SimFleet,  # noqa: F811
) -> None:
    """A Redis at maxmemory (noeviction) refuses the push with OOM and still takes PUBLISH; a claimer that
    died before its push is the same to the others: the task is due again once the claim runs out."""
    queue = f"q-{uuid.uuid4().hex[:6]}"
    task_id = f"o-{uuid.uuid4().hex[:6]}"
    seen: list[str] = []
    states: list[str] = []

    async def main() -> None:
        async with in_process(_settings(any_database_url, redis_url, key_prefix, queue, fleet)) as d:
            await _retrying(d, rds, queue, task_id)
            pubsub = _subscribe(rds, d.keys.task_events(task_id))
            real = d.rt.intake.requeue

            async def oom(jobs: list[tuple[str, str]]) -> None:
                raise ResponseError("OOM command not allowed when used memory > 'maxmemory'.")

            d.rt.intake.requeue = oom  # type: ignore[method-assign]
            for _ in range(8):  # as Housekeeping._duties runs them, every tick
                with contextlib.suppress(TRANSIENT):
                    await d.housekeeping.requeue_due()
            seen.extend(_drain(pubsub))
            states.append((await d.rt.db(get_task, task_id=task_id))["state"])
            d.rt.intake.requeue = real  # type: ignore[method-assign]
            # the claim runs out (the process's clock moved on, as its offset to the database's clock is)
            d.rt.clock_offset += timedelta(seconds=housekeeping.REQUEUE_CLAIM_SECONDS + 1)
            await d.housekeeping.requeue_due()
            await settle(d)
            seen.extend(_drain(pubsub))
            pubsub.close()
            states.append((await d.rt.db(get_task, task_id=task_id))["state"])
            assert rds.llen(queue_key(queue, Priority.NORMAL)) == 1

    asyncio.run(main())
    # before: 'queued' eight times while the task stayed retrying
    assert seen == ["queued", "queued"], seen
    assert states == ["retrying", "queued"]


def test_two_claimers_inside_each_others_window_only_one_claims(
    database_url: str,
    redis_url: str,
    key_prefix: str,
    rds: redis.Redis,
    fleet: SimFleet,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """B read the task as due; A claims it before B does; B's claim finds it claimed (MariaDB, as above)."""
    queue = f"q-{uuid.uuid4().hex[:6]}"
    task_id = f"r-{uuid.uuid4().hex[:6]}"
    out: dict[str, list[str]] = {}
    claim = timedelta(seconds=housekeeping.REQUEUE_CLAIM_SECONDS)

    async def main() -> None:
        sa = _settings(database_url, redis_url, key_prefix, queue, fleet)
        sb = _settings(database_url, redis_url, key_prefix, queue, fleet)
        async with in_process(sa) as a, in_process(sb) as b:
            await _retrying(a, rds, queue, task_id)

            async def a_claims() -> None:
                out["a"] = [j.task_id for j in await a.rt.db(claim_due, now=a.rt.now(), claim=claim)]

            ran = _between_read_and_claim(monkeypatch, a_claims)
            out["b"] = [j.task_id for j in await b.rt.db(claim_due, now=b.rt.now(), claim=claim)]
            monkeypatch.undo()
            assert ran

    asyncio.run(main())
    assert out == {"a": [task_id], "b": []}, out


def test_queued_reaches_redis_before_the_job_however_slow_the_events(
    any_database_url: str,
    redis_url: str,
    key_prefix: str,
    rds: redis.Redis,
    fleet: SimFleet,  # noqa: F811
) -> None:
    """The claimer waits for its "queued" to be out before it pushes: another dispatcher placing the job at
    once says "dispatched" after it."""
    queue = f"q-{uuid.uuid4().hex[:6]}"
    task_id = f"w-{uuid.uuid4().hex[:6]}"
    seen: list[str] = []

    async def main() -> None:
        sa = _settings(any_database_url, redis_url, key_prefix, queue, fleet)
        sb = _settings(any_database_url, redis_url, key_prefix, queue, fleet)
        async with in_process(sa) as a, in_process(sb) as b:
            await _retrying(a, rds, queue, task_id)
            pubsub = _subscribe(rds, a.keys.task_events(task_id))
            _slow_events(a)
            await a.housekeeping.requeue_due()
            assert await b.dispatch_once()
            await settle(b)
            await settle(a)
            seen.extend(_drain(pubsub))
            pubsub.close()

    asyncio.run(main())
    assert seen == ["queued", "dispatched"], seen


def test_a_priority_changed_after_the_claim_is_pushed_again_at_the_new_priority(
    any_database_url: str,
    redis_url: str,
    key_prefix: str,
    rds: redis.Redis,
    fleet: SimFleet,  # noqa: F811
) -> None:
    """``gpuq task priority T high`` commits while T is claimed but still ``retrying`` (so the command leaves
    Redis alone), before the claimer's push at the old priority. Marked queued, T waited in the normal list
    while the database said high (an outside review)."""
    queue = f"q-{uuid.uuid4().hex[:6]}"
    task_id = f"p-{uuid.uuid4().hex[:6]}"
    out: dict[str, Any] = {}

    def lists() -> dict[str, int]:
        return {p.value: rds.llen(queue_key(queue, p)) for p in (Priority.HIGH, Priority.NORMAL)}

    async def main() -> None:
        async with in_process(_settings(any_database_url, redis_url, key_prefix, queue, fleet)) as d:
            await _retrying(d, rds, queue, task_id)
            real = d.rt.intake.requeue

            async def requeue(jobs: list[tuple[str, str]]) -> None:
                res = await d.rt.db(set_priority, task_id=task_id, priority=Priority.HIGH, now=d.rt.now())
                out["cli"] = (res.code, res.state)
                await real(jobs)

            d.rt.intake.requeue = requeue  # type: ignore[method-assign]
            await d.housekeeping.requeue_due()
            d.rt.intake.requeue = real  # type: ignore[method-assign]
            row = await d.rt.db(get_task, task_id=task_id)
            out["first"] = (row["state"], row["priority"], lists())
            await d.housekeeping.requeue_due()  # the next tick: due at once
            row = await d.rt.db(get_task, task_id=task_id)
            out["next"] = (row["state"], row["priority"], lists())
            while await d.dispatch_once():  # both copies taken: one runs, the other is dropped
                await settle(d)
            await settle(d)
            row = await d.rt.db(get_task, task_id=task_id)
            out["ran"] = (row["state"], row["attempts"], lists())

    asyncio.run(main())
    assert out["cli"] == ("applied", "retrying")
    assert out["first"] == ("retrying", "high", {"high": 0, "normal": 1}), out
    assert out["next"] == ("queued", "high", {"high": 1, "normal": 1}), out
    assert out["ran"][1:] == (2, {"high": 0, "normal": 0}), out


def test_the_queued_event_of_a_requeued_task_is_out_before_its_job(
    any_database_url: str,
    redis_url: str,
    key_prefix: str,
    rds: redis.Redis,
    fleet: SimFleet,  # noqa: F811
) -> None:
    """What a listener has when the job becomes takeable: pushed first, another dispatcher could place the
    job and publish ``dispatched`` before ``queued`` (a fresh-clone CI run's stream read state, dispatched,
    queued)."""
    queue = f"q-{uuid.uuid4().hex[:6]}"
    task_id = f"r-{uuid.uuid4().hex[:6]}"
    seen: list[str] = []

    async def main() -> None:
        async with in_process(_settings(any_database_url, redis_url, key_prefix, queue, fleet)) as d:
            await _retrying(d, rds, queue, task_id)
            pubsub = _subscribe(rds, d.keys.task_events(task_id))
            real = d.rt.intake.requeue

            async def requeue(jobs: list[tuple[str, str]]) -> None:
                seen.append("event" if "queued" in _drain(pubsub) else "none")
                await real(jobs)
                seen.append("job")

            d.rt.intake.requeue = requeue  # type: ignore[method-assign]
            await d.housekeeping.requeue_due()
            pubsub.close()
            assert rds.llen(queue_key(queue, Priority.NORMAL)) == 1

    asyncio.run(main())
    assert seen == ["event", "job"], seen
