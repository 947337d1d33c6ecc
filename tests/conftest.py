"""Shared fixtures: every test run gets its own MariaDB database and its own Redis db and key prefix.

The suite always talks to the real servers on loopback (``make test`` starts them when they are missing).
A server that does not answer fails the run: a run that silently skipped its store tests would prove nothing.

``make test`` runs the suite on several pytest-xdist workers (most of a test's time is waiting on processes,
not CPU). Each worker is a process of its own: it claims its own Redis db (the marker names its pid) and its
tests create their own MariaDB databases, exactly as a run without xdist does, so tests in different workers
share nothing but the servers. A test that needs the whole machine to itself is marked ``exclusive``: it
starts once every running test has ended, and no other test starts until it has ended (``_RunLock``).
Tests that must share a worker (one reference-model process for all their tests) are listed in
``SAME_WORKER_MODULES``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import IO, Any

import pymysql
import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from tests.redis_cluster import redis_cluster  # noqa: F401 - a fixture, for the cluster tests

REDIS_HOST = os.environ.get("GPUQ_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("GPUQ_TEST_REDIS_PORT", "6379"))
MYSQL_HOST = os.environ.get("GPUQ_TEST_MYSQL_HOST", "127.0.0.1")
MYSQL_PORT = int(os.environ.get("GPUQ_TEST_MYSQL_PORT", "3306"))
MYSQL_USER = os.environ.get("GPUQ_TEST_MYSQL_USER", "root")
MYSQL_PASSWORD = os.environ.get("GPUQ_TEST_MYSQL_PASSWORD", "")

RUN_ID = uuid.uuid4().hex[:8]  # per process: each xdist worker has its own, and so its own databases

# In-process dispatchers keep their journals of sent requests (dispatcher/sent_journal.py) in a folder of this
# worker's, not in the checkout's .gpuq/; dispatcher processes keep theirs in their own working directory.
os.environ.setdefault("STATE_DIR", tempfile.mkdtemp(prefix=f"gpuq-state-{RUN_ID}-"))

# Hypothesis profiles, chosen with HYPOTHESIS_PROFILE (`make test`: ci, `make fuzz`: fuzz).
# - ci: the same examples on every run and every clone (derandomized, no example database), so a red run is
#   a change in the code, never the luck of the draw; a failure prints the blob that reproduces it.
# - dev / fuzz: random exploration with many more examples, remembering failures in .hypothesis/; what they
#   find becomes an @example or a plain regression test, so the ci suite grows from exploration.
# No deadline and no too_slow check anywhere: on a loaded 2-core machine both fail on speed, not on behaviour.
# Tests set budgets with ``scaled(n)``: n examples under ci, proportionally more under dev and fuzz.
_QUIET = [HealthCheck.too_slow]
settings.register_profile(
    "ci", derandomize=True, database=None, print_blob=True, deadline=None, suppress_health_check=_QUIET
)
settings.register_profile(
    "dev",
    max_examples=500,
    database=DirectoryBasedExampleDatabase(".hypothesis/examples"),
    print_blob=True,
    deadline=None,
    suppress_health_check=_QUIET,
)
settings.register_profile("fuzz", settings.get_profile("dev"), max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def scaled(examples: int) -> int:
    """A test's example budget under the loaded profile: ``examples`` under ci (100 by default)."""
    return max(1, examples * settings.default.max_examples // 100)


class _RunLock:
    """Exclusive tests against all others, across the xdist workers of one run: a reader-writer lock on two
    files in the run's shared temp folder. Every test holds ``lock`` shared; an ``exclusive`` one holds it
    alone. The ``gate`` is taken by every test on its way in (and kept by an exclusive test until it ends),
    so a waiting exclusive test is not starved by the other workers' tests starting one after another."""

    def __init__(self, folder: Path) -> None:
        self._gate: IO[bytes] = (folder / "gpuq-exclusive.gate").open("ab")
        self._lock: IO[bytes] = (folder / "gpuq-exclusive.lock").open("ab")

    @contextlib.contextmanager
    def hold(self, exclusive: bool) -> Generator[None]:
        fcntl.flock(self._gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            if not exclusive:
                fcntl.flock(self._gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            if exclusive:
                fcntl.flock(self._gate, fcntl.LOCK_UN)

    def close(self) -> None:
        self._gate.close()
        self._lock.close()


_run_lock: list[_RunLock] = []  # this worker's, once configured (none without xdist)


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: its basetemp is <the run's basetemp>/<worker id>
        _run_lock.append(_RunLock(Path(config.option.basetemp).parent))


def pytest_unconfigure(config: pytest.Config) -> None:
    while _run_lock:
        _run_lock.pop().close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first (a stable sort): the workers start on the longest ones, and the short ones fill the
    gaps at the end, instead of one worker starting a 2-minute scenario when the others are done."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


#: Modules whose tests run on one worker, one after another: they share the reference model's service (a
#: session fixture; loading torch and the model is the most expensive setup of the suite).
SAME_WORKER_MODULES = {
    "tests/reference/test_embed_service.py": "reference-model",
    "tests/features/test_openai_embeddings.py": "reference-model",
}


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: only called when the suite runs on workers
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """Each test is a unit of its own (as ``--dist load``), except the modules of ``SAME_WORKER_MODULES``,
    which go to one worker together. (xdist's own ``xdist_group`` cannot do it under pytest 9: it renames
    ``item._nodeid``, which pytest 9 no longer reads.)"""
    if config.getvalue("dist") != "load":  # what -n gives; another --dist asked for is xdist's own
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return SAME_WORKER_MODULES.get(nodeid.split("::", 1)[0], nodeid)

    return Scheduling(config, log)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    """Outside pytest-timeout's wrapper: the wait for an exclusive turn does not count against a test."""
    if not _run_lock:
        return (yield)
    with _run_lock[0].hold(item.get_closest_marker("exclusive") is not None):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """A failed test's report carries where each of its dispatcher processes stands (threads and asyncio
    tasks, dispatcher/stacks.py): a hang seen once in CI is then readable from the CI log alone."""
    report = yield
    if call.when == "call" and report.failed:
        for value in getattr(item, "funcargs", {}).values():
            for proc in getattr(value, "procs", [value]):
                dump = getattr(proc, "dump_stacks", None)
                if not callable(dump):
                    continue
                try:
                    text = dump()
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # pytest-timeout's Failed too: a dump never breaks the run
                    text = f"(no dump: {exc!r})"
                report.sections.append((f"dispatcher {proc.name}: stacks and log", text))
    return report


def _fail_unreachable(what: str, exc: Exception) -> None:
    pytest.fail(
        f"{what} is not reachable ({exc}). Run `make test`, which starts it, or start it by hand.",
        pytrace=False,
    )


# Take the db if its marker is still the one we read (none, or a dead run's), atomically: two runs (or two
# xdist workers of one run, which claim at the same instant) that both saw the same owner cannot both take
# it, and an unmarked db must still be empty (the bench and the demo claim dbs with markers of their own).
_CLAIM = """
local cur = redis.call('GET', KEYS[1])
if (cur or '') ~= ARGV[1] then return 0 end
if not cur and redis.call('DBSIZE') ~= 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""


def _owner_is_dead(owner: str) -> bool:
    """A marker names its run's process (``<run id>:<pid>``); the suite only uses a Redis on loopback, so a
    pid that no longer exists here is a run that was killed before it could clean up."""
    _, _, pid = owner.partition(":")
    if not pid.isdecimal():
        return False  # a marker of an older layout, or someone else's: leave it to its expiry
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@pytest.fixture(scope="session")
def redis_db() -> Iterator[int]:
    """A Redis logical database nobody else uses during this run, claimed with a marker key.

    A database is free when it is empty, or when its marker names a test run whose process is gone (killed
    runs leave their keys behind: on a machine shared by several developers' runs the 15 databases would
    otherwise fill up). A non-empty database without a marker belongs to someone else (a demo, a person) and
    is never touched."""
    marker = "gpuq:test-run-owner"
    me = f"{RUN_ID}:{os.getpid()}"
    chosen = None
    try:
        for db in range(1, 16):
            client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, decode_responses=True)
            owner = client.get(marker)
            free = client.dbsize() == 0 and owner is None
            stale = owner is not None and _owner_is_dead(owner)
            if (free or stale) and client.eval(_CLAIM, 1, marker, owner or "", me, 3600):
                if stale:
                    for key in client.scan_iter(count=1000):
                        if key != marker:
                            client.delete(key)
                chosen = db
                client.close()
                break
            client.close()
    except redis.ConnectionError as exc:
        _fail_unreachable(f"Redis on {REDIS_HOST}:{REDIS_PORT}", exc)
    if chosen is None:
        pytest.fail("no empty Redis database (1-15) left for this test run", pytrace=False)
    yield chosen
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=chosen)
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def redis_url(redis_db: int) -> str:
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}"


@pytest.fixture
def key_prefix() -> str:
    """A key prefix of this test's own, so tests sharing the run's Redis db never see each other's keys."""
    return f"gpuq-t-{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def rds(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _admin() -> pymysql.connections.Connection:
    return pymysql.connect(host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, password=MYSQL_PASSWORD)


@pytest.fixture(scope="session")
def mysql_server_url() -> str:
    auth = MYSQL_USER + (f":{MYSQL_PASSWORD}" if MYSQL_PASSWORD else "")
    return f"mysql+pymysql://{auth}@{MYSQL_HOST}:{MYSQL_PORT}"


@pytest.fixture
def database_url(mysql_server_url: str) -> Iterator[str]:
    """A fresh, empty MariaDB database for one test, dropped afterwards."""
    name = f"gpuq_test_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    try:
        conn = _admin()
    except pymysql.err.OperationalError as exc:
        _fail_unreachable(f"MariaDB on {MYSQL_HOST}:{MYSQL_PORT}", exc)
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    conn.close()
    yield f"{mysql_server_url}/{name}"
    conn = _admin()
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


@pytest.fixture
def sqlite_database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An embedded-mode database: a fresh SQLite file, what the dispatcher uses when no MySQL is configured."""
    return f"sqlite:///{tmp_path_factory.mktemp('gpuq-sqlite')}/gpuq.db"


@pytest.fixture(params=["mariadb", "sqlite"])
def any_database_url(request: pytest.FixtureRequest) -> str:
    """The test runs twice: on MariaDB (the production target) and on SQLite (embedded mode)."""
    name = "database_url" if request.param == "mariadb" else "sqlite_database_url"
    return str(request.getfixturevalue(name))
