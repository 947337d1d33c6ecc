"""An outside review's attacks on the journal of sent requests (52c13c8; ``sent_journal.py``,
``loop/recovery.py``). Each failed then, each a job run twice on a GPU given a fifth: a standby promoted while
a rotation read what the id held, a short write on a full disk taken for a recorded line, a live process
whose journal failed on a read-only file system read as dead, an older life's journal judging what a later
life of the id had sent, a job an agent fetched on a GPU since turned to push. And one found after it: a
copy of a job an earlier life of our id sent, come back to us, was POSTed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import event, select, text

from dispatcher.db import unsent
from dispatcher.db.attempts import finish_attempt
from dispatcher.db.engine import init_schema, make_engine, transaction, utcnow
from dispatcher.db.schema import attempts, tasks
from dispatcher.db.standby import bind
from dispatcher.loop.core import Dispatcher
from dispatcher.loop.recovery import recover
from dispatcher.sent_journal import SUBDIR, Life, SentJournal, boot_id, dead_lives, realm
from dispatcher.states import Outcome
from dispatcher.testing import in_process, settle
from producer.job import parse_redis_job
from producer.keys import Keys, Priority, queue_key
from tests.dispatcher import test_recovery as base
from tests.dispatcher.harness import DispatcherProc, push_jobs, received_per_task
from tests.dispatcher.helpers import NO_BACKOFF, add_gpu, job, place, wait_for
from tests.dispatcher.test_refused_retry import _settings

pytestmark = pytest.mark.skipif(boot_id() is None, reason="needs a boot id (Linux)")

fleet, run = base.fleet, base.run  # fixtures


@pytest.fixture
def run_maria(database_url, redis_url, key_prefix, fleet, tmp_path):
    return base.runner(database_url, redis_url, key_prefix, fleet, tmp_path)


def _rows(d: Dispatcher, ids: list[str]) -> dict[str, Any]:
    with d.rt.engine.connect() as conn:
        return {r.task_id: r for r in conn.execute(select(tasks).where(tasks.c.task_id.in_(ids)))}


def _outcomes(d: Dispatcher) -> dict[str, str]:
    with d.rt.engine.connect() as conn:
        return {r.task_id: r.outcome for r in conn.execute(select(attempts)) if r.outcome}


def _life_like(d: Dispatcher, dispatcher_id: str = "dead") -> Life:
    """A life of ``dispatcher_id`` on this machine, boot and stores, its journal named the id's (the mark
    its start sets once it has written down all the id held)."""
    me = d.rt.journal.life
    assert me is not None
    life = Life(dispatcher_id, uuid.uuid4().hex[:12], me.boot, me.realm)
    with redis.Redis.from_url(d.settings.redis_dsn()) as r:
        r.set(d.rt.keys.journal(dispatcher_id), life.instance)
    return life


# -- 1. holdings() reads held_by and bound_to as two statements under READ COMMITTED -----------------------


def test_rotation_keeps_a_standby_sent_early_whose_promotion_commits_as_it_reads(run_maria):
    """A dead dispatcher's standby, sent early (journaled), is promoted by its holder's end while the
    rotation reads what the id holds: read in two statements, it was in neither (``unsent.holdings``)."""

    async def body(d: Dispatcher) -> None:
        q = d.settings.all_queues[0]
        holders = [p.job.task_id for p in place(d.rt.engine, [job(queue=q)], dispatcher_id="dead").placed]
        standby = job(queue=q)
        b = transaction(
            d.rt.engine,
            bind,
            candidates=[(standby, "default")],
            dispatcher_id="dead",
            max_attempts=3,
            now=utcnow(),
        )
        assert len(b.bound) == 1
        # the dead-to-be dispatcher's journal: holder sent, standby sent early on the holder's callback
        j = SentJournal(d.rt.journal.dir.parent, _life_like(d))
        assert j.open()
        j.record(holders[0], 1)
        j.record(standby.task_id, 1)

        real = unsent.holdings

        def promoted_meanwhile(conn: Any, *, dispatcher_id: str) -> set[tuple[str, int]]:
            # the holder's end commits (its group commit, on another connection) right after the read's
            # first statement: read in two, the standby was in neither (bound before, held after)
            done: list[bool] = []

            def promote(*_args: Any) -> None:
                if done:
                    return
                done.append(True)
                fin = transaction(
                    d.rt.engine,
                    finish_attempt,
                    task_id=holders[0],
                    attempt=1,
                    outcome=Outcome.FINISHED,
                    now=utcnow(),
                    backoff=NO_BACKOFF,
                )
                assert fin.code == "applied"

            event.listen(conn, "after_cursor_execute", promote)
            return real(conn, dispatcher_id=dispatcher_id)

        await j.rotate(lambda: d.rt.db(promoted_meanwhile, dispatcher_id="dead"))
        j.close()  # kill -9
        # the standby now runs on its GPU (promoted, sent early)
        assert _rows(d, [standby.task_id])[standby.task_id].state == "processing"
        given = await recover(d.rt, d.rt.journal, starting=False)
        row = _rows(d, [standby.task_id])[standby.task_id]
        assert given == 0 and row.state == "processing", (
            f"a standby the dead dispatcher SENT was given back as never_sent: given={given},"
            f" state={row.state}, outcomes={_outcomes(d)}"
        )

    run_maria(body)


# -- 2. a short write (disk full) is taken for a recorded request -------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)], check=True, capture_output=True
        )
    except Exception as exc:  # not root
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_short_write_on_a_full_disk_is_not_taken_for_a_recorded_request(tiny_fs: Path):
    j = SentJournal(tiny_fs, Life("d", "inst0000", "b", "r"))
    assert j.open()
    for i in range(10):  # the log has a page of its own, partly used
        j.record(f"pre-{i}", 1)
    # fill the file system but the log's page: the next lines fit only in part
    fd = os.open(tiny_fs / "filler", os.O_WRONLY | os.O_CREAT)
    with contextlib.suppress(OSError):
        while True:
            os.write(fd, b"x" * 512)
    os.close(fd)
    log = tiny_fs / SUBDIR / "inst0000.log"
    sent: list[tuple[str, int]] = []
    i = 0
    while j.enabled and i < 10_000:
        pair = (f"task-{i:05d}-" + "x" * 20, 1)
        j.record(*pair)
        if j.enabled:
            sent.append(pair)  # record() returned without turning the journal off: the request goes out
            if not log.read_bytes().endswith(b"\n"):
                break  # a short write, silently accepted
        i += 1
    j.close()  # kill -9 right after that request went out
    lives = dead_lives(SentJournal(tiny_fs, Life("r", "reader00", "b", "r")))
    if not lives:
        return  # the journal was turned off (untrusted): fine
    (dead,) = lives
    missing = set(sent) - dead.sent()
    dead.release()
    assert not missing, f"requests that went out but a reader takes as never sent: {sorted(missing)}"


# -- 3. a journal turned off on a read-only fs keeps its lock file: the live process is 'recovered' --------


def test_a_live_dispatcher_whose_journal_failed_on_a_read_only_fs_is_not_recovered(
    run, rds: redis.Redis, monkeypatch
):
    """ext4 errors=remount-ro (tmpfs cannot be remounted ro with files open for writing, so the two EROFS
    are injected): the write fails, and so does every unlink in ``_fail``; ``close`` drops the flock."""
    import errno
    import pathlib

    import dispatcher.sent_journal as sj

    async def body(d: Dispatcher) -> None:
        q = d.settings.all_queues[0]
        # GIVEN a live dispatcher "live" (its heartbeat key holds its instance) with a journal here
        life = _life_like(d, "live")
        assert rds.set(d.rt.keys.alive("live"), life.instance, ex=30)
        live = SentJournal(d.rt.journal.dir.parent, life)
        assert live.open()
        # WHEN the file system goes read-only and it places and sends a job
        (p,) = place(d.rt.engine, [job(queue=q)], dispatcher_id="live").placed

        def erofs(*_a: Any, **_k: Any) -> Any:
            raise OSError(errno.EROFS, "Read-only file system")

        with monkeypatch.context() as m:
            m.setattr(sj, "_write_all", erofs)  # not os.write: other threads of this process write too
            m.setattr(pathlib.Path, "unlink", erofs)
            live.record(p.job.task_id, p.attempt)  # fails: journal off; the request goes out all the same
        assert not live.enabled
        # THEN another dispatcher here must not give back the live one's attempt
        given = await recover(d.rt, d.rt.journal, starting=False)
        row = _rows(d, [p.job.task_id])[p.job.task_id]
        assert given == 0 and row.state == "processing", (
            f"the LIVE dispatcher's sent attempt was given back: given={given}, state={row.state},"
            f" outcomes={_outcomes(d)}, its heartbeat key now={rds.get(d.rt.keys.alive('live'))!r}"
        )

    run(body)


# -- 4. a stale journal of an earlier life of the id judges what later lives sent (real processes) ---------


@pytest.mark.slow
def test_a_stale_journal_of_an_earlier_life_does_not_give_back_what_a_later_life_sent(stack, tmp_path):
    """systemd's unit (WorkingDirectory=/opt/gpuq, STATE_DIR=.gpuq relative) is killed -9; an operator runs
    the same .env by hand from elsewhere (another STATE_DIR) for a while; that one is killed too, and the
    unit starts again: it reads the first life's journal, which knows nothing of the second life's jobs."""
    fleet = stack.fleet(gpus=1, service_time="fixed:25")
    home_a, home_b = tmp_path / "opt", tmp_path / "home"
    home_a.mkdir()
    home_b.mkdir()
    env = stack.env(fleet, DISPATCHER_ID="worker", TASK_TIMEOUT_SECONDS="120", STANDBY_JOBS="false")
    first = DispatcherProc(dict(env), name="first", workdir=home_a)
    stack.procs.append(first)
    first.start()
    first.kill()  # nothing running: its journal lists nothing
    assert list((home_a / ".gpuq" / "sent").glob("*.lock"))
    second = DispatcherProc(dict(env), name="second", workdir=home_b)
    stack.procs.append(second)
    second.start()
    ids = push_jobs(stack.rds, stack.queues[0], 4)

    def running() -> bool:
        return sum(received_per_task(fleet.stats()).values()) == 4

    wait_for(running, timeout=30, what="4 jobs received by the GPU")
    second.kill()
    third = DispatcherProc(dict(env), name="third", workdir=home_a)
    stack.procs.append(third)
    third.start()  # recovery is done at start, before it is ready
    time.sleep(3)  # room for a given-back job to be requeued and sent again, as it was
    per_task = received_per_task(fleet.stats())
    over = fleet.stats()["totals"]["oversubscriptions"]
    with stack.engine.connect() as conn:
        hist = conn.execute(text("SELECT task_id, attempt, outcome FROM attempts ORDER BY task_id")).all()
        running = conn.execute(
            text("SELECT COUNT(*) FROM tasks WHERE state = 'processing' AND attempt = 1")
        ).scalar_one()
    twice = {t: n for t, n in per_task.items() if n > 1}
    assert not twice and over == 0, f"sent twice: {twice}; oversubscriptions: {over}; attempts: {hist}"
    assert (sorted(per_task), running, hist) == (sorted(ids), 4, [])


# -- 5. a pull GPU turned pushed: jobs its agent fetched (never POSTed) are taken for never sent ------------


def test_jobs_an_agent_fetched_are_not_given_back_after_its_gpu_became_pushed(run, fleet):
    from dispatcher.db.gpus import update_gpu
    from dispatcher.gpus.pull import pull_url
    from tests.dispatcher.helpers import add_gpu

    async def body(d: Dispatcher) -> None:
        q = d.settings.all_queues[0]
        # GIVEN a job placed by "dead" on a pull GPU, fetched by its agent (running there: never POSTed)
        add_gpu(d.rt.engine, "pg", 1, url=pull_url("pg"), pool="pullpool")
        (p,) = place(d.rt.engine, [job(queue=q)], pool="pullpool", dispatcher_id="dead").placed
        with d.rt.engine.begin() as conn:
            conn.execute(
                text("UPDATE tasks SET fetched_attempt = attempt WHERE task_id = :t"), {"t": p.job.task_id}
            )
        # AND an operator makes that GPU a pushed one (gpuq gpu set pg --url ...) while the job runs
        transaction(d.rt.engine, update_gpu, gpu_id="pg", url=fleet.url("g0") + "x", now=utcnow())
        assert _rows(d, [p.job.task_id])[p.job.task_id].state == "processing"  # fetched: left running
        # WHEN "dead" dies (its journal: nothing POSTed) and a dispatcher here looks
        j = SentJournal(d.rt.journal.dir.parent, _life_like(d))
        assert j.open()
        j.close()
        given = await recover(d.rt, d.rt.journal, starting=False)
        row = _rows(d, [p.job.task_id])[p.job.task_id]
        assert given == 0 and row.state == "processing", (
            f"a job running under a pull agent was given back as never_sent: state={row.state},"
            f" outcomes={_outcomes(d)}"
        )

    run(body)


def test_a_copy_of_a_job_an_earlier_life_of_our_id_sent_is_not_sent_again(
    any_database_url, redis_url, key_prefix, fleet, tmp_path
):
    """An earlier life of our id placed and sent a job, and died before acknowledging its element; the
    element comes back to our id's processing list and to us. Its row says ours at that attempt, which used
    to read as a commit whose answer was lost: POSTed again. The journal's start took it as sent."""
    queue = f"q-{uuid.uuid4().hex[:6]}"
    s = _settings(any_database_url, redis_url, key_prefix, queue, fleet, state_dir=str(tmp_path))
    engine = make_engine(s.db_url())
    init_schema(engine)
    add_gpu(engine, "g0", 4, url=fleet.url("g0"))
    earlier = job(queue=queue)
    (p,) = place(engine, [earlier], dispatcher_id=s.dispatcher_id).placed
    rds = redis.Redis.from_url(redis_url)
    element = f"{queue_key(queue, Priority.NORMAL)}\n{earlier.to_redis()}"  # its source list, then the job
    rds.rpush(Keys(key_prefix).proc(queue, s.dispatcher_id), element)  # not acknowledged before the kill

    async def main() -> None:
        async with in_process(s) as d:
            for _ in range(3):
                await d.dispatch_once()
                await settle(d)

    asyncio.run(main())
    rds.close()
    engine.dispose()
    assert received_per_task(fleet.stats()).get(p.job.task_id, 0) == 0


# -- a second outside review ----------------------------------------------------------------------------


def test_a_dead_id_differing_only_in_case_does_not_judge_a_live_dispatchers_sends(
    database_url, redis_url, key_prefix, fleet, tmp_path
):
    """MariaDB's default collation took ``GPU-BOX-x`` for ``gpu-box-x``: a dead life of the one gave back
    what the live other held and had sent (schema version 5: the id columns compare byte for byte)."""
    queue = f"q-{uuid.uuid4().hex[:6]}"
    s = _settings(
        database_url, redis_url, key_prefix, queue, fleet, state_dir=str(tmp_path), dispatcher_id="gpu-box-x"
    )
    rds = redis.Redis.from_url(redis_url)
    ids = push_jobs(rds, queue, 3)
    given: list[int] = []

    async def main() -> None:
        async with in_process(s) as d:
            for _ in range(3):
                await d.dispatch_once()
                await settle(d)
            assert sorted(received_per_task(fleet.stats())) == sorted(ids)
            _life_like(d, "GPU-BOX-X")  # its mark
            dead = SentJournal(tmp_path, Life("GPU-BOX-X", "upper000", *_boot_realm(d)))
            assert dead.open()
            dead.close()
            await d.rt.redis.set(d.rt.keys.journal("GPU-BOX-X"), "upper000")
            given.append(await recover(d.rt, d.rt.journal, starting=False))

    asyncio.run(main())
    rds.close()
    assert given == [0]


def _boot_realm(d: Dispatcher) -> tuple[str, str]:
    me = d.rt.journal.life
    assert me is not None
    return me.boot, me.realm


def test_a_restart_after_a_process_that_kept_no_journal_reads_no_older_one(
    any_database_url, redis_url, key_prefix, fleet, tmp_path
):
    """A rollback: a gpuq without the journal ran under our id after a life with one, and sent jobs; the
    mark still names the older life. A restart that takes over the newer process's key reads nothing."""
    queue = f"q-{uuid.uuid4().hex[:6]}"
    s = _settings(any_database_url, redis_url, key_prefix, queue, fleet, state_dir=str(tmp_path))
    engine = make_engine(s.db_url())
    init_schema(engine)
    add_gpu(engine, "g0", 4, url=fleet.url("g0"))
    (p,) = place(engine, [job(queue=queue)], dispatcher_id=s.dispatcher_id).placed  # the old version's, sent
    boot = boot_id()
    assert boot is not None
    where = realm(engine.url.render_as_string(hide_password=True), s.redis_dsn(), Keys(key_prefix).prefix)
    older = SentJournal(tmp_path, Life(s.dispatcher_id, "older000", boot, where))
    assert older.open()
    older.close()
    rds = redis.Redis.from_url(redis_url)
    keys = Keys(key_prefix)
    rds.set(keys.journal(s.dispatcher_id), "older000")
    rds.set(keys.alive(s.dispatcher_id), "nojournal", ex=30)  # killed a moment ago: no client left

    async def main() -> None:
        async with in_process(s):
            pass

    asyncio.run(main())
    with engine.connect() as conn:
        row = conn.execute(select(tasks).where(tasks.c.task_id == p.job.task_id)).one()
    rds.close()
    engine.dispose()
    assert (row.state, row.attempt) == ("processing", 1)


def test_a_standby_given_back_at_start_and_placed_again_by_this_life_is_sent_after_a_lost_commit(
    any_database_url, redis_url, key_prefix, fleet, tmp_path
):
    """A standby our id's earlier life never sent is given back at our start and later placed by us at
    the same attempt number (1); that commit's answer is lost. Taken for inherited, it was never sent."""
    queue = f"q-{uuid.uuid4().hex[:6]}"
    s = _settings(any_database_url, redis_url, key_prefix, queue, fleet, state_dir=str(tmp_path))
    me = s.dispatcher_id
    engine = make_engine(s.db_url())
    init_schema(engine)
    add_gpu(engine, "g0", 2, url=fleet.url("g0"))
    (holder,) = place(engine, [job(queue=queue)], dispatcher_id=me).placed
    t = job(queue=queue)
    bound = transaction(
        engine, bind, candidates=[(t, "default")], dispatcher_id=me, max_attempts=3, now=utcnow()
    )
    assert len(bound.bound) == 1
    boot = boot_id()
    assert boot is not None
    where = realm(engine.url.render_as_string(hide_password=True), s.redis_dsn(), Keys(key_prefix).prefix)
    dead = SentJournal(tmp_path, Life(me, "earlier0", boot, where))
    assert dead.open()
    dead.record(holder.job.task_id, 1)  # it sent the holder, not the standby
    dead.close()
    rds = redis.Redis.from_url(redis_url)
    rds.set(Keys(key_prefix).journal(me), "earlier0")

    async def main() -> None:
        async with in_process(s) as d:
            assert _rows(d, [t.task_id])[t.task_id].state == "retrying"  # given back at start
            assert (t.task_id, 1) not in d.rt.journal.inherited
            await d.housekeeping.requeue_due()
            raws = [r for pr in Priority for r in rds.lrange(queue_key(queue, pr), 0, -1)]
            for pr in Priority:
                rds.delete(queue_key(queue, pr))
            (copy,) = [parse_redis_job(raw, queue)[0] for raw in raws]
            # this life places it at attempt 1; the commit's answer is lost: its element is still ours
            assert [
                pp.attempt for pp in place(engine, [copy], dispatcher_id=me, check_existing=True).placed
            ] == [1]
            rds.rpush(
                Keys(key_prefix).proc(queue, me), f"{queue_key(queue, Priority.NORMAL)}\n{copy.to_redis()}"
            )
            for _ in range(3):
                await d.dispatch_once()
                await settle(d)

    asyncio.run(main())
    rds.close()
    engine.dispose()
    assert received_per_task(fleet.stats()).get(t.task_id, 0) == 1
