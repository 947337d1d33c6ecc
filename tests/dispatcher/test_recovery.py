"""What a dead dispatcher recorded but never sent is given back by its journal (``sent_journal.py``,
``loop/recovery.py``); what it sent, or may have, keeps its slot. On MariaDB and SQLite.

The dead dispatcher is played by rows placed under its id (``place``, ``bind``) and a journal written under
its life and closed (its lock dropped, as the kernel drops a killed process's). The reader is a real
in-process dispatcher. The whole kill -9 and restart: ``test_recovery_e2e.py``.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select

from dispatcher.db.attempts import cancel_task
from dispatcher.db.engine import transaction, utcnow
from dispatcher.db.schema import attempts, slots, tasks
from dispatcher.db.standby import bind
from dispatcher.loop import recovery
from dispatcher.loop import runtime as runtime_module
from dispatcher.loop.core import Dispatcher
from dispatcher.loop.recovery import recover
from dispatcher.sent_journal import SUBDIR, Life, SentJournal, boot_id, dead_lives, realm
from dispatcher.testing import in_process, settle
from simgpu.fleet import SimFleet
from tests.dispatcher.helpers import NO_BACKOFF, job, place
from tests.dispatcher.test_refused_retry import _settings

pytestmark = pytest.mark.skipif(boot_id() is None, reason="needs a boot id (Linux)")


@pytest.fixture
def fleet() -> Any:
    f = SimFleet(gpus=1, token="gpu-bearer-token", seed=7, service_time="fixed:30").start()
    yield f
    f.stop()


def runner(
    url: str, redis_url: str, key_prefix: str, fleet: SimFleet, state_dir: Path
) -> Callable[[Callable[[Dispatcher], Awaitable[None]]], None]:
    """``run(body)``: ``body(d)`` with an in-process dispatcher ``d`` (no background loop) on these stores."""
    queue = f"q-{uuid.uuid4().hex[:6]}"
    s = _settings(url, redis_url, key_prefix, queue, fleet, state_dir=str(state_dir))

    async def main(body: Callable[[Dispatcher], Awaitable[None]]) -> None:
        async with in_process(s) as d:
            assert d.rt.journal.enabled
            await body(d)

    return lambda body: asyncio.run(main(body))


@pytest.fixture
def run(
    any_database_url: str, redis_url: str, key_prefix: str, fleet: SimFleet, tmp_path: Path
) -> Callable[[Callable[[Dispatcher], Awaitable[None]]], None]:
    return runner(any_database_url, redis_url, key_prefix, fleet, tmp_path)


async def _dead(d: Dispatcher, sent: list[tuple[str, int]], *, mark: bool = True, **life: str) -> SentJournal:
    """A journal of dispatcher ``dead`` that recorded ``sent`` and then died (its lock dropped); ``mark``:
    named the id's journal, as a life's start does once it has written down all the id held."""
    me = d.rt.journal.life
    assert me is not None and d.rt.journal.dir is not None
    header = {"dispatcher_id": "dead", "instance": uuid.uuid4().hex[:12], "boot": me.boot, "realm": me.realm}
    j = SentJournal(d.rt.journal.dir.parent, Life(**(header | life)))
    assert j.open()
    for task_id, attempt in sent:
        j.record(task_id, attempt)
    j.close()
    if mark:
        assert j.life is not None
        await d.rt.redis.set(d.rt.keys.journal(j.life.dispatcher_id), j.life.instance)
    return j


def _rows(d: Dispatcher, ids: list[str]) -> dict[str, Any]:
    with d.rt.engine.connect() as conn:
        return {r.task_id: r for r in conn.execute(select(tasks).where(tasks.c.task_id.in_(ids)))}


def _held(d: Dispatcher) -> dict[str, Any]:
    with d.rt.engine.connect() as conn:
        return {r.task_id: r for r in conn.execute(select(slots).where(slots.c.task_id.is_not(None)))}


def _running(d: Dispatcher, n: int, dispatcher_id: str = "dead") -> list[str]:
    jobs = [job(queue=d.settings.all_queues[0]) for _ in range(n)]
    res = place(d.rt.engine, jobs, dispatcher_id=dispatcher_id)
    assert len(res.placed) == n
    return [p.job.task_id for p in res.placed]


def _files(j: SentJournal) -> list[str]:
    assert j.dir is not None and j.life is not None
    return sorted(p.name for p in j.dir.glob(f"{j.life.instance}*"))


def _beside_dead(
    database_url: str, redis_url: str, key_prefix: str, fleet: SimFleet, state_dir: Path
) -> tuple[Any, Callable[[], Any]]:
    """Settings of a dispatcher and a maker of settings of a new life of "dead" (each its own instance), on
    one queue and one STATE_DIR: the two sides of a restart's race with another dispatcher's look."""
    queue = f"q-{uuid.uuid4().hex[:6]}"
    other = _settings(database_url, redis_url, key_prefix, queue, fleet, state_dir=str(state_dir))
    return other, lambda: _settings(
        database_url, redis_url, key_prefix, queue, fleet, state_dir=str(state_dir), dispatcher_id="dead"
    )


def _given_back(d: Dispatcher, ids: list[str]) -> None:
    """Each of ``ids`` ended never sent (due again, no attempt used) and holds no slot."""
    rows = _rows(d, ids)
    assert {t: (rows[t].state, rows[t].attempt) for t in ids} == dict.fromkeys(ids, ("retrying", 1))
    assert _held(d) == {}


def test_attempts_recorded_but_never_sent_are_given_back_and_sent_ones_keep_their_slots(run):
    async def body(d: Dispatcher) -> None:
        # GIVEN a dead dispatcher holding 3 slots, of which its journal says it sent one
        ids = _running(d, 3)
        j = await _dead(d, [(ids[0], 1)])
        # WHEN a dispatcher on the machine looks
        given = await recover(d.rt, d.rt.journal, starting=False)
        # THEN the two never sent are given back (one more attempt allowed, due at once), the sent one keeps
        # its slot
        assert given == 2
        rows = _rows(d, ids)
        assert (rows[ids[0]].state, rows[ids[0]].attempt) == ("processing", 1)
        for t in ids[1:]:
            assert (rows[t].state, rows[t].attempt, rows[t].max_attempts) == ("retrying", 1, 2), rows[t]
            assert rows[t].run_after <= d.now()
        assert set(_held(d)) == {ids[0]}
        with d.rt.engine.connect() as conn:
            outcomes = {r.task_id: r.outcome for r in conn.execute(select(attempts))}
        assert outcomes == {ids[1]: "never_sent", ids[2]: "never_sent"}
        assert _files(j) == []  # read once: removed
        # AND the given-back jobs come back from the database and run
        await d.housekeeping.requeue_due()
        assert await d.dispatch_once()
        await settle(d)
        rows = _rows(d, ids)
        assert [(rows[t].state, rows[t].attempt, rows[t].dispatcher_id) for t in ids[1:]] == [
            ("processing", 2, d.settings.dispatcher_id)
        ] * 2

    run(body)


def test_standbys_never_sent_leave_their_slots_and_one_sent_early_stays_bound(run):
    async def body(d: Dispatcher) -> None:
        # GIVEN a dead dispatcher with 2 running jobs and a standby bound on each; it sent one standby early
        # (its holder's callback reached it) and died before the holder's end was committed
        holders = _running(d, 2)
        standbys = [job(queue=d.settings.all_queues[0]) for _ in range(2)]
        bound = transaction(
            d.rt.engine,
            bind,
            candidates=[(s, "default") for s in standbys],
            dispatcher_id="dead",
            max_attempts=3,
            now=utcnow(),
        )
        assert len(bound.bound) == 2, bound
        early, unsent = standbys[0].task_id, standbys[1].task_id
        await _dead(d, [(holders[0], 1), (holders[1], 1), (early, 1)])
        # WHEN a dispatcher on the machine looks
        assert await recover(d.rt, d.rt.journal, starting=False) == 1
        # THEN the unsent one is off its slot and due at once as a first attempt; the early one stays bound
        rows = _rows(d, [early, unsent])
        assert (rows[unsent].state, rows[unsent].attempt, rows[unsent].gpu_id) == ("retrying", 0, None)
        assert rows[early].state == "standby"
        with d.rt.engine.connect() as conn:
            nexts = {r.next_task_id for r in conn.execute(select(slots))} - {None}
        assert nexts == {early}

    run(body)


def test_a_cancelled_attempt_never_sent_gives_its_slot_back(run):
    async def body(d: Dispatcher) -> None:
        (task_id,) = _running(d, 1)
        transaction(d.rt.engine, cancel_task, task_id=task_id, now=utcnow(), backoff=NO_BACKOFF)
        assert task_id in _held(d)  # a cancelled running task keeps its slot until its GPU confirms
        await _dead(d, [])
        assert await recover(d.rt, d.rt.journal, starting=False) == 1
        assert _held(d) == {}
        assert _rows(d, [task_id])[task_id].state == "cancelled"

    run(body)


def test_a_live_dispatchers_journal_is_not_read(run):
    async def body(d: Dispatcher) -> None:
        ids = _running(d, 2)
        me = d.rt.journal.life
        assert me is not None
        alive = SentJournal(d.rt.journal.dir.parent, Life("dead", "live1", me.boot, me.realm))
        assert alive.open()  # held: its process runs
        try:
            assert await recover(d.rt, d.rt.journal, starting=False) == 0
            assert set(_held(d)) == set(ids)
            assert _files(alive) == ["live1.lock", "live1.log"]
        finally:
            alive.close()

    run(body)


@pytest.mark.parametrize(
    ("life", "kept"),
    [
        ({"boot": "another-boot"}, False),  # an OS crash may have lost its last lines: removed unread
        ({"realm": "another-db"}, True),  # another database's: not ours to read or remove
        ({"dispatcher_id": "ours"}, False),  # our own id, met after our start: removed unread
    ],
    ids=["another boot", "another database", "our own id after start"],
)
def test_journals_that_cannot_be_trusted_here_judge_nothing(run, life, kept):
    async def body(d: Dispatcher) -> None:
        header = {"dispatcher_id": d.settings.dispatcher_id} if life.get("dispatcher_id") == "ours" else life
        # what the journal's id holds (ours: placed by this process, one request perhaps on its way)
        ids = _running(d, 2, header.get("dispatcher_id", "dead"))
        j = await _dead(d, [], **header)
        assert await recover(d.rt, d.rt.journal, starting=False) == 0
        assert set(_held(d)) == set(ids)
        assert bool(_files(j)) is kept

    run(body)


def test_a_dead_id_running_again_elsewhere_is_not_judged(run, rds: redis.Redis, monkeypatch):
    async def body(d: Dispatcher) -> None:
        # GIVEN the dead life's id is held by another process now (a restart on another machine): what the id
        # holds may be that process's, placed and about to be sent
        ids = _running(d, 2)
        assert rds.set(d.rt.keys.alive("dead"), "another-instance", ex=30)
        j = await _dead(d, [])
        assert await recover(d.rt, d.rt.journal, starting=False) == 0
        assert set(_held(d)) == set(ids)
        assert rds.get(d.rt.keys.alive("dead")) == b"another-instance"
        # THEN its journal is left to that process for a while (a restart here reads it at its start)
        assert _files(j) != []
        # AND removed, still unread, by a look once that while has passed
        monkeypatch.setattr(recovery, "RUNS_AGAIN_GRACE_SECONDS", 0.0)
        assert await recover(d.rt, d.rt.journal, starting=False) == 0
        assert set(_held(d)) == set(ids)
        assert _files(j) == []
        assert d.rt.journal.runs_again == {}

    run(body)


def test_a_restart_reads_its_journal_though_another_dispatcher_looked_between_its_claim_and_its_read(
    any_database_url: str,
    redis_url: str,
    key_prefix: str,
    fleet: SimFleet,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An outside trial (two dispatchers on one STATE_DIR, kill -9 and restart at random): the other
    dispatcher's 5 s look came between the restarted process taking its id and reading its dead life's
    journal, found the id taken and removed the journal unread; the restart then took everything its id
    held for sent, and its standbys never sent held their slots for the lease (11 of 16 slots)."""
    other, new_life = _beside_dead(any_database_url, redis_url, key_prefix, fleet, tmp_path)
    restart = new_life()
    real = recovery.recover
    looks: list[int] = []

    async def main() -> None:
        async with in_process(other) as d:

            async def look_between_claim_and_read(rt: Any, journal: SentJournal, **kw: Any) -> int:
                if kw.get("starting") and rt is not d.rt:  # the restart holds its id, not yet read
                    looks.append(await real(d.rt, d.rt.journal, starting=False))
                return await real(rt, journal, **kw)

            # GIVEN a dead dispatcher "dead" that recorded 2 running jobs and sent neither
            ids = _running(d, 2)
            await _dead(d, [])
            # WHEN it restarts, and the other dispatcher looks between its claim of the id and its read
            monkeypatch.setattr(runtime_module, "recover", look_between_claim_and_read)
            async with in_process(restart):
                # THEN the look judged nothing, and the restart gave both back at its start
                assert looks == [0]
                _given_back(d, ids)

    asyncio.run(main())


def test_the_stand_in_takes_the_dead_ids_key_only_while_it_reads(run, rds: redis.Redis):
    async def body(d: Dispatcher) -> None:
        # GIVEN the dead life's heartbeat key has not expired yet (killed a moment ago)
        _running(d, 1)
        j = await _dead(d, [])
        assert j.life is not None
        assert rds.set(d.rt.keys.alive("dead"), j.life.instance, ex=30)
        assert await recover(d.rt, d.rt.journal, starting=False) == 1
        assert rds.get(d.rt.keys.alive("dead")) is None  # taken over, then let go

    run(body)


def test_a_restart_waits_for_its_journal_while_another_reader_holds_its_lock(
    any_database_url: str,
    redis_url: str,
    key_prefix: str,
    fleet: SimFleet,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same race, the other way: the other dispatcher's look still holds the dead life's lock (it found
    the id taken, and lets go) when the restart lists its journals. The restart waits for it; skipped, its
    unsent attempts waited for their leases."""
    other, new_life = _beside_dead(any_database_url, redis_url, key_prefix, fleet, tmp_path)
    restart = new_life()
    real = recovery.recover

    async def main() -> None:
        async with in_process(other) as d:

            async def read_while_another_holds_the_lock(rt: Any, journal: SentJournal, **kw: Any) -> int:
                if kw.get("starting") and rt is not d.rt:
                    held = dead_lives(d.rt.journal)  # locked, as the other's look does
                    assert held
                    asyncio.get_running_loop().call_later(0.2, lambda: [dead.release() for dead in held])
                return await real(rt, journal, **kw)

            ids = _running(d, 2)
            await _dead(d, [])
            monkeypatch.setattr(runtime_module, "recover", read_while_another_holds_the_lock)
            async with in_process(restart):
                _given_back(d, ids)

    asyncio.run(main())


class Killed(BaseException):
    """A kill -9 at a chosen point of a start (``BaseException``: nothing on the way catches it)."""


def test_a_restart_killed_before_reading_its_journal_leaves_it_to_the_next(
    any_database_url: str,
    redis_url: str,
    key_prefix: str,
    fleet: SimFleet,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A second outside trial (same harness): a restart killed ~110 ms into its start, after it had written
    down all its id held as sent and named its journal the id's, before it read its predecessor's: the next
    restart trusted that journal, and 15 of 16 slots held never-sent standbys for the lease. Now a start reads
    first and names its journal last, and the next restart, taking over from a life that kept a journal
    here, still trusts the older journal the mark names."""
    other, restart = _beside_dead(any_database_url, redis_url, key_prefix, fleet, tmp_path)

    real = recovery.recover

    async def main() -> None:
        async with in_process(other) as d:
            # GIVEN a dead life of "dead" holding 2 slots, having sent neither; its journal is the id's
            ids = _running(d, 2)
            first = await _dead(d, [])
            assert first.life is not None

            async def killed_at_its_read(rt: Any, journal: SentJournal, **kw: Any) -> int:
                if kw.get("starting") and rt is not d.rt:
                    raise Killed
                return await real(rt, journal, **kw)

            # WHEN a restart is killed as it comes to read that journal
            second = restart()
            monkeypatch.setattr(runtime_module, "recover", killed_at_its_read)
            with pytest.raises(Killed):
                async with in_process(second):
                    pass
            monkeypatch.setattr(runtime_module, "recover", real)
            assert await d.rt.redis.get(d.rt.keys.journal("dead")) == first.life.instance.encode()
            # (killed, not stopped: its heartbeat key outlives it, and the next restart takes it over)
            await d.rt.redis.set(d.rt.keys.alive("dead"), second.instance, ex=30)
            # THEN the next restart gives both back
            async with in_process(restart()) as third:
                assert third.rt.intake.took_over == second.instance
                _given_back(d, ids)

    asyncio.run(main())


def test_a_restart_does_not_wait_for_a_journal_it_may_not_read(
    any_database_url: str,
    redis_url: str,
    key_prefix: str,
    fleet: SimFleet,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The mark names a journal here that is not ours to read (another database's: DATABASE_URL respelled
    between two lives, say) and that nobody holds: the start looks once, it does not wait for it (a review:
    5 s of relisting every journal every 20 ms)."""
    other, new_life = _beside_dead(any_database_url, redis_url, key_prefix, fleet, tmp_path)
    restart = new_life()
    listings: list[int] = []
    real = recovery._by_id

    def counted(journal: SentJournal, me: Life) -> Any:
        if me.dispatcher_id == "dead":
            listings.append(1)
        return real(journal, me)

    async def main() -> None:
        async with in_process(other) as d:
            ids = _running(d, 1)
            await _dead(d, [], realm="another-database")
            monkeypatch.setattr(recovery, "OWN_JOURNAL_WAIT_SECONDS", 3600.0)
            monkeypatch.setattr(recovery, "_by_id", counted)
            async with in_process(restart):
                assert listings == [1]
                assert set(_held(d)) == set(ids)  # not judged: kept, as sent

    asyncio.run(main())


@pytest.mark.parametrize("journal_here", [False, True], ids=["kept none here", "kept one here"])
def test_a_journal_is_read_after_its_id_ran_again_only_if_that_process_kept_a_journal_here(
    run, rds: redis.Redis, journal_here: bool
):
    """A look found the dead life's id held by another process and left the journal to it; that process
    stopped without reading it. Read now, the journal would judge that process's attempts: one of a gpuq
    without the journal (a rollback) may have sent them, and giving them back runs them twice. One that kept
    a journal here died before naming it: the journal the mark names still knows."""

    async def body(d: Dispatcher) -> None:
        ids = _running(d, 2)
        j = await _dead(d, [])
        later = "later-life"
        me = d.rt.journal.life
        assert me is not None
        k = SentJournal(d.rt.journal.dir.parent, Life("dead", later, me.boot, me.realm))
        if journal_here:  # a gpuq with the journal (running: its journal locked), not yet named the id's
            assert k.open()
        assert rds.set(d.rt.keys.alive("dead"), later, ex=30)
        assert await recover(d.rt, d.rt.journal, starting=False) == 0
        assert _files(j) != []
        k.close()  # it stopped (killed: its journal stays)
        rds.delete(d.rt.keys.alive("dead"))
        given = await recover(d.rt, d.rt.journal, starting=False)
        if journal_here:
            assert given == 2
            assert _held(d) == {}
        else:
            assert given == 0
            assert set(_held(d)) == set(ids)  # left to their leases, not run twice
        assert _files(j) == []

    run(body)


# -- the journal itself ---------------------------------------------------------------------------------


def _life(boot: str = "b") -> Life:
    return Life("d", uuid.uuid4().hex[:12], boot, "r")


def test_a_rotation_keeps_only_what_still_holds_a_slot(tmp_path: Path):
    j = SentJournal(tmp_path, _life())
    assert j.open()
    for i in range(5):
        j.record(f"t{i}", 1)

    async def holdings() -> set[tuple[str, int]]:
        j.record("during", 1)  # a request sent while the database is read goes to the new file
        return {("t1", 1), ("t3", 1), ("not-ours", 1)}

    asyncio.run(j.rotate(holdings))
    j.close()
    (dead,) = dead_lives(SentJournal(tmp_path, _life()))
    assert dead.sent() == {("t1", 1), ("t3", 1), ("during", 1)}
    assert _files(j) == [f"{j.life.instance}.lock", f"{j.life.instance}.log"]  # type: ignore[union-attr]
    dead.release()


def test_a_rotation_that_cannot_read_the_database_keeps_everything(tmp_path: Path):
    j = SentJournal(tmp_path, _life())
    assert j.open()
    j.record("a", 1)

    async def down() -> set[tuple[str, int]]:
        raise ConnectionError("database away")

    asyncio.run(j.rotate(down))
    j.close()
    (dead,) = dead_lives(SentJournal(tmp_path, _life()))
    assert dead.sent() == {("a", 1)}
    dead.release()


def test_a_crash_during_a_rotation_leaves_both_files_and_both_are_read(tmp_path: Path):
    life = _life()
    j = SentJournal(tmp_path, life)
    assert j.open()
    j.record("old", 1)
    folder = tmp_path / SUBDIR
    (folder / f"{life.instance}.next.log").write_bytes(b'["new", 2]\n["cut sh')  # the kill cut a line
    j.close()
    (dead,) = dead_lives(SentJournal(tmp_path, _life()))
    assert dead.sent() == {("old", 1), ("new", 2)}
    dead.release()


def test_a_journal_that_cannot_be_written_is_never_trusted(tmp_path: Path):
    # GIVEN a journal whose file becomes unwritable (a full disk, a closed descriptor)
    j = SentJournal(tmp_path, _life())
    assert j.open()
    j.record("a", 1)
    assert j._fd is not None
    os.close(j._fd)
    # WHEN a request is recorded
    j.record("b", 1)
    # THEN the journal is off, and its lock file gone: no reader takes the life's incomplete file for whole
    assert not j.enabled
    assert _files(j) == []
    assert dead_lives(SentJournal(tmp_path, _life())) == []


def test_no_directory_no_journal(tmp_path: Path):
    (tmp_path / "file").write_text("")
    j = SentJournal(tmp_path / "file", _life())  # a file where the directory should be
    assert not j.open()
    j.record("a", 1)  # a no-op, not an error
    assert not j.enabled


def test_of_two_dead_lives_of_one_id_only_the_one_its_mark_names_is_read(run):
    # GIVEN an id's first life placed a job and died before sending it; its restart (same id) wrote it down
    # as held at its start (it could not know) and sent nothing; then it died too, before reading the first
    async def body(d: Dispatcher) -> None:
        (task_id,) = _running(d, 1)
        await _dead(d, [], mark=False)
        await _dead(d, [(task_id, 1)])  # the later life: its start's carry, and the mark
        # WHEN a dispatcher on the machine looks
        assert await recover(d.rt, d.rt.journal, starting=False) == 0
        # THEN only the marked (later) journal counts: the job keeps its slot (the lease decides, as the
        # later life judged it); the earlier journal alone would have given it back
        assert set(_held(d)) == {task_id}
        assert list((d.rt.journal.dir or Path()).glob("*.l*")) == list(
            (d.rt.journal.dir or Path()).glob(f"{d.settings.instance}.*")
        )

    run(body)


def test_a_dead_life_whose_id_went_on_elsewhere_is_not_read(run):
    # GIVEN a dead life's id went on in a later life that has no journal here (another machine, or its
    # journal off): the mark names that one, and what the id holds may be its, sent
    async def body(d: Dispatcher) -> None:
        ids = _running(d, 2)
        j = await _dead(d, [])
        await d.rt.redis.set(d.rt.keys.journal("dead"), "off:later-life")
        assert await recover(d.rt, d.rt.journal, starting=False) == 0
        assert set(_held(d)) == set(ids)
        assert _files(j) == []

    run(body)


def test_the_realm_reads_one_servers_spellings_alike_and_tells_servers_apart():
    same = [
        realm("mysql+pymysql://u:pw@localhost/gpuq", "redis://localhost/0", "gpuq:"),
        realm(
            "mysql+pymysql://other:pw2@127.0.0.1:3306/gpuq?charset=utf8mb4",
            "redis://:x@127.0.0.1:6379",
            "gpuq:",
        ),
    ]
    assert same[0] == same[1]
    for other in (
        realm("mysql+pymysql://u@127.0.0.1/other", "redis://127.0.0.1/0", "gpuq:"),
        realm("mysql+pymysql://u@127.0.0.1/gpuq", "redis://127.0.0.1/1", "gpuq:"),
        realm("mysql+pymysql://u@127.0.0.1/gpuq", "redis://127.0.0.1/0?db=2", "gpuq:"),
        realm("mysql+pymysql://u@127.0.0.1/gpuq", "redis://127.0.0.1/0", "other:"),
        realm("mysql+pymysql://u@10.0.0.1/gpuq", "redis://127.0.0.1/0", "gpuq:"),
    ):
        assert other != same[0]


def test_a_journal_without_a_header_is_left_while_young_and_removed_once_old(run):
    # GIVEN a lock file with no header yet (a life starting: it writes its header once it holds the lock,
    # and a reader may take the lock first)
    async def body(d: Dispatcher) -> None:
        folder = d.rt.journal.dir
        assert folder is not None
        lock = folder / "starting.lock"
        lock.write_bytes(b"")
        assert await recover(d.rt, d.rt.journal, starting=False) == 0
        assert lock.exists()  # left for the life to lock and write
        old = lock.stat().st_mtime - 120
        os.utime(lock, (old, old))
        assert await recover(d.rt, d.rt.journal, starting=False) == 0
        assert not lock.exists()  # nobody came: removed

    run(body)
