"""One live process per DISPATCHER_ID (``Presence.claim`` and the heartbeat), against the real Redis.

Found by an outside attack: two dispatchers started from one ``.env`` with ``DISPATCHER_ID=worker`` both ran,
took each other's jobs for their own, and the simulated GPUs counted fifth jobs and jobs run twice.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis

from dispatcher.loop.core import Dispatcher
from dispatcher.queues.intake import Intake
from dispatcher.queues.presence import DuplicateDispatcher, client_name
from producer.keys import Keys
from tests.dispatcher.test_handoff import World, run, world  # noqa: F401 - world: a fixture


def _intake(rds: Redis, prefix: str, instance: str) -> Intake:
    return Intake(rds, Keys(prefix), "worker", [f"{prefix}q"], instance=instance)


def test_a_second_process_with_a_live_id_is_refused(redis_url: str, key_prefix: str) -> None:
    async def scenario() -> None:
        rds = Redis.from_url(redis_url)
        # the first one's connections are named as a dispatcher's are (dispatcher/serve.py)
        named = Redis.from_url(redis_url, client_name=client_name("beat", "worker", "aaaa"))
        first, second = _intake(named, key_prefix, "aaaa"), _intake(rds, key_prefix, "bbbb")
        await first.claim()
        await first.heartbeat()

        async def beating() -> None:  # the first one lives: its heartbeat goes on
            while True:
                await first.heartbeat()
                await asyncio.sleep(0.05)

        beat = asyncio.ensure_future(beating())
        try:
            with pytest.raises(DuplicateDispatcher, match="DISPATCHER_ID=worker"):
                await second.claim(poll=0.1)
        finally:
            beat.cancel()
        # the first still holds its key: refusing the second changed nothing
        assert await rds.get(Keys(key_prefix).alive("worker")) == b"aaaa"
        await named.aclose()
        await rds.aclose()

    asyncio.run(scenario())


def test_a_restart_after_a_kill_takes_the_id_over_at_once(
    redis_url: str, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A process killed -9 leaves its heartbeat key for up to its TTL, but no connection to Redis.
    async def scenario() -> None:
        rds = Redis.from_url(redis_url)
        dead, heir = _intake(rds, key_prefix, "dead0"), _intake(rds, key_prefix, "heir0")
        await dead.claim()
        # At once, not after the key's TTL (10 s): a poll this long would hang the test, and only the
        # take-over logs this (no timed assert: a loaded machine makes any bound flaky).
        with caplog.at_level("WARNING", logger="gpuq"):
            await asyncio.wait_for(heir.claim(poll=3600), timeout=120)
        assert any("took over this DISPATCHER_ID" in r.getMessage() for r in caplog.records)
        assert await rds.get(Keys(key_prefix).alive("worker")) == b"heir0"
        # the dead one's retire (a late graceful stop) does not delete the heir's key
        await dead.retire()
        assert await rds.get(Keys(key_prefix).alive("worker")) == b"heir0"
        await rds.aclose()

    asyncio.run(scenario())


def test_a_lingering_connection_without_heartbeat_is_waited_out(redis_url: str, key_prefix: str) -> None:
    # Its connection still open (a host gone without closing it, say) but its heartbeat not refreshed: the
    # key is waited out, not taken at once, and not refused.
    async def scenario() -> None:
        rds = Redis.from_url(redis_url)
        ghost_client = Redis.from_url(redis_url, client_name=client_name("beat", "worker", "ghost0"))
        await ghost_client.ping()  # connected, named as the ghost's heartbeat client
        key = Keys(key_prefix).alive("worker")
        await rds.set(key, "ghost0", px=600)
        heir = _intake(rds, key_prefix, "heir1")
        started = time.monotonic()
        await asyncio.wait_for(heir.claim(poll=0.1), timeout=120)  # a hang fails, not a slow machine
        assert time.monotonic() - started > 0.3  # waited for the key to expire (a lower bound only)
        assert await rds.get(key) == b"heir1"
        await ghost_client.aclose()
        await rds.aclose()

    asyncio.run(scenario())


def test_a_heartbeat_that_finds_its_key_taken_stops_the_process(redis_url: str, key_prefix: str) -> None:
    async def scenario() -> None:
        rds = Redis.from_url(redis_url)
        old, new = _intake(rds, key_prefix, "old000"), _intake(rds, key_prefix, "new000")
        await old.claim()
        await rds.set(Keys(key_prefix).alive("worker"), "new000", ex=10)  # taken over while `old` stalled
        with pytest.raises(DuplicateDispatcher, match="taken by another process"):
            await old.heartbeat()
        await new.heartbeat()  # the new one goes on
        await rds.aclose()

    asyncio.run(scenario())


def test_two_restarts_at_once_after_a_kill_let_one_run(redis_url: str, key_prefix: str) -> None:
    # A review found both taking the dead one's key over (a plain DEL, then each its SET): both ran until the
    # first one's next heartbeat. The take-over is conditional now; the other one meets a live key.
    async def one(name: str, log: list[str]) -> None:
        rds = Redis.from_url(redis_url, client_name=client_name("beat", "worker", name))
        me = _intake(rds, key_prefix, name)
        try:
            await me.claim(poll=0.05)
            log.append(f"{name} claimed")  # the start goes on: both would run until a heartbeat
            await me.heartbeat()
            log.append(f"{name} runs")
            for _ in range(8):  # its heartbeat, every 2 s in a dispatcher
                await asyncio.sleep(0.1)
                await me.heartbeat()
        except DuplicateDispatcher:
            log.append(f"{name} refused")
        finally:
            await rds.aclose()

    async def scenario() -> None:
        admin = Redis.from_url(redis_url)
        for round_ in range(5):
            await admin.set(Keys(key_prefix).alive("worker"), "dead00", ex=10)  # killed -9: no connection
            log: list[str] = []
            await asyncio.gather(one(f"a{round_}", log), one(f"b{round_}", log))
            assert sorted(x.split()[1] for x in log) == ["claimed", "refused", "runs"], log
            await admin.delete(Keys(key_prefix).alive("worker"))
        await admin.aclose()

    asyncio.run(scenario())


def test_the_one_that_lost_its_id_retires_nothing_of_the_winner(redis_url: str, key_prefix: str) -> None:
    async def scenario() -> None:
        rds = Redis.from_url(redis_url)
        keys = Keys(key_prefix)
        loser, winner = _intake(rds, key_prefix, "lost00"), _intake(rds, key_prefix, "won000")
        await loser.claim()
        await rds.set(keys.alive("worker"), "won000", ex=10)
        await winner.heartbeat()
        await loser.retire()
        assert await rds.get(keys.alive("worker")) == b"won000"
        assert await rds.sismember(keys.dispatchers, "worker")
        assert await rds.hexists(keys.owner_queues, "worker")
        await rds.aclose()

    asyncio.run(scenario())


def test_a_key_without_expiry_is_refused_with_its_name(redis_url: str, key_prefix: str) -> None:
    async def scenario() -> None:
        rds = Redis.from_url(redis_url)
        named = Redis.from_url(redis_url, client_name=client_name("beat", "worker", "other0"))
        await named.ping()
        await rds.set(Keys(key_prefix).alive("worker"), "other0")  # no EX: not a dispatcher's heartbeat
        with pytest.raises(DuplicateDispatcher, match="without an expiry"):
            await _intake(rds, key_prefix, "me0000").claim(poll=0.05)
        await named.aclose()
        await rds.aclose()

    asyncio.run(scenario())


def test_a_dispatcher_that_lost_its_id_hands_back_nothing_of_the_lists_it_shares(world: World) -> None:  # noqa: F811
    # Its processing lists are named by the id: the winner's too. Handed back, the winner's taken jobs would
    # be pushed onto the queues again under it.
    w = world

    async def body(d: Dispatcher) -> None:
        proc = d.rt.intake.procs[w.queue]
        await d.rt.redis.rpush(proc, "a job the winner took")
        d.rt.fatal = DuplicateDispatcher("taken")  # as the heartbeat's task leaves it

    settings = w.settings(["g0"])
    run(w, settings, body)
    keys = Keys(w.prefix)
    assert w.rds.lrange(keys.proc(w.queue, settings.dispatcher_id), 0, -1) == [b"a job the winner took"]
    assert w.rds.sismember(keys.dispatchers, settings.dispatcher_id)  # not retired: the winner's entry


def test_the_start_keeps_a_connection_a_twins_claim_sees(redis_url: str, key_prefix: str) -> None:
    # A review: the start's claim (preflight) closed its client, so until the process opened its own named
    # clients a twin found no connection of ours and took the id over at once, as from a killed process.
    from dispatcher.preflight import check_dispatcher_id
    from dispatcher.settings import DispatcherSettings
    from producer.settings import load
    from tests.dispatcher.harness import SECRET

    settings = load(
        DispatcherSettings,
        _env_file=None,
        redis_url=redis_url,
        redis_key_prefix=key_prefix,
        callback_secret=SECRET,
        dispatcher_id="worker",
    )
    holder = check_dispatcher_id(settings)
    assert holder is not None

    async def connected() -> bool:
        rds = Redis.from_url(redis_url)
        try:
            return await _intake(rds, key_prefix, "twin00")._connected(rds, settings.instance)
        finally:
            await rds.aclose()

    try:
        assert asyncio.run(connected())  # a twin waits for our heartbeat instead of taking the id
    finally:
        holder.close()
    deadline = time.monotonic() + 30
    while asyncio.run(connected()):  # gone with the process: a restart after a kill takes the id at once
        assert time.monotonic() < deadline
        time.sleep(0.05)
