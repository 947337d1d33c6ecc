"""After a dispatcher died (kill -9, OOM, power to its container): give back at once what it had recorded in
the database but never sent, by its journal of sent requests (``sent_journal.py``).

Without this, each such attempt (a standby bound on a busy slot, a job committed whose POST never left) held
its slot until its lease ran out (``TASK_TIMEOUT_SECONDS``, 15 minutes by default) and then used an attempt
(README "Standby jobs"). Now the next dispatcher to start on that machine (the restarted one, under the same
DISPATCHER_ID or a new one), and every dispatcher there every few seconds, reads the journals whose process
is gone and, for each attempt held by that dispatcher's id that the journal does not list:

- a standby still bound (its slot's job runs on): taken off the slot, due again at once;
- a slot's attempt: ended ``never_sent`` (no attempt used), the slot freed (to its standby, if any), the task
  due again at once; a cancelled one's slot freed.

Attempts the journal lists went out (or may have: the line is written before the request) and keep waiting
for their callback or lease, as before. Only what the dead life's id holds is judged, only by the journal
the id's mark names (``Keys.journal``: the last life of the id that wrote down all the id held), and only
while no other process runs under that id: the restarted process holds it already (it recovers before it
places anything); for another id, the reader stands in for it in Redis while it reads, as a restart would.
A reader that finds the id taken leaves the journal to that process (``RUNS_AGAIN_GRACE_SECONDS``), which
may be its restart here, between taking the id and reading its journals.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from redis.exceptions import RedisError

from dispatcher.db.attempts import finish_attempt
from dispatcher.db.cancels import release_cancelled
from dispatcher.db.unsent import bound_to, held_by, unbind_unsent
from dispatcher.queues.presence import (
    CLIENT_ROLES,
    HEARTBEAT_TTL_SECONDS,
    JOURNAL_MARK_TTL_SECONDS,
    client_name,
    new_instance,
)
from dispatcher.sent_journal import (
    DeadLife,
    Life,
    SentJournal,
    dead_lives,
    held_elsewhere,
    kept_a_journal,
    lock_path,
)
from dispatcher.states import Outcome, TaskState
from producer.connect import async_client

if TYPE_CHECKING:
    from dispatcher.loop.runtime import Runtime

log = logging.getLogger("gpuq.dispatcher")

#: A stand-in reads what a dead id holds only this long after taking the id (its key lives the heartbeat's
#: TTL): a restart of that id waits for the key, so nothing it places can be taken for the dead one's.
READ_WITHIN_SECONDS = HEARTBEAT_TTL_SECONDS - 4

#: A journal without a readable header younger than this may be a life that is starting (it writes its header
#: once it holds the lock, which a reader may take first): left for a later look, not removed.
YOUNG_SECONDS = 60.0

NEVER_SENT = "its dispatcher ({id}) stopped before sending it: given back without using an attempt"

#: A dead life's journal whose id another process runs again is left for this long: that process may be a
#: restart of the id on this machine that has claimed the id and not yet read its journals (it reads them at
#: its start, and removes them when it meets them later). Removed at once, its unsent standbys waited for
#: their leases (an outside trial: 11 of 16 slots idle for the lease after kill -9 and restart). Past it,
#: the process runs elsewhere or is done with its start: the journal is nobody's to read.
RUNS_AGAIN_GRACE_SECONDS = 60.0
#: ``_stand_in``: another process holds the id.
_RUNS_AGAIN = -1
#: At its start a restarted id waits this long at most for the journal its mark names while another process
#: holds its lock (a look that found the id taken lets go of it once its look is done), heartbeating
#: every ``_BEAT_EVERY_SECONDS``.
OWN_JOURNAL_WAIT_SECONDS = 30.0
_BEAT_EVERY_SECONDS = 2.0


async def recover(rt: Runtime, journal: SentJournal, *, starting: bool, previous: str | None = None) -> int:
    """The journals of dead lives in this machine's STATE_DIR, read and acted on; the number of attempts
    given back. Errors of one id's journals are logged and leave them for the next look.

    Of the dead lives of one id, only the one its mark (``Keys.journal``) names is read: the last life of
    the id that wrote down all the id held (every later life of it, with a journal or without, on this
    machine or another, moves the mark). Our own id's (``previous``: its mark before our start) are read
    only while ``starting``, before this process placed anything under it; met later (another reader held
    them at our start), they are only removed: our start wrote down all the id held as sent."""
    me = journal.life
    if me is None or not journal.enabled:
        return 0
    given = 0
    # In a thread: hundreds of journals (of other databases, say) took 100 ms of file calls per look.
    by_id = await asyncio.to_thread(_by_id, journal, me)
    if starting and previous is not None:
        by_id = await _with_own(rt, journal, me, by_id, previous)
    if journal.runs_again:  # lives whose journal is gone (read or removed by another process)
        journal.runs_again = await asyncio.to_thread(_still_there, journal)
    for dispatcher_id, lives in by_id.items():
        try:
            if dispatcher_id == me.dispatcher_id:
                if starting:  # we hold the id: no deadline
                    given += await _read(rt, lives, previous, math.inf)
            elif (n := await _stand_in(rt, journal, dispatcher_id, lives)) is None or (
                n == _RUNS_AGAIN and not _left_long_enough(journal, dispatcher_id, lives)
            ):
                for dead in lives:
                    dead.release()
                continue
            elif n != _RUNS_AGAIN:
                given += n
        except Exception:
            log.exception(
                "journal of a stopped dispatcher not read",
                extra={"action": "recovery", "dispatcher_id": dispatcher_id},
            )
            for dead in lives:
                dead.release()
            continue
        for dead in lives:
            journal.runs_again.pop(dead.instance, None)
            dead.forget()
    return given


async def _with_own(
    rt: Runtime, journal: SentJournal, me: Life, by_id: dict[str, list[DeadLife]], previous: str
) -> dict[str, list[DeadLife]]:
    """``by_id`` with the journal our mark names (``previous``), waited for while another process holds its
    lock: a reader that found our id taken (by us) lets go of it, at the latest when its look is done (it
    locks every dead journal first, then reads id after id). Missed, its unsent attempts waited for their
    leases. Our heartbeat is kept up meanwhile: its key must not lapse while we wait."""
    deadline = time.monotonic() + OWN_JOURNAL_WAIT_SECONDS
    beat_at = time.monotonic() + _BEAT_EVERY_SECONDS
    while not any(d.instance == previous for d in by_id.get(me.dispatcher_id, ())):
        # Not listed and nobody holds it: absent, or not ours to read (another database's, another boot's)
        if time.monotonic() >= deadline or not await asyncio.to_thread(held_elsewhere, journal, previous):
            break
        await asyncio.sleep(0.05)
        if time.monotonic() >= beat_at:
            await rt.intake.heartbeat()
            beat_at = time.monotonic() + _BEAT_EVERY_SECONDS
        for lives in by_id.values():
            for dead in lives:
                dead.release()
        by_id = await asyncio.to_thread(_by_id, journal, me)
    return by_id


def _still_there(journal: SentJournal) -> dict[str, tuple[float, set[str]]]:
    return {i: v for i, v in journal.runs_again.items() if (path := lock_path(journal, i)) and path.exists()}


def _left_long_enough(journal: SentJournal, dispatcher_id: str, lives: list[DeadLife]) -> bool:
    """Whether these dead lives' id has been found running again for ``RUNS_AGAIN_GRACE_SECONDS``."""
    now = time.monotonic()
    first = min(journal.runs_again[d.instance][0] for d in lives)
    if now - first < RUNS_AGAIN_GRACE_SECONDS:
        return False
    log.info(
        "journal of a stopped dispatcher whose id runs again elsewhere (or has read it): removed",
        extra={"action": "recovery", "dispatcher_id": dispatcher_id},
    )
    return True


def _by_id(journal: SentJournal, me: Life) -> dict[str, list[DeadLife]]:
    """The dead lives here that may be read, by dispatcher id; the others removed (unreadable, or from an
    earlier boot) or left (another database's)."""
    ids: dict[str, list[DeadLife]] = {}
    for dead in dead_lives(journal):
        life = dead.life
        if life is None and not dead.stale(YOUNG_SECONDS):  # a life starting: its header comes once we let go
            dead.release()
        elif life is None:
            log.warning(
                "journal of sent requests without a readable header: removed; its dispatcher's jobs wait for"
                " their leases",
                extra={"action": "recovery", "instance": dead.instance},
            )
            dead.forget()
        elif life.realm != me.realm:  # another database or Redis: not ours to read, unless long stale
            if dead.stale(JOURNAL_MARK_TTL_SECONDS):
                dead.forget()
            else:
                dead.release()
        elif life.boot != me.boot:
            log.warning(
                "journal of sent requests from before this machine restarted: not trusted (it may have lost"
                " its last lines), removed; that dispatcher's unsent jobs wait for their leases",
                extra={"action": "recovery", "dispatcher_id": life.dispatcher_id, "instance": life.instance},
            )
            dead.forget()
        else:
            ids.setdefault(life.dispatcher_id, []).append(dead)
    return ids


async def _read(rt: Runtime, lives: list[DeadLife], mark: str | None, deadline: float) -> int:
    """Give back by the journal of the life ``mark`` names, if it is among ``lives``."""
    for dead in lives:
        if dead.instance == mark and dead.life is not None:
            return await _give_back(rt, dead.life, dead.sent(), deadline)
    return 0


async def _stand_in(
    rt: Runtime, journal: SentJournal, dispatcher_id: str, lives: list[DeadLife]
) -> int | None:
    """Hold another id's heartbeat key while reading what it holds: a restart of that id waits for it.
    None: a life we took for dead still has a client on Redis (left for a later look); ``_RUNS_AGAIN``:
    another process holds the id (noted in ``journal.runs_again``). A process found holding the id at an
    earlier look that kept no journal here (a gpuq without it, or one on another machine that died before
    naming its own) may have sent what these journals do not list: they are then not read (0)."""
    stand_in = new_instance()
    key = rt.keys.alive(dispatcher_id)
    # A client named as that id's would be: a restart of the id that finds our key waits for it (claim).
    named = async_client(
        rt.settings.redis_dsn(),
        cluster=rt.settings.redis_cluster,
        client_name=client_name("beat", dispatcher_id, stand_in),
        socket_timeout=5,
    )
    try:
        await named.ping()
        dead = [d.instance for d in lives]
        if await _connected(named, dispatcher_id, dead):
            return None
        holder = await named.eval(_STAND_IN, 1, key, stand_in, HEARTBEAT_TTL_SECONDS, *dead)
        deadline = time.monotonic() + READ_WITHIN_SECONDS
        if holder != 1:  # another process runs under that id now: what it holds is not the dead lives'
            now, holder = time.monotonic(), holder.decode() if isinstance(holder, bytes) else str(holder)
            for instance in dead:
                journal.runs_again.setdefault(instance, (now, set()))[1].add(holder)
            return _RUNS_AGAIN
        try:
            seen = {h for i in dead if i in journal.runs_again for h in journal.runs_again[i][1]}
            if blind := sorted(h for h in seen if not kept_a_journal(journal, dispatcher_id, h)):
                log.warning(
                    "journal of a stopped dispatcher not read: a later process of its id kept no journal"
                    " here (a gpuq without it, or on another machine) and may have sent what it does not"
                    " list; that id's unsent jobs wait for their leases",
                    extra={"action": "recovery", "dispatcher_id": dispatcher_id, "later": blind},
                )
                return 0
            mark = await named.get(rt.keys.journal(dispatcher_id))
            return await _read(rt, lives, mark.decode() if isinstance(mark, bytes) else mark, deadline)
        finally:
            await named.eval(_STAND_DOWN, 1, key, stand_in)
    finally:
        await named.aclose()


async def _connected(r: Redis, dispatcher_id: str, instances: list[str]) -> bool:
    """Does a process of these lives still hold a connection to Redis? Its lock says it is gone; this
    says so too, where Redis lets us look (CLIENT may be refused: then the lock alone decides)."""
    names = {client_name(role, dispatcher_id, i) for role in CLIENT_ROLES for i in instances}
    try:
        clients = await r.client_list()
    except RedisError:
        return False
    return any(c.get("name") in names for c in clients)


#: Take a dead id's heartbeat key for a stand-in: when nobody holds it, or one of its dead lives still does
#: (1); else the instance that holds it.
_STAND_IN = """
local v = redis.call('GET', KEYS[1])
if v then
  local dead = false
  for i = 3, #ARGV do if ARGV[i] == v then dead = true end end
  if not dead then return v end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""
_STAND_DOWN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


async def _give_back(rt: Runtime, life: Life, sent: set[tuple[str, int]], deadline: float) -> int:
    """Give back what ``life``'s id holds and ``sent`` does not list. Reads only before ``deadline``: what
    they find is the dead life's; the writes after are each conditional on exactly that attempt."""
    me = life.dispatcher_id
    why = NEVER_SENT.format(id=me)
    bound = await rt.db(bound_to, dispatcher_id=me)
    unsent = [t for t, a in bound if (t, a) not in sent]
    if time.monotonic() > deadline:
        return 0
    due = await rt.db(unbind_unsent, task_ids=unsent, dispatcher_id=me, now=rt.now()) if unsent else []
    held = await rt.db(held_by, dispatcher_id=me)  # after the unbind: a standby promoted meanwhile is here
    if time.monotonic() > deadline:
        held = []
    ended = freed = 0
    for task_id, attempt, state in held:
        if (task_id, attempt) in sent:
            continue
        if time.monotonic() > deadline:  # the id's key may be gone: a restart of it may be placing now
            break
        if state == TaskState.PROCESSING.value:
            fin = await rt.db(
                finish_attempt,
                task_id=task_id,
                attempt=attempt,
                outcome=Outcome.NEVER_SENT,
                now=rt.now(),
                backoff=rt.backoff,
                error=why,
                lease_seconds=rt.settings.task_timeout_seconds,
            )
            if fin.code == "applied":
                ended += 1
                rt.events.publish(
                    fin.state or "retrying", task_id, attempt=attempt, outcome="never_sent", error=why
                )
        elif state == TaskState.CANCELLED.value:
            freed += await rt.db(
                release_cancelled,
                task_id=task_id,
                attempt=attempt,
                now=rt.now(),
                lease_seconds=rt.settings.task_timeout_seconds,
            )
    for task_id in due:
        rt.events.publish("retrying", task_id, attempt=0, outcome="never_sent", error=why)
    if due or ended or freed or held or bound:
        log.warning(
            "a stopped dispatcher's jobs recorded but never sent are given back at once",
            extra={
                "action": "recovery",
                "dispatcher_id": me,
                "instance": life.instance,
                "standbys_unbound": len(due),
                "attempts_given_back": ended,
                "cancelled_freed": freed,
                "sent_still_held": len([1 for t, a, _ in held if (t, a) in sent]),
            },
        )
    return len(due) + ended + freed
