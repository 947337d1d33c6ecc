"""A second dispatcher with a malformed or different GPU_ENDPOINTS cannot rewrite the shared fleet (issue 14,
blocker 3; SPEC §6). Before: ``g0=URL;g1=URL`` (semicolon) was one GPU g0 whose URL was the whole string,
and starting with it overwrote g0's URL in the database, so the first dispatcher's next jobs failed 404.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sqlalchemy import text

from tests.dispatcher.harness import ROOT, SECRET, push_jobs, wait_final


def _start(stack, endpoints: str, tmp_path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **stack.env(), "GPU_ENDPOINTS": endpoints, "CALLBACK_SECRET": SECRET}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "dispatcher"],
        check=False,
        env={**env, "CALLBACK_PORT": "0", "CALLBACK_HOST": "127.0.0.1"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _urls(stack) -> dict[str, str]:
    with stack.engine.connect() as conn:
        return dict(conn.execute(text("SELECT gpu_id, url FROM gpus")).all())


@pytest.mark.slow  # real dispatcher processes started against one fleet
def test_second_dispatcher_cannot_rewrite_the_fleet(stack, gpuq, tmp_path):
    # GIVEN a dispatcher running g0 and g1 of a fleet
    fleet = stack.fleet(gpus=2, service_time="fixed:0.01")
    stack.dispatcher(fleet)
    before = _urls(stack)
    g0, g1 = fleet.url("g0"), fleet.url("g1")
    # WHEN a second one starts with the two GPUs separated by a semicolon: exit 2, one line naming the variable
    bad = _start(stack, f"g0={g0};g1={g1}", tmp_path)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.count("\n") == 1 and "GPU_ENDPOINTS" in bad.stderr and "commas" in bad.stderr
    # and one with g0 at another URL: exit 2, one line saying how it is registered and how to change it
    moved = _start(stack, f"g0={g1}", tmp_path)
    assert moved.returncode == 2, moved.stderr
    assert moved.stderr.count("\n") == 1, moved.stderr
    assert f"GPU g0 is registered as default:g0={g0}" in moved.stderr and "gpuq gpu set" in moved.stderr
    # THEN the registrations are untouched and the first dispatcher's jobs all finish
    assert _urls(stack) == before
    ids = push_jobs(stack.rds, stack.queues[0], 20)
    wait_final(stack.engine, ids, timeout=60)
    # and `gpuq gpu set` is how a registration changes (a new URL starts with a clean health record)
    env = {"DATABASE_URL": stack.database_url, "REDIS_URL": stack.redis_url, "REDIS_KEY_PREFIX": stack.prefix}
    # (not to another GPU's URL: one service under two names got the jobs of both, 8 on 4 slots)
    taken = gpuq("gpu", "set", "g0", "--url", g1 + "/", **env)  # a trailing slash is the same service
    assert taken.exit_code == 2 and "is GPU g1's URL" in taken.stderr, taken
    assert "//127.0.0.1:" in g1
    alias = gpuq("gpu", "add", "g1b", g1.replace("127.0.0.1", "localhost"), **env)  # so is another spelling
    assert alias.exit_code == 2 and "is GPU g1's URL" in alias.stderr, alias
    assert _urls(stack) == before
    moved_to = g0 + "-v2"
    res = gpuq("gpu", "set", "g0", "--url", moved_to, "--pool", "other", **env)
    assert res.exit_code == 0, res
    with stack.engine.connect() as conn:
        assert conn.execute(text("SELECT url, pool FROM gpus WHERE gpu_id = 'g0'")).one() == (
            moved_to,
            "other",
        )
    assert gpuq("gpu", "set", "g7", "--url", g1, **env).exit_code == 1
    assert gpuq("gpu", "set", "g0", "--url", "ftp://x", **env).exit_code == 2


def test_two_registrations_of_one_url_at_the_same_moment_let_one_through(database_url):
    # A review: under READ COMMITTED the URL check read no row of a registration not yet committed, so two
    # `gpu add` of one URL under two names at once both passed, and one service got the jobs of two GPUs.
    import threading

    from dispatcher.db.engine import init_schema, make_engine, utcnow
    from dispatcher.db.gpus import UrlTaken, register_gpu

    engine = make_engine(database_url, pool_size=2)
    init_schema(engine)
    url = "http://127.0.0.1:9/same"
    outcome: list[BaseException | None] = []

    def second() -> None:
        try:
            with engine.begin() as conn:
                register_gpu(conn, gpu_id="g1", url=url, pool="default", slot_count=4, now=utcnow())
            outcome.append(None)
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    try:
        with engine.connect() as first:
            with first.begin():
                register_gpu(first, gpu_id="g0", url=url, pool="default", slot_count=4, now=utcnow())
                racer = threading.Thread(target=second)
                racer.start()
                racer.join(0.5)
                assert racer.is_alive(), "the second registration did not wait for the first"
            racer.join(30)  # the first committed: the second checks the URL against it
        assert len(outcome) == 1 and isinstance(outcome[0], UrlTaken), outcome
        with engine.connect() as conn:
            assert conn.execute(text("SELECT gpu_id FROM gpus")).scalars().all() == ["g0"]
    finally:
        engine.dispose()
