"""``gpuq`` against real MariaDB and Redis: GPUs, tasks, queues, submit, status, and its errors."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
import uuid

import pytest
import redis
from sqlalchemy import text

from dispatcher.db.cancels import release_cancelled
from dispatcher.db.deferred import due_deferred
from dispatcher.db.dispatch import dispatch
from dispatcher.db.engine import make_engine, transaction, utcnow
from dispatcher.db.schema import SCHEMA_VERSION
from producer.job import Job
from producer.keys import Keys, Priority, queue_key
from tests.dispatcher.harness import ROOT
from tests.dispatcher.helpers import end_attempt, place


@pytest.fixture
def stores(gpuq, gpuq_env):
    """The test's stores, with the schema made by ``gpuq db init`` and two GPUs added with ``gpuq gpu add``."""
    assert gpuq("db", "init").exit_code == 0
    assert gpuq("gpu", "add", "g0", "http://127.0.0.1:9/g0").exit_code == 0
    assert gpuq("gpu", "add", "g1", "http://127.0.0.1:9/g1", "--slots", "2", "--pool", "embed").exit_code == 0
    engine = make_engine(gpuq_env["DATABASE_URL"], pool_size=2)
    rds = redis.Redis.from_url(gpuq_env["REDIS_URL"])
    yield engine, rds
    for key in rds.scan_iter(f"{gpuq_env['REDIS_KEY_PREFIX']}*"):
        rds.delete(key)
    rds.close()
    engine.dispose()


def run_one(engine, queue: str, pool: str = "default") -> Job:
    """Record a job as a dispatcher would and give it a slot (the dispatcher's own store function)."""
    job = Job(task_id=str(uuid.uuid4()), type="start_transcribe", queue=queue, data={"k": 1})
    res = transaction(
        engine,
        dispatch,
        items=[(job, pool)],
        dispatcher_id="test",
        lease_seconds=60,
        max_attempts=1,
        now=utcnow(),
    )
    assert len(res.placed) == 1
    return job


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("│").split("│")]


def row(engine, task_id: str):
    with engine.connect() as conn:
        return conn.execute(text("SELECT * FROM tasks WHERE task_id = :t"), {"t": task_id}).one()


@pytest.mark.slow  # 6 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_gpu_add_list_drain_activate_remove(gpuq, stores):
    engine, _ = stores
    listed = json.loads(gpuq("gpu", "list", "--json").stdout)
    assert {(g["gpu_id"], g["pool"], g["slots"], g["state"]) for g in listed} == {
        ("g0", "default", 4, "active"),
        ("g1", "embed", 2, "active"),
    }
    # a second add changes the URL and slot count of the same GPU
    res = gpuq("gpu", "add", "g1", "http://127.0.0.1:9/new", "--slots", "3", "--pool", "embed")
    assert res.exit_code == 0 and "updated GPU g1" in res.stdout
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM slots WHERE gpu_id = 'g1'")).scalar_one() == 3
    # an add of a known GPU without --pool and --slots keeps them (an outside trial: a provisioning script's
    # re-run moved a 3-slot GPU of pool embed to the default pool with SLOTS_PER_GPU slots, silently)
    res = gpuq("gpu", "add", "g1", "http://127.0.0.1:9/new", "--no-probe")
    assert res.exit_code == 0 and "in pool embed with 3 slots (pool and slots kept" in res.stdout, res.stdout
    listed = {g["gpu_id"]: g for g in json.loads(gpuq("gpu", "list", "--json").stdout)}
    assert (listed["g1"]["pool"], listed["g1"]["slots"]) == ("embed", 3)

    job = run_one(engine, "q", pool="embed")
    res = gpuq("gpu", "drain", "g1")
    assert res.exit_code == 0 and "1 job(s) still running" in res.stdout
    # a busy GPU is not removed, and keeps all its slots
    res = gpuq("gpu", "remove", "g1")
    assert res.exit_code == 1
    assert res.stderr.strip() == (
        "gpuq: GPU g1 still runs 1 job(s): `gpuq gpu drain g1`, wait until gpuq gpu list shows it idle, "
        "then remove it"
    )
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM slots WHERE gpu_id = 'g1'")).scalar_one() == 3
    end_attempt(engine, job.task_id)
    assert gpuq("gpu", "remove", "g1").exit_code == 0
    assert [g["gpu_id"] for g in json.loads(gpuq("gpu", "list", "--json").stdout)] == ["g0"]
    assert gpuq("gpu", "activate", "g0").stdout.strip() == "GPU g0 active"
    table = gpuq("gpu", "list").stdout
    assert "g0" in table and "0/4" in table


@pytest.mark.slow  # 5 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_gpu_drain_wait_returns_once_the_slots_are_empty(gpuq, stores):
    """What a GPU pod's preStop runs before Kubernetes stops it: no running job may be killed."""
    engine, _ = stores
    job = run_one(engine, "q")  # on g0
    # while the job runs, --wait does not return success: at its timeout it fails, naming what still runs
    res = gpuq("gpu", "drain", "g0", "--wait", "--timeout", "0.3")
    assert res.exit_code == 1
    assert res.stderr.strip() == "gpuq: GPU g0 still runs 1 job(s) after 0.3 s of draining"
    outcome: list = []
    waiter = threading.Thread(target=lambda: outcome.append(gpuq("gpu", "drain", "g0", "--wait")))
    waiter.start()
    end_attempt(engine, job.task_id)
    waiter.join(timeout=30)
    assert not waiter.is_alive(), "drain --wait did not notice the slot was freed"
    (res,) = outcome
    assert res.exit_code == 0 and res.stdout.strip().endswith("GPU g0 drained: no job running"), res
    states = {g["gpu_id"]: g["state"] for g in json.loads(gpuq("gpu", "list", "--json").stdout)}
    assert states["g0"] == "draining"  # it stays out of rotation until activated or removed
    # an idle GPU drains at once
    assert gpuq("gpu", "drain", "g1", "--wait", "--timeout", "0").exit_code == 0


@pytest.mark.slow  # 6 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_gpu_errors_are_one_line_with_a_status(gpuq, stores):
    for args, code, message in [
        (("gpu", "drain", "nope"), 1, "gpuq: no GPU named 'nope' (gpuq gpu list shows them)"),
        (  # was ignored without a word, and the GPU drained (an outside trial)
            ("gpu", "drain", "g0", "--timeout", "5"),
            2,
            "gpuq: --timeout only applies with --wait: `gpuq gpu drain NAME --wait --timeout S`",
        ),
        (("gpu", "remove", "nope"), 1, "gpuq: no GPU named 'nope' (gpuq gpu list shows them)"),
        (("gpu", "add", "g9", "ftp://x"), 2, "gpuq: 'default:g9=ftp://x': 'ftp://x' is not an http(s) URL"),
    ]:
        res = gpuq(*args)
        assert (res.exit_code, res.stderr.strip()) == (code, message), res
    assert {g["gpu_id"]: g["state"] for g in json.loads(gpuq("gpu", "list", "--json").stdout)}[
        "g0"
    ] == "active"
    res = gpuq("gpu", "add", "g9", "http://x", "--slots", "0")
    assert res.exit_code == 2 and "--slots" in res.stderr


@pytest.mark.slow  # 6 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_submit_validates_like_the_producer_and_is_idempotent(gpuq, gpuq_env, stores):
    _, rds = stores
    qa, qb = gpuq_env["TASK_QUEUES"].split(",")
    res = gpuq("submit", "--type", "start_transcribe", "--data", '{"s3_key": "a.wav"}')
    assert res.exit_code == 0, res
    task_id = res.stdout.strip()
    (raw,) = rds.lrange(qa, 0, -1)
    job = Job.model_validate_json(raw)
    assert (job.task_id, job.type, job.data, job.queue, job.attempt) == (
        task_id,
        "start_transcribe",
        {"s3_key": "a.wav"},
        qa,
        0,
    )
    # priority and queue choose the list; a repeated task id is not pushed twice
    for _ in range(2):
        res = gpuq("submit", "-t", "embed", "-q", qb, "-p", "high", "--task-id", "fixed-1")
        assert res.exit_code == 0 and res.stdout.strip() == "fixed-1"
    assert "not pushed again" in res.stderr
    assert rds.llen(queue_key(qb, Priority.HIGH)) == 1
    # bad input: exit 2, one line naming the field, nothing enqueued
    for args, message in [
        (("-t", "bad type"), "gpuq: type: String should match pattern"),
        (("-t", "x", "-d", "[1"), "gpuq: --data is not JSON"),
        (("-t", "x", "-d", "[1]"), "gpuq: data: Input should be a valid dictionary"),
        (("-t", "x", "-q", "elsewhere"), "gpuq: queue: 'elsewhere' is not a queue gpuq serves"),
    ]:
        res = gpuq("submit", *args)
        assert res.exit_code == 2, res
        assert res.stderr.startswith(message) and res.stderr.count("\n") == 1, res
    assert gpuq("submit", "-t", "x", "-p", "urgent").exit_code == 2
    assert rds.llen(qa) == 1


def test_submit_under_the_id_of_a_known_task_pushes_nothing_and_says_why(gpuq, gpuq_env, stores):
    # GIVEN a task the dispatcher recorded (its idempotency mark long gone: the database remembers it)
    engine, rds = stores
    qa, _ = gpuq_env["TASK_QUEUES"].split(",")
    known = run_one(engine, qa)
    # WHEN a different task is submitted under its id
    res = gpuq("submit", "-t", "embed", "--task-id", known.task_id)
    # THEN it is refused at once (the dispatcher would only dead-letter it), naming the task and the way out
    assert res.exit_code == 1, res
    assert f"task id '{known.task_id}' is already used by another task (processing" in res.stderr
    assert "gpuq task retry" in res.stderr
    # and the very same task submitted again is a no-op, as a repeated submit is
    res = gpuq("submit", "-t", known.type, "-d", json.dumps(known.data), "--task-id", known.task_id)
    assert res.exit_code == 0 and res.stdout.strip() == known.task_id, res
    assert "exists already (processing): not pushed again" in res.stderr
    # and nothing was pushed either time
    assert rds.llen(qa) == 0 and rds.llen(Keys(gpuq_env["REDIS_KEY_PREFIX"]).dead) == 0


@pytest.mark.slow  # 5 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_status_shows_gpus_by_pool_queues_and_waiting(gpuq, gpuq_env, stores):
    engine, rds = stores
    qa, _ = gpuq_env["TASK_QUEUES"].split(",")
    run_one(engine, qa)
    run_one(engine, qa)
    for _ in range(3):
        assert gpuq("submit", "-t", "x").exit_code == 0
    assert gpuq("submit", "-t", "x", "-p", "low").exit_code == 0
    rds.rpush(Keys(gpuq_env["REDIS_KEY_PREFIX"]).dead, json.dumps({"raw": "x", "reason": "not JSON"}))

    out = gpuq("status").stdout
    assert "slots busy 2/6" in out and "waiting 4" in out
    assert out.index("pool default") < out.index("g0") < out.index("pool embed") < out.index("g1")
    g0 = next(line for line in out.splitlines() if " g0 " in line)
    assert "██··" in g0 and "2/4" in g0 and "yes" in g0
    assert cells(next(line for line in out.splitlines() if qa in line))[:4] == [qa, "0", "3", "1"]
    assert "dead letters 1" in out
    # --watch refreshes in place; --count bounds it
    res = gpuq("status", "--watch", "--interval", "0.1", "--count", "2")
    assert res.exit_code == 0 and res.stdout.count("slots busy 2/6") >= 2


@pytest.mark.slow  # 8 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_task_show_cancel_retry(gpuq, gpuq_env, stores):
    engine, rds = stores
    qa, _ = gpuq_env["TASK_QUEUES"].split(",")
    job = run_one(engine, qa)
    shown = json.loads(gpuq("task", "show", job.task_id).stdout)
    assert (shown["state"], shown["gpu_id"], shown["attempts"]) == ("processing", "g0", 1)

    # cancelling a running task ends it now, keeps its slot until the GPU confirms, and wakes the
    # dispatchers so that the one that sent it asks the GPU to stop
    wake = rds.pubsub()
    wake.subscribe(Keys(gpuq_env["REDIS_KEY_PREFIX"]).wake)
    # (a get_message timeout is how long to wait at most, not a speed asked of the machine)
    assert wake.get_message(timeout=10)["type"] == "subscribe"
    res = gpuq("task", "cancel", job.task_id)
    assert res.stdout.strip() == (
        f"task {job.task_id} cancelled: its GPU is asked to stop; the slot is freed when it confirms"
    )
    assert wake.get_message(timeout=10)["data"] == b"cancel"
    wake.close()
    assert row(engine, job.task_id).state == "cancelled"
    held = "SELECT COUNT(*) FROM slots WHERE task_id IS NOT NULL"
    with engine.connect() as conn:
        assert conn.execute(text(held)).scalar_one() == 1
    # while the slot is held the task cannot be retried (a task holds one slot at most)
    res = gpuq("task", "retry", job.task_id)
    assert res.exit_code == 1 and "has not confirmed the cancel" in res.stderr
    # the GPU confirms: the slot is free
    assert transaction(engine, release_cancelled, task_id=job.task_id, attempt=1)
    with engine.connect() as conn:
        assert conn.execute(text(held)).scalar_one() == 0
    # its GPU's late callback changes nothing
    late = end_attempt(engine, job.task_id)
    assert late.code == "stale"
    # what was asked holds: exit 0, as the HTTP route answers 200 applied:false (an outside trial)
    again = gpuq("task", "cancel", job.task_id)
    assert again.exit_code == 0 and again.stdout.strip() == f"task {job.task_id} was already cancelled", again

    # retry: back to retrying now, one more attempt allowed, and due for a dispatcher
    res = gpuq("task", "retry", job.task_id, "--attempts", "2")
    assert res.exit_code == 0 and "up to 3 attempts" in res.stdout
    r = row(engine, job.task_id)
    assert (r.state, r.max_attempts, r.finished_at) == ("retrying", 3, None)
    due = transaction(engine, due_deferred, now=utcnow())
    assert [(j.task_id, j.attempt) for j in due] == [(job.task_id, 1)]
    res = gpuq("task", "retry", job.task_id)
    assert res.exit_code == 1
    assert res.stderr.strip() == (
        f"gpuq: task {job.task_id} cannot be retried: it is retrying; only failed or cancelled tasks are retried"
    )

    # a finished task is not cancelled; unknown ids are refused by show and retry
    done = run_one(engine, qa)
    end_attempt(engine, done.task_id)
    res = gpuq("task", "cancel", done.task_id)
    assert (res.exit_code, res.stderr.strip()) == (
        1,
        f"gpuq: task {done.task_id} is already finished: nothing to cancel",
    )
    assert gpuq("task", "show", "nope").exit_code == 1
    assert gpuq("task", "retry", "nope").stderr.strip() == "gpuq: unknown task 'nope'"
    # and cancel: a typo must not leave a mark that silently drops a job submitted later under that id
    res = gpuq("task", "cancel", "nope")
    assert (res.exit_code, res.stderr.strip()) == (
        1,
        "gpuq: unknown task 'nope': not in the database nor waiting in Redis; nothing to cancel",
    )
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM tasks WHERE task_id = 'nope'")).scalar_one() == 0


@pytest.mark.slow  # 5 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_cancel_before_a_dispatcher_took_it_means_it_never_runs(gpuq, gpuq_env, stores):
    engine, _ = stores
    task_id = gpuq("submit", "-t", "x").stdout.strip()
    res = gpuq("task", "cancel", task_id)
    assert res.stdout.strip() == f"task {task_id} cancelled: it will not run"
    # when a dispatcher takes the job later, the store drops it
    qa, _ = gpuq_env["TASK_QUEUES"].split(",")
    job = Job(task_id=task_id, type="x", queue=qa)
    # as the dispatcher does when the plain insert meets a known task id
    out = place(engine, [job], dispatcher_id="t", check_existing=True)
    assert out.placed == [] and len(out.dropped) == 1
    # and it cannot be retried: its job was never stored
    assert "submit it again" in gpuq("task", "retry", task_id).stderr


@pytest.mark.slow  # 4 s on a loaded 2-core machine (make test-fast stays under a minute)
def _old_job(queue: str, minutes: int) -> str:
    then = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=minutes, seconds=5)
    return Job(
        task_id=str(uuid.uuid4()), type="x", queue=queue, priority=Priority.LOW, enqueued_at=then
    ).to_redis()


def test_queue_list_and_purge_dead(gpuq, gpuq_env, stores):
    _, rds = stores
    keys = Keys(gpuq_env["REDIS_KEY_PREFIX"])
    assert gpuq("submit", "-t", "x", "-p", "high").exit_code == 0
    for i in range(2):
        rds.rpush(keys.dead, json.dumps({"raw": f"junk{i}", "reason": "not JSON", "queue": "qa", "at": "t"}))
    qa, _ = gpuq_env["TASK_QUEUES"].split(",")
    # a job a dispatcher took (its ready buffer), not started: its own row, with its wait
    rds.sadd(keys.dispatchers, "d1")
    rds.rpush(keys.proc(qa, "d1"), f"{queue_key(qa, Priority.LOW)}\n" + _old_job(qa, minutes=3))
    out = gpuq("queue", "list").stdout
    assert any(f"{{{qa}}}:high" in line and " 1 " in line for line in out.splitlines()), out
    assert any("dead letters" in line and " 2 " in line for line in out.splitlines()), out
    assert any(
        "taken, not started" in line and " 1 " in line and "3m" in line for line in out.splitlines()
    ), out
    # the low priority's oldest wait is that job's (it waits for a slot, SPEC §4), though its list is empty
    assert any(f"{{{qa}}}:low" in line and " 0 " in line and "3m" in line for line in out.splitlines()), out

    res = gpuq("queue", "purge", "--dead")
    assert res.exit_code == 1 and "run again with --yes" in res.stderr and "junk0" in res.stdout
    assert rds.llen(keys.dead) == 2
    res = gpuq("queue", "purge", "--dead", "--yes")
    assert res.exit_code == 0 and "junk0" in res.stdout and "junk1" in res.stdout
    assert f"removed 2 dead letter(s) from {keys.dead}" in res.stdout
    assert rds.llen(keys.dead) == 0
    assert gpuq("queue", "purge").exit_code == 2


def test_db_init_is_idempotent_and_works_on_sqlite(gpuq, tmp_path):
    url = f"sqlite:///{tmp_path}/gpuq.db"
    for _ in range(2):
        res = gpuq("db", "init", DATABASE_URL=url)
        assert res.exit_code == 0 and res.stdout.startswith(
            f"schema version {SCHEMA_VERSION} ready in sqlite:///"
        )
    assert gpuq("gpu", "add", "g0", "http://h:1/x", DATABASE_URL=url).exit_code == 0
    assert gpuq("sql", "gpu_load", DATABASE_URL=url).exit_code == 0
    res = gpuq("sql", "running_by_age", DATABASE_URL=url)
    assert res.exit_code == 2 and "MySQL SQL" in res.stderr


def console_script(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The installed ``gpuq`` entry point in a fresh process, with only the given settings."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REDIS", "DATABASE", "DB_", "CALLBACK", "TASK"))
    }
    code = "import sys; from dispatcher.cli import main; sys.argv[0] = 'gpuq'; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**base, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT / "tests",  # no .env there
        check=False,
    )


@pytest.mark.slow  # a dozen CLI processes, each waiting for a store that does not answer
def test_unreachable_stores_and_bad_settings_exit_nonzero_without_traceback(gpuq_env, tmp_path):
    db = gpuq_env["DATABASE_URL"]
    for args in (("gpu", "list"), ("sql", "gpu_load")):  # the seed's query said "(1146, ...)", exit 2
        res = console_script(*args, DATABASE_URL=db)
        assert (res.returncode, res.stderr) == (
            3,
            f"gpuq: database {db} has no gpuq tables yet: run `gpuq db init`\n",
        ), args
    assert console_script("db", "init", DATABASE_URL=db).returncode == 0
    cases = [
        (
            ("status",),
            {"DATABASE_URL": db, "REDIS_URL": "redis://127.0.0.1:1/0"},
            3,
            "gpuq: Redis at 127.0.0.1:1 is unreachable: ",
        ),
        (
            ("gpu", "list"),
            {"DATABASE_URL": "mysql+pymysql://root:secret-pw@127.0.0.1:1/x"},
            3,
            "gpuq: database mysql+pymysql://root:***@127.0.0.1:1/x is unreachable: ",
        ),
        (("gpu", "list"), {"DATABASE_URL": "postgres://x"}, 2, "gpuq: DATABASE_URL: Value error, must be a"),
        (  # a MySQL database not created yet: said so, and how (an outside trial read "unreachable")
            ("db", "init"),
            {"DATABASE_URL": db.rsplit("/", 1)[0] + "/gpuq_never_created"},
            3,
            f"gpuq: database {db.rsplit('/', 1)[0]}/gpuq_never_created does not exist: create it",
        ),
        (  # an empty embedded database: the same words as MySQL's (it said "unreachable: no such table")
            ("status",),
            {"DATABASE_URL": f"sqlite:///{tmp_path}/empty.db"},
            3,
            f"gpuq: database sqlite:///{tmp_path}/empty.db has no gpuq tables yet: run `gpuq db init`",
        ),
        (  # none at all (gpuq run where no dispatcher ran): said, and none left behind (a trial found one)
            ("status",),
            {"DATABASE_URL": f"sqlite:///{tmp_path}/nowhere/gpuq.db"},
            3,
            f"gpuq: no embedded database at {tmp_path}/nowhere/gpuq.db: no dispatcher has run from here",
        ),
        (("task", "show"), {}, 2, ""),
        (("nope",), {}, 2, ""),
    ]
    (tmp_path / "empty.db").touch()
    for args, env, code, start in cases:
        res = console_script(*args, **env)
        assert res.returncode == code, (args, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr + res.stdout
        assert res.stderr.startswith(start), res.stderr
        if start:
            assert res.stderr.count("\n") == 1 and "secret-pw" not in res.stderr
    assert not (tmp_path / "nowhere").exists()
    # the operator's environment does not need the dispatcher's CALLBACK_SECRET
    res = console_script("sql", "--list")
    assert res.returncode == 0 and "gpu_load" in res.stdout


@pytest.mark.slow  # a CLI process per command group
def test_help_shows_no_rest_markup():
    """The help comes from docstrings that mark code as ``this``; an outside trial read the backticks."""
    for args in (
        ("gpu", "--help"),
        ("gpu", "add", "--help"),
        ("task", "--help"),
        ("queue", "list", "--help"),
    ):
        res = console_script(*args)
        assert res.returncode == 0 and "Usage" in res.stdout, (args, res.stderr)
        assert "``" not in res.stdout, args
