"""``python -m dispatcher`` says in one line what stops it from starting (issue 14): a store it cannot
reach (exit 3), a MySQL URL without the PyMySQL driver (exit 2), and ``--help`` prints usage (exit 0)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from dispatcher.testing import DispatcherProcess
from tests.dispatcher.harness import SECRET, free_port


def _run(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    # on loopback (the default): no API_TOKEN needed (issue 11)
    settings = {"CALLBACK_SECRET": SECRET, "CALLBACK_PORT": "0", **env}
    return DispatcherProcess(settings, workdir=tmp_path).run(*args)


@pytest.mark.parametrize(
    ("env", "code", "says"),
    [
        ({"DATABASE_URL": f"mysql+pymysql://root@127.0.0.1:{free_port()}/x"}, 3, "database"),
        ({"DATABASE_URL": "mysql://root@127.0.0.1:3306/x"}, 2, "mysql+pymysql"),
        ({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, 3, "Redis at 127.0.0.1"),
        # the server answers, the database is not there: said so (an outside trial read "unreachable ...
        # check that the server runs", while `gpuq` said "does not exist")
        (
            {"DATABASE_URL": "mysql+pymysql://root@127.0.0.1:3306/gpuq_never_created"},
            3,
            "does not exist: create",
        ),
    ],
)
@pytest.mark.slow  # 9 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_unreachable_store_or_wrong_driver_is_one_line(tmp_path, redis_url, env, code, says):
    run = _run(tmp_path, **{"REDIS_URL": redis_url, "DATABASE_URL": "sqlite:///d.db", **env})
    assert run.returncode == code, run.stderr
    lines = [line for line in run.stderr.splitlines() if not line.startswith("{")]  # JSON logs aside
    assert len(lines) == 1 and lines[0].startswith("gpuq dispatcher: ") and says in lines[0], run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.slow  # 9 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_help_prints_usage_without_settings(tmp_path):
    run = _run(tmp_path, "--help", CALLBACK_SECRET="")
    assert run.returncode == 0
    assert run.stdout.startswith("usage: python -m dispatcher") and "Exit codes" in run.stdout


@pytest.mark.slow  # 10 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_an_argument_is_refused_not_ignored(tmp_path, redis_url):
    """Before: ``python -m dispatcher --port 9000`` started on CALLBACK_PORT as if nothing was said (review
    of issue 14)."""
    run = _run(tmp_path, "--port", "9000", REDIS_URL=redis_url, DATABASE_URL="sqlite:///d.db")
    assert run.returncode == 2, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpuq dispatcher: takes no arguments (--port 9000)"), lines


@pytest.mark.parametrize("cluster_setting", ["true", "false"])
@pytest.mark.slow  # 15 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_a_redis_cluster_setting_that_does_not_match_the_redis_is_one_line(
    tmp_path, redis_url, redis_cluster, cluster_setting
):
    # GIVEN REDIS_CLUSTER=true against a plain Redis, or REDIS_CLUSTER=false against a cluster node. Before: a
    # RedisClusterException traceback, or the MOVED of the first heartbeat from inside uvicorn's lifespan.
    url = redis_url.rsplit("/", 1)[0] + "/0" if cluster_setting == "true" else redis_cluster.url
    run = _run(tmp_path, REDIS_URL=url, REDIS_CLUSTER=cluster_setting, DATABASE_URL="sqlite:///d.db")
    # THEN exit 2 (a setting to fix) and one line naming the variable
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1 and lines[0].startswith("gpuq dispatcher: REDIS_CLUSTER"), run.stderr
    assert "Traceback" not in run.stderr


def test_more_wait_replicas_than_the_redis_has_is_said_at_start(redis_url, caplog):
    # GIVEN REDIS_WAIT_REPLICAS=1 and a Redis without replicas: every push would be answered 503 (its job
    # queued all the same) and every hand-off wait its timeout; before, nothing at start said why
    from dispatcher.preflight import check_redis
    from dispatcher.settings import DispatcherSettings
    from producer.settings import load

    settings = load(
        DispatcherSettings, _env_file=None, redis_url=redis_url, callback_secret=SECRET, redis_wait_replicas=1
    )
    with caplog.at_level("WARNING", logger="gpuq.main"):
        check_redis(settings)
    said = [r.getMessage() for r in caplog.records if getattr(r, "action", None) == "config"]
    assert len(said) == 1 and "REDIS_WAIT_REPLICAS=1" in said[0] and "0 replica" in said[0], said
    caplog.clear()
    with caplog.at_level("WARNING", logger="gpuq.main"):
        check_redis(load(DispatcherSettings, _env_file=None, redis_url=redis_url, callback_secret=SECRET))
    assert not [r for r in caplog.records if getattr(r, "action", None) == "config"]


@pytest.mark.slow  # a process start: seconds on a loaded 2-core machine
def test_a_callback_port_held_by_another_process_is_refused_before_any_job_is_taken(
    tmp_path, redis_url, key_prefix
):
    # An outside trial: CALLBACK_PORT held by another process. uvicorn binds after its lifespan startup, which
    # started the dispatcher: 33 jobs went out naming that port for their callbacks (answered 404 by the
    # other process) and their slots stayed busy for a lease after the process exited.

    import redis

    from producer.job import Job
    from producer.keys import queue_key

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    rds = redis.Redis.from_url(redis_url)
    queue = f"{key_prefix}q"
    rds.rpush(queue_key(queue), Job(task_id="held-port-1", type="t", queue=queue, data={}).to_redis())
    try:
        run = _run(
            tmp_path,
            REDIS_URL=redis_url,
            REDIS_KEY_PREFIX=key_prefix,
            TASK_QUEUES=queue,
            DATABASE_URL="sqlite:///d.db",
            GPU_ENDPOINTS=f"g0=http://127.0.0.1:{free_port()}/infer",
            CALLBACK_HOST="127.0.0.1",
            CALLBACK_PORT=str(port),
        )
    finally:
        holder.close()
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1 and f"CALLBACK_PORT={port}" in lines[0] and "another process" in lines[0], (
        run.stderr
    )
    assert rds.llen(queue_key(queue)) == 1  # the job was not taken
    assert not (tmp_path / "d.db").exists()  # nor anything else done
    rds.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "localhost", "::", "::1"])
def test_the_callback_sockets_are_those_uvicorn_would_bind(host):
    # listen() binds before the server starts (see above): one socket per address the host names, IPv6 ones
    # IPv6-only, as asyncio's create_server (uvicorn's own binding) does.

    from dispatcher.preflight import listen
    from dispatcher.settings import DispatcherSettings
    from producer.settings import load

    if ":" in host and not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    settings = load(
        DispatcherSettings, _env_file=None, callback_secret=SECRET, callback_host=host, callback_port=0
    )
    try:
        socks = listen(settings)
    except Exception as exc:
        if ":" in host and "Cannot assign" in str(exc) + str(getattr(exc, "message", "")):
            pytest.skip(f"IPv6 {host} not configured here")
        raise
    try:
        wanted = {
            i[4][0] for i in socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        }
        assert {s.getsockname()[0] for s in socks} == wanted
        for s in socks:
            if s.family == socket.AF_INET6:
                assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        for s in socks:
            s.close()


def test_the_listen_address_is_logged_as_a_url_writes_it():
    from dispatcher.serve import _address

    assert _address("::1", 8000) == "[::1]:8000"  # "::1:8000" read as an address of its own
    assert _address("127.0.0.1", 8000) == "127.0.0.1:8000"


@pytest.mark.slow  # a dispatcher in-process and one process refused: ~10 s on a loaded 2-core machine
def test_a_dispatcher_of_another_database_on_the_same_redis_is_refused(
    tmp_path, redis_url, key_prefix, database_url
):
    """An outside trial: a second machine that forgot DATABASE_URL (embedded SQLite), with the same Redis, key
    prefix and GPUs, started without a word and put 8 jobs on 4-slot GPUs (each dispatcher books the slots in
    its own tables). It is refused now, naming the dispatcher and both databases; one on the same database,
    reached by another spelling of its URL, is not."""
    import asyncio

    import redis
    from sqlalchemy.engine import make_url

    from dispatcher.db.engine import make_engine
    from dispatcher.preflight import check_one_database
    from dispatcher.testing import in_process
    from simgpu.fleet import SimFleet
    from tests.dispatcher.test_refused_retry import _settings

    fleet = SimFleet(gpus=1, token="gpu-bearer-token", seed=7).start()
    queue = f"{key_prefix}q"
    first = _settings(database_url, redis_url, key_prefix, queue, fleet, dispatcher_id="first")
    same_db_other_spelling = (  # mariadb+pymysql:// is "mariadb" to SQLAlchemy: refused once (a review)
        make_url(database_url)
        .set(drivername="mariadb+pymysql", host="localhost")
        .render_as_string(hide_password=False)
    )
    second = _settings(same_db_other_spelling, redis_url, key_prefix, queue, fleet, dispatcher_id="second")
    rds = redis.Redis.from_url(redis_url)
    runs: list[Any] = []

    async def main() -> None:
        async with in_process(first):
            engine = make_engine(second.db_url())
            try:
                check_one_database(second, engine)  # the same database: no problem
            finally:
                engine.dispose()
            runs.append(
                await asyncio.to_thread(
                    _run,
                    tmp_path,
                    REDIS_URL=redis_url,
                    REDIS_KEY_PREFIX=key_prefix,
                    TASK_QUEUES=queue,
                    DATABASE_URL="sqlite:///d.db",
                    GPU_ENDPOINTS=f"g0={fleet.url('g0')}",
                )
            )

    try:
        asyncio.run(main())
    finally:
        fleet.stop()
    (run,) = runs
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1, run.stderr
    name = make_url(database_url).database
    assert (
        "dispatcher first works on this Redis" in lines[0] and f"mysql:{name} (gpuq schema of" in lines[0]
    ), lines
    assert f"sqlite:{tmp_path / 'd.db'}" in lines[0], lines
    assert rds.hget(f"{key_prefix}dispatchers:databases", "first") is None  # retired when it stopped
    rds.close()


@pytest.mark.slow  # a dispatcher process held in its start by a Redis that never answers
def test_ctrl_c_while_starting_is_one_line_not_a_traceback(tmp_path):
    """An outside trial: Ctrl-C in the first second of `python -m dispatcher` (preflight, the schema check)
    printed a KeyboardInterrupt traceback and exit -2; later it stopped cleanly."""
    import signal

    from dispatcher.testing import process_env

    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers: a start that waits
    env = process_env(
        {
            "CALLBACK_SECRET": SECRET,
            "CALLBACK_PORT": "0",
            "DATABASE_URL": f"sqlite:///{tmp_path}/d.db",
            "REDIS_URL": f"redis://127.0.0.1:{silent.getsockname()[1]}/0",
            "STATE_DIR": str(tmp_path / "state"),
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "dispatcher"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # its start has begun: the embedded-mode warning comes before the checks
            if "embedded mode" in line:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        silent.close()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().endswith(
        "gpuq dispatcher: interrupted while starting; no job was taken"
    )


def _catches(pid: int, signum: int) -> bool:
    """Whether the dispatcher process has a handler for the signal (its SigCgt mask in /proc): Python's own
    handler for SIGINT is the first thing ``python -m dispatcher`` installs. Not before the pid is the
    dispatcher's: the wrapper that execs it catches SIGINT before it ignores it."""
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        if b"-m\0dispatcher" not in cmdline.read():
            return False
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigint_in_the_imports_of_a_background_start_stops_it_in_one_line(tmp_path):
    """An outside trial: `python -m dispatcher &` in a script inherits SIGINT ignored, and a SIGINT in its
    first ~0.8 s (the imports) was lost: the dispatcher started anyway, while the same SIGINT a second later
    stopped it. Sent as soon as the process catches SIGINT (long before the imports end), it now stops the
    start with one line and exit 130, no traceback from inside a library."""
    import signal

    from dispatcher.testing import process_env

    silent = socket.create_server(("127.0.0.1", 0))  # a start that got past the imports would wait here
    env = process_env(
        {
            "CALLBACK_SECRET": SECRET,
            "CALLBACK_PORT": "0",
            "DATABASE_URL": f"sqlite:///{tmp_path}/d.db",
            "REDIS_URL": f"redis://127.0.0.1:{silent.getsockname()[1]}/0",
            "STATE_DIR": str(tmp_path / "state"),
        }
    )
    # as a shell's background job: SIGINT ignored, kept across exec (same pid)
    ignoring = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); " + (
        "os.execv(sys.executable, [sys.executable, '-m', 'dispatcher'])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", ignoring],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not _catches(proc.pid, signal.SIGINT):
            assert proc.poll() is None and time.monotonic() < deadline, "SIGINT never caught while starting"
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        silent.close()
    assert proc.returncode == 130, err
    assert err == "gpuq dispatcher: interrupted while starting; no job was taken\n", err
    assert out == ""


def test_two_dispatchers_of_two_databases_starting_together_do_not_both_start(
    tmp_path, redis_url, key_prefix, database_url
):
    """A review started two dispatchers on different databases at the same moment: each looked before the
    other's first heartbeat, and both ran. A start says its database before it looks, until its heartbeat
    does: the second to look is refused, and a refused start leaves no mark (nor one whose start failed)."""
    import redis

    from dispatcher.db.engine import init_schema, make_engine
    from dispatcher.preflight import StartProblem, check_one_database, unpublish_start
    from dispatcher.settings import DispatcherSettings

    def settings(db: str, who: str) -> DispatcherSettings:
        return DispatcherSettings(
            database_url=db,
            redis_url=redis_url,
            redis_key_prefix=key_prefix,
            callback_secret=SECRET,
            dispatcher_id=who,
        )

    first, second = settings(database_url, "first"), settings(f"sqlite:///{tmp_path}/d.db", "second")
    engines = [make_engine(first.db_url()), make_engine(second.db_url())]
    rds = redis.Redis.from_url(redis_url)
    try:
        for engine in engines:
            init_schema(engine)
        assert check_one_database(first, engines[0])  # no heartbeat yet: it is still starting
        with pytest.raises(StartProblem, match="dispatcher first is starting on this Redis") as refused:
            check_one_database(second, engines[1])
        # a start killed before its heartbeat leaves its mark: the refusal says how long (at most a minute)
        lapse = int(refused.value.message.rsplit("its mark lapses within ", 1)[1].split(" s)")[0])
        assert 50 <= lapse <= 60, refused.value.message
        assert rds.hget(f"{key_prefix}dispatchers:databases", "second") is None  # refused: no mark left
        # the first start fails further on (its port, its id...): its mark goes, the second may start
        unpublish_start(first)
        assert check_one_database(second, engines[1])
    finally:
        for engine in engines:
            engine.dispose()
        rds.close()


def test_a_signal_before_the_dispatcher_is_made_starts_none_and_takes_nothing(
    tmp_path, redis_url, key_prefix, database_url, rds
):
    """An outside trial: a SIGINT 12 ms after "listening on" (uvicorn's handlers in place, the dispatcher not
    yet made) let the start go on: 4 jobs were taken and sent, then the process stopped without draining
    (exit 0), their slots held until the lease and the jobs run again. Now the start makes no dispatcher:
    nothing is taken, and the exit is 130 with the one line."""
    import signal

    from dispatcher.db.engine import make_engine
    from dispatcher.inproc import _ThreadServer
    from dispatcher.preflight import listen, preflight
    from dispatcher.serve import _exit_code, build_server
    from dispatcher.settings import DispatcherSettings
    from tests.dispatcher.harness import push_jobs

    queue = f"q-{key_prefix.strip(':')}"
    settings = DispatcherSettings(
        database_url=database_url,
        redis_url=redis_url,
        redis_key_prefix=key_prefix,
        callback_secret=SECRET,
        callback_host="127.0.0.1",
        callback_port=0,
        task_queues=queue,
        gpu_endpoints="g0=http://127.0.0.1:9/g0",
        state_dir=str(tmp_path / "state"),
    )
    engine = make_engine(settings.db_url())
    ids = push_jobs(rds, queue, 3)
    socks = listen(settings)
    claimed = preflight(settings, engine)
    try:
        server, holder = build_server(settings, engine, 64, server_cls=_ThreadServer)
        server.handle_exit(signal.SIGINT, None)  # as the signal does, once uvicorn's handlers are in place
        server.run(sockets=socks)  # returns: nothing to serve
        assert "d" not in holder
        assert _exit_code(server, None) == 130
        assert [job["task_id"] for job in map(json.loads, rds.lrange(queue, 0, -1))] == ids  # none taken
    finally:
        for sock in socks:
            sock.close()
        if claimed is not None:
            claimed.close()
        rds.delete(queue)
        engine.dispose()
