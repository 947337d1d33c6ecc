"""Defence in depth (issue 11): an exception no rule foresaw, raised by one job while a pass places it, must
dead-letter that job and let the others run; the dispatch loop goes on. And a job that cannot be encoded
for its GPU fails its attempt and frees its slot instead of holding it until the lease."""

from __future__ import annotations

import asyncio
import json
import time

from redis.asyncio import Redis

from dispatcher.db.engine import make_engine
from dispatcher.gpus.gpu_client import GpuClient, Verdict
from dispatcher.loop import placing
from dispatcher.loop.core import Dispatcher
from dispatcher.settings import DispatcherSettings
from producer.job import Job
from producer.keys import Keys
from tests.dispatcher.harness import BEARER, SECRET, states


def test_an_unforeseen_error_from_one_job_dead_letters_it_and_the_loop_goes_on(stack, monkeypatch):
    fleet = stack.fleet(gpus=2, faults=["lost_callback"])
    q = stack.queues[0]
    jobs = [Job(task_id=f"ok-{i}", type="t", queue=q) for i in range(3)]
    jobs.insert(1, Job(task_id="cursed", type="t", queue=q))
    stack.rds.rpush(q, *[j.to_redis() for j in jobs])
    # GIVEN placing "cursed" raises something no rule knows of (whatever the batch it is in)
    real = placing.dispatch  # the loop's placements (dispatcher/loop/placing.py)

    def dispatch(conn, **kwargs):
        if any(job.task_id == "cursed" for job, _ in kwargs["items"]):
            raise RuntimeError("the unforeseen")
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

    async def scenario() -> None:
        redis = Redis.from_url(stack.redis_url)
        engine = make_engine(stack.database_url, pool_size=2)
        d = Dispatcher(settings, engine, redis)
        await d.start()
        try:
            # WHEN the loop meets it: the pass fails, its jobs are tried one by one
            # (until the three are recorded and acknowledged: a job leaves the processing list just after its
            # commit, and a loaded machine once showed the instant between; 60 s for a loaded machine)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if (
                    await redis.llen(keys.dead) == 1
                    and states(stack.engine)["processing"] == 3
                    and await redis.llen(keys.proc(settings.all_queues[0], settings.dispatcher_id)) == 0
                ):
                    break
                assert d.fatal is None and not d._loop.done(), d.fatal  # type: ignore[union-attr]
                await asyncio.sleep(0.025)
            # THEN the three others run, "cursed" is dead-lettered with the reason, the loop still runs
            assert states(stack.engine)["processing"] == 3
            [entry] = [json.loads(x) for x in await redis.lrange(keys.dead, 0, -1)]
            assert entry["reason"] == "could not be dispatched: RuntimeError: the unforeseen"
            assert json.loads(entry["raw"])["task_id"] == "cursed"
            assert not d._loop.done()  # type: ignore[union-attr]
            assert await redis.llen(keys.proc(settings.all_queues[0], settings.dispatcher_id)) == 0
        finally:
            await d.stop()
            await redis.aclose()
            engine.dispose()

    asyncio.run(scenario())


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
