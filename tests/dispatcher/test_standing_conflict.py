"""A duplicate key that is no race: the same job's placement fails with it pass after pass (a table the schema
upgrade could not adopt, a constraint gpuq does not know). It used to be taken for a race every time: the
loop spun at two thirds of a core, logging, and the pool's other jobs never ran. Now the job is dead-lettered
with the error after a few passes, and the others run."""

from __future__ import annotations

import asyncio
import json
import time

from redis.asyncio import Redis
from sqlalchemy.exc import IntegrityError

from dispatcher.db.engine import make_engine
from dispatcher.loop import placing
from dispatcher.loop.core import Dispatcher
from dispatcher.settings import DispatcherSettings
from producer.job import Job
from producer.keys import Keys
from tests.dispatcher.harness import BEARER, SECRET, states


def test_a_standing_duplicate_key_dead_letters_its_job_and_the_others_run(stack, monkeypatch):
    fleet = stack.fleet(gpus=2, faults=["lost_callback"])
    q = stack.queues[0]
    jobs = [Job(task_id=f"ok-{i}", type="t", queue=q) for i in range(3)]
    jobs.insert(1, Job(task_id="clash", type="t", queue=q))
    stack.rds.rpush(q, *[j.to_redis() for j in jobs])
    # GIVEN placing "clash" always meets a duplicate key, even after looking the jobs up
    real = placing.dispatch
    tries: list[int] = []

    def dispatch(conn, **kwargs):
        if any(job.task_id == "clash" for job, _ in kwargs["items"]):
            tries.append(1)
            raise IntegrityError("INSERT INTO tasks", {}, Exception("(1062, \"Duplicate entry 'clash'\")"))
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
        proc = keys.proc(settings.all_queues[0], settings.dispatcher_id)
        try:
            # WHEN the loop meets it (60 s for a loaded machine; it takes a few passes)
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
            # THEN the others run, "clash" is dead-lettered with the error, and the loop stopped trying it
            assert states(stack.engine)["processing"] == 3
            [entry] = [json.loads(x) for x in await redis.lrange(keys.dead, 0, -1)]
            assert json.loads(entry["raw"])["task_id"] == "clash"
            assert "IntegrityError" in entry["reason"] and "Duplicate entry" in entry["reason"]
            settled = len(tries)
            await asyncio.sleep(0.5)
            assert len(tries) == settled, "the loop still tries the dead-lettered job"
            assert not d._loop.done()  # type: ignore[union-attr]
        finally:
            await d.stop()
            await redis.aclose()
            engine.dispose()

    asyncio.run(scenario())
