"""``gpuq queue list --dead`` and ``gpuq queue requeue`` against real MariaDB and Redis (and the run's Redis
Cluster): entries read back, put back on their queue at their priority, kept with the reason when they
cannot run; and ``db/known.py``'s verdict held to what the dispatch itself does with such a job."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from dispatcher.db.engine import make_engine, transaction
from dispatcher.db.known import known_rows, verdict
from dispatcher.queues import dead_requeue
from dispatcher.states import Outcome
from producer.job import Job
from producer.keys import Keys, Priority, queue_key
from tests.dispatcher.helpers import end_attempt, fleet_engine, job
from tests.dispatcher.test_store import _dispatch
from tests.redis_cluster import Cluster

T = "start_transcribe"


def letter(raw: str, queue: str | None, reason: str = "refused", at: datetime | None = None) -> str:
    """A dead-letter entry as a dispatcher writes it (``Intake._commands``)."""
    when = (at or datetime.now(UTC)).isoformat()
    return json.dumps({"raw": raw, "reason": reason, "queue": queue, "at": when})


def fresh(queue: str, task_id: str, **fields: Any) -> str:
    return Job(task_id=task_id, type=T, queue=queue, data={"k": task_id}, **fields).to_redis()


@pytest.fixture
def dead(gpuq, gpuq_env):
    """The schema, the test's Redis, its dead-letter key and its two queues; cleaned up after."""
    assert gpuq("db", "init").exit_code == 0
    rds = redis.Redis.from_url(gpuq_env["REDIS_URL"])
    keys = Keys(gpuq_env["REDIS_KEY_PREFIX"])
    qa, qb = gpuq_env["TASK_QUEUES"].split(",")
    yield rds, keys, qa, qb
    for q in (qa, qb):
        for p in Priority:
            rds.delete(queue_key(q, p))
    for key in rds.scan_iter(f"{gpuq_env['REDIS_KEY_PREFIX']}*"):
        rds.delete(key)
    rds.close()


def test_list_dead_shows_index_age_queue_task_id_and_reason(gpuq, dead):
    rds, keys, qa, _ = dead
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    rds.rpush(keys.dead, letter(fresh(qa, "inv-1"), qa, "the job is 2048 bytes", an_hour_ago))
    rds.rpush(keys.dead, letter("{", qa, "not JSON: Expecting property name"))
    rds.rpush(keys.dead, b"\xff not an entry")
    listed = json.loads(gpuq("queue", "list", "--dead", "--json").stdout)
    assert [(d["index"], d["queue"], d["task_id"], d["reason"]) for d in listed] == [
        (0, qa, "inv-1", "the job is 2048 bytes"),
        (1, qa, None, "not JSON: Expecting property name"),
        (2, None, None, "not an entry a dispatcher wrote"),
    ]
    assert 3590 < listed[0]["age_seconds"] < 3700
    assert json.loads(listed[0]["raw"])["task_id"] == "inv-1"
    res = gpuq("queue", "list", "--dead")
    assert res.exit_code == 0
    first = next(line for line in res.stdout.splitlines() if "inv-1" in line)
    assert [c.strip() for c in first.strip().strip("│").split("│")] == [
        "0",
        "1h00m",
        qa,
        "inv-1",
        "the job is 2048 bytes",
    ]
    assert f"3 dead letter(s) in {keys.dead}" in res.stdout
    # the depths' view has JSON too, with the dead letters counted
    assert json.loads(gpuq("queue", "list", "--json").stdout)["dead"] == 3


def test_requeue_by_task_id_and_by_index_goes_to_the_tail_of_its_priority(gpuq, dead):
    rds, keys, qa, qb = dead
    rds.rpush(qa, fresh(qa, "waiting"))  # a job already waiting: the requeued one goes behind it
    rds.rpush(keys.dead, letter(fresh(qa, "a1"), qa))
    rds.rpush(keys.dead, letter(fresh(qb, "b-high", priority=Priority.HIGH), qb))
    rds.rpush(keys.dead, letter(fresh(qa, "a2"), qa))
    # a dry run says what would happen and moves nothing
    res = gpuq("queue", "requeue", "a1", "--dry-run")
    assert res.exit_code == 0 and f"would requeue #0 (task a1) onto {qa} (normal priority)" in res.stdout
    assert rds.llen(keys.dead) == 3 and rds.llen(qa) == 1
    # by task id
    res = gpuq("queue", "requeue", "a1")
    assert res.exit_code == 0, res
    assert f"requeued #0 (task a1) onto {qa} (normal priority)" in res.stdout
    assert [Job.model_validate_json(x).task_id for x in rds.lrange(qa, 0, -1)] == ["waiting", "a1"]
    # by index, as the list numbers them now (b-high is #0 once a1 left)
    assert [d["task_id"] for d in json.loads(gpuq("queue", "list", "--dead", "--json").stdout)] == [
        "b-high",
        "a2",
    ]
    res = gpuq("queue", "requeue", "--index", "0")
    assert res.exit_code == 0, res
    assert [Job.model_validate_json(x).task_id for x in rds.lrange(queue_key(qb, Priority.HIGH), 0, -1)] == [
        "b-high"
    ]
    assert rds.llen(qb) == 0
    assert [json.loads(x)["queue"] for x in rds.lrange(keys.dead, 0, -1)] == [qa]  # a2 stays


def test_requeue_all_keeps_what_cannot_run_and_says_why(gpuq, dead):
    rds, keys, qa, _ = dead
    seed_job = json.dumps({"type": T, "data": {"s3_key": "a.wav"}})  # the seed's shape: no id, no time
    entries = [
        letter(fresh(qa, "ok-1"), qa),
        letter("{", qa, "not JSON"),
        letter(fresh("elsewhere", "lost-1"), "elsewhere"),
        letter(seed_job, qa),
        letter(fresh(qa, "big-1")[:-1] + ', "pad": "' + "x" * 4000 + '"}', qa),
        "not an entry",
    ]
    rds.rpush(keys.dead, *entries)
    res = gpuq("queue", "requeue", "--all", MAX_JOB_BYTES="2048")
    assert res.exit_code == 1, res
    assert "requeued 2 of 6 dead letter(s)" in res.stdout
    assert "kept #1: its job still cannot run: not JSON" in res.stdout
    assert "kept #2 (task lost-1): its queue 'elsewhere' is not one this deployment serves" in res.stdout
    assert "kept #4 (task big-1): its job still cannot run: the job is" in res.stdout
    assert "MAX_JOB_BYTES=2048" in res.stdout
    assert "kept #5: the entry holds no job" in res.stdout
    assert res.stderr.strip() == "gpuq: 4 of 6 dead letter(s) not requeued: see each above"
    # what stays is exactly the four entries named, byte for byte
    assert [x.decode() for x in rds.lrange(keys.dead, 0, -1)] == [entries[i] for i in (1, 2, 4, 5)]
    queued = [Job.model_validate_json(x) for x in rds.lrange(qa, 0, -1)]
    assert queued[0].task_id == "ok-1"
    # the seed's job got its task id and enqueue time, as a dispatcher gives them, and the id was said
    assert queued[1].data == {"s3_key": "a.wav"}
    assert f"requeued #3 (task {queued[1].task_id}) onto {qa}" in res.stdout


def test_an_entry_purged_between_the_look_and_the_move_pushes_nothing(dead):
    """One Redis: the entry's removal and the push are one script; no entry, no push (no second copy when
    two operators requeue at once, no job back that an operator just purged)."""
    rds, keys, qa, _ = dead
    rds.rpush(keys.dead, letter(fresh(qa, "p1"), qa))
    (only,) = dead_requeue.read(rds, keys)
    planned = dead_requeue.plan(only, queues=[qa], max_bytes=262144)
    assert isinstance(planned, dead_requeue.Requeue)
    rds.delete(keys.dead)  # purged meanwhile
    assert dead_requeue.move(rds, keys, planned, cluster=False, mark_ttl=60) is dead_requeue.Moved.GONE
    assert rds.llen(qa) == 0
    rds.rpush(keys.dead, only.entry)
    assert dead_requeue.move(rds, keys, planned, cluster=False, mark_ttl=60) is dead_requeue.Moved.MOVED
    assert rds.llen(qa) == 1 and rds.llen(keys.dead) == 0


def test_an_unknown_id_or_index_refuses_the_whole_command(gpuq, dead):
    rds, keys, qa, _ = dead
    rds.rpush(keys.dead, letter(fresh(qa, "here"), qa))
    for args, named in [(("here", "nope"), "nope"), (("--index", "0", "--index", "5"), "#5")]:
        res = gpuq("queue", "requeue", *args)
        assert res.exit_code == 1, res
        assert res.stderr.strip() == (
            f"gpuq: no dead letter {named} among the 1 in the list (`gpuq queue list --dead` shows them)"
        )
        assert rds.llen(keys.dead) == 1 and rds.llen(qa) == 0  # "here" was not requeued either
    assert gpuq("queue", "requeue").exit_code == 2
    assert gpuq("queue", "requeue", "--all", "here").exit_code == 2


def test_a_job_whose_task_is_known_is_not_requeued_to_be_dropped(gpuq, gpuq_env, dead):
    rds, keys, qa, _ = dead
    engine = make_engine(gpuq_env["DATABASE_URL"], pool_size=1)
    try:
        assert gpuq("gpu", "add", "g0", "http://127.0.0.1:9/g0", "--no-probe").exit_code == 0
        done, failed = job(queue=qa, task_id="done-1"), job(queue=qa, task_id="failed-1")
        assert len(_dispatch(engine, [done, failed]).placed) == 2
        end_attempt(engine, "done-1")
        end_attempt(engine, "failed-1", outcome=Outcome.FAILED)
        rds.rpush(keys.dead, letter(done.to_redis(), qa))  # the very job recorded: a copy
        reuse = done.model_copy(update={"enqueued_at": done.enqueued_at + timedelta(days=2)})
        rds.rpush(keys.dead, letter(reuse.to_redis(), qa))  # a new job under a known id
        rds.rpush(keys.dead, letter(failed.to_redis(), qa))
        rds.rpush(keys.dead, letter(fresh(qa, "new-1"), qa))
        rds.rpush(keys.dead, letter(fresh(qa, "new-1"), qa))  # the same task twice in the list
        res = gpuq("queue", "requeue", "--all")
    finally:
        engine.dispose()
    assert res.exit_code == 1, res
    lines = res.stdout.splitlines()
    assert (
        "kept #0 (task done-1): a dispatcher would drop it without running it (task is already finished at "
        "attempt 1); nothing to do: the task ran or runs"
    ) in lines
    assert (
        "kept #1 (task done-1): a dispatcher would dead-letter it again (task id already used: task done-1 "
        "exists (finished)); submit it again under a new task id"
    ) in lines
    assert (
        "kept #2 (task failed-1): a dispatcher would drop it without running it (task is already failed at "
        "attempt 1); `gpuq task retry failed-1` runs the task again from its stored job"
    ) in lines
    assert "kept #4 (task new-1): #3 (task new-1) holds the same task and goes back instead" in res.stdout
    assert [Job.model_validate_json(x).task_id for x in rds.lrange(qa, 0, -1)] == ["new-1"]
    assert rds.llen(keys.dead) == 4


_DISPATCH_OUTCOMES = {"dropped": {"dropped"}, "dead-lettered": {"refused", "invalid"}}


def test_the_verdict_is_what_the_dispatch_does(any_database_url):
    """``known.verdict`` answers for ``dispatch._triage``: for each kind of job, the CLI's prediction and
    the dispatch's outcome agree (they would drift apart silently otherwise)."""
    engine = fleet_engine(any_database_url, {"g0": 4})
    try:
        ran = job(task_id="ran")
        assert _dispatch(engine, [ran]).placed
        end_attempt(engine, "ran")
        cases = {
            "copy": (Job.model_validate_json(ran.to_redis()), "dropped"),
            "reuse": (ran.model_copy(update={"data": {"other": 1}}), "refused"),
            "new": (job(task_id="new"), "placed"),
            "retry of nothing, bad id": (job(task_id="r/1", attempt=1), "invalid"),
        }
        for name, (j, expected) in cases.items():
            rows = transaction(engine, known_rows, task_ids=[j.task_id])
            said = verdict(rows.get(j.task_id), j)
            res = _dispatch(engine, [j], dispatcher_id="d2")
            outcome = next(k for k in ("dropped", "refused", "placed", "invalid") if getattr(res, k))
            assert outcome == expected, name
            if said is None:
                assert outcome == "placed", name
                continue
            assert outcome in _DISPATCH_OUTCOMES[said.outcome], name
            assert said.reason == getattr(res, outcome)[0][1], name
    finally:
        engine.dispose()


@pytest.mark.slow  # the run's Redis Cluster (formed once per session, a few seconds)
def test_requeue_on_a_redis_cluster_survives_a_crash_between_its_two_steps(
    gpuq, gpuq_env, redis_cluster: Cluster
):
    env = {"REDIS_URL": redis_cluster.url, "REDIS_CLUSTER": "true"}
    assert gpuq("db", "init").exit_code == 0
    keys = Keys(gpuq_env["REDIS_KEY_PREFIX"])
    qa, qb = gpuq_env["TASK_QUEUES"].split(",")
    rds = RedisCluster.from_url(redis_cluster.url)
    try:
        rds.rpush(keys.dead, letter(fresh(qa, "c1"), qa), letter(fresh(qb, "c2"), qb))
        # a requeue that pushed c1 and died before removing its entry (the two keys are in different slots)
        (first, _) = dead_requeue.read(rds, keys)
        planned = dead_requeue.plan(first, queues=[qa, qb], max_bytes=262144)
        assert isinstance(planned, dead_requeue.Requeue)
        assert dead_requeue.push_once(rds, keys, planned, mark_ttl=60)
        assert rds.llen(qa) == 1 and rds.llen(keys.dead) == 2
        # WHEN the operator runs it again, for both
        res = gpuq("queue", "requeue", "--all", **env)
        # THEN c1 is not pushed twice, its entry goes; c2 moves; all on a cluster, one slot per script
        assert res.exit_code == 0, res
        assert "(pushed by an earlier, interrupted requeue)" in res.stdout
        assert [Job.model_validate_json(x).task_id for x in rds.lrange(qa, 0, -1)] == ["c1"]
        assert [Job.model_validate_json(x).task_id for x in rds.lrange(qb, 0, -1)] == ["c2"]
        assert rds.llen(keys.dead) == 0
    finally:
        for key in (qa, qb, keys.dead):
            rds.delete(key)
        for key in rds.scan_iter(f"{gpuq_env['REDIS_KEY_PREFIX']}*"):
            rds.delete(key)
        rds.close()
