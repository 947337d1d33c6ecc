"""Defence in depth (issue 11): an exception no rule foresaw, raised by one job while a pass places it, must
dead-letter that job and let the others run; the dispatch loop goes on. So must a duplicate key that comes
back pass after pass for the same job (no race). And a job that cannot be encoded for its GPU fails its
attempt and frees its slot instead of holding it until the lease."""

from __future__ import annotations

import asyncio
import json
import time

from redis.asyncio import Redis
from sqlalchemy.exc import IntegrityError

from dispatcher.db.engine import make_engine
from dispatcher.gpus.gpu_client import GpuClient, Verdict
from dispatcher.loop import placing
from dispatcher.loop.core import Dispatcher
from dispatcher.settings import DispatcherSettings
from producer.job import Job
from producer.keys import Keys
from tests.dispatcher.harness import BEARER, SECRET, states


def _one_culprit_among_four(stack, monkeypatch, culprit: str, error: Exception) -> tuple[dict, list[int]]:
    """Four jobs, placing ``culprit`` always raises ``error`` (whatever the batch it is in). Runs a dispatcher
    until the other three run, one job is dead-lettered and the processing list is empty (60 s for a loaded
    machine: a job leaves the processing list just after its commit, and a loaded machine once showed the
    instant between), checking the loop stays alive. Returns the dead letter and how many placements of the
    culprit were tried by then and 0.5 s later (a dead-lettered job must not be tried again)."""
    fleet = stack.fleet(gpus=2, faults=["lost_callback"])
    q = stack.queues[0]
    jobs = [Job(task_id=f"ok-{i}", type="t", queue=q) for i in range(3)]
    jobs.insert(1, Job(task_id=culprit, type="t", queue=q))
    stack.rds.rpush(q, *[j.to_redis() for j in jobs])
    real = placing.dispatch  # the loop's placements (dispatcher/loop/placing.py)
    tries: list[int] = []

    def dispatch(conn, **kwargs):
        if any(job.task_id == culprit for job, _ in kwargs["items"]):
            tries.append(1)
            raise error
        return real(conn, **kwargs)

    monkeypatch.setattr(placing, "dispatch", dispatch)
    settings = DispatcherSettings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=stack.database_url,
        redis_url=stack.redis_url,
        redis_key_prefix=stack.prefix,
        task_queues=",".join(stack.queues),
        callback_secret=SECRET,
        bearer_token=BEARER,
        gpu_endpoints=fleet.gpu_endpoints(),
        idle_poll_seconds=0.05,
    )
    keys = Keys(stack.prefix)

    async def scenario() -> tuple[dict, list[int]]:
        redis = Redis.from_url(stack.redis_url)
        engine = make_engine(stack.database_url, pool_size=2)
        d = Dispatcher(settings, engine, redis)
        await d.start()
        proc = keys.proc(settings.all_queues[0], settings.dispatcher_id)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if (
                    await redis.llen(keys.dead) == 1
                    and states(stack.engine)["processing"] == 3
                    and await redis.llen(proc) == 0
                ):
                    break
                assert d.fatal is None and not d._loop.done(), d.fatal  # type: ignore[union-attr]
                await asyncio.sleep(0.025)
            assert states(stack.engine)["processing"] == 3
            [entry] = [json.loads(x) for x in await redis.lrange(keys.dead, 0, -1)]
            settled = len(tries)
            await asyncio.sleep(0.5)
            assert not d._loop.done()  # type: ignore[union-attr]
            assert await redis.llen(proc) == 0
            return entry, [settled, len(tries)]
        finally:
            await d.stop()
            await redis.aclose()
            engine.dispose()

    return asyncio.run(scenario())


def test_an_unforeseen_error_from_one_job_dead_letters_it_and_the_loop_goes_on(stack, monkeypatch):
    # GIVEN placing "cursed" raises something no rule knows of; WHEN the loop meets it: the pass fails, its
    # jobs are tried one by one
    entry, _ = _one_culprit_among_four(stack, monkeypatch, "cursed", RuntimeError("the unforeseen"))
    # THEN the three others run, "cursed" is dead-lettered with the reason, the loop still runs
    assert entry["reason"] == "could not be dispatched: RuntimeError: the unforeseen"
    assert json.loads(entry["raw"])["task_id"] == "cursed"


def test_a_standing_duplicate_key_dead_letters_its_job_and_the_others_run(stack, monkeypatch):
    # A duplicate key that is no race: the same job's placement fails with it pass after pass (a table the
    # schema upgrade could not adopt, a constraint gpuq does not know). It used to be taken for a race every
    # time: the loop spun at two thirds of a core and the pool's other jobs never ran.
    clash = IntegrityError("INSERT INTO tasks", {}, Exception("(1062, \"Duplicate entry 'clash'\")"))
    entry, (settled, later) = _one_culprit_among_four(stack, monkeypatch, "clash", clash)
    # THEN after a few passes the others run, "clash" is dead-lettered with the error, and it is not tried again
    assert json.loads(entry["raw"])["task_id"] == "clash"
    assert "IntegrityError" in entry["reason"] and "Duplicate entry" in entry["reason"]
    assert later == settled, "the loop still tries the dead-lettered job"


def test_a_job_no_encoder_takes_fails_instead_of_holding_its_slot():
    # A lone surrogate (from a task recorded under older rules): orjson raised TypeError, the request task
    # died, and the slot stayed held until the lease
    async def scenario() -> None:
        client = GpuClient(bearer_token="", connect_timeout=1, request_timeout=1)
        await client.start()
        try:
            answer = await client.send("http://127.0.0.1:9/never", {"task_id": "x", "data": {"t": "\ud800"}})
        finally:
            await client.close()
        assert answer.verdict is Verdict.FAILED
        assert answer.error is not None and answer.error.startswith("the job cannot be sent as JSON")
        assert not answer.unhealthy

    asyncio.run(scenario())
