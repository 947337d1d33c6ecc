"""Pull GPUs in the database: registration and agent tokens, the agents' polls, silent agents.

A job for a pull GPU is placed like any other (``dispatch``: a slot claimed, the task ``processing``,
least-loaded first); nothing is sent. Its agent's next poll, at whichever dispatcher, takes it: the
conditional ``UPDATE tasks SET fetched_attempt = attempt WHERE … fetched_attempt <> attempt`` lets exactly
one poll have it, and renews the slot's lease (the GPU gets the whole lease from the moment it has the
job). A batch of looks (``poll_many``) locks the task rows of the jobs it takes (``SELECT … FOR UPDATE``)
and marks them all in one statement: a concurrent look, here or at another dispatcher, waits and finds them
fetched. A job never fetched is settled by its lease, or earlier when its agent falls silent
(``take_back_unfetched``). A job cancelled before its agent fetched it frees its slot at the next poll: the
GPU never had it, so nothing needs confirming.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Connection, select, text, update

from dispatcher.db.batch import statement
from dispatcher.db.cancels import release_cancelled
from dispatcher.db.gpus import in_turn, register_gpu
from dispatcher.db.schema import gpus
from dispatcher.gpus.pull import PULL_SCHEME, hash_agent_token, new_agent_token, pull_url
from dispatcher.states import TaskState

Status = Literal["ok", "unauthenticated", "forbidden", "unknown"]

#: How far a poll must move its agent's "seen until" mark before it is written.
SEEN_SLACK = timedelta(seconds=5)
#: A pull GPU no agent has polled yet, or whose agent fell silent: why it is out of rotation.
NO_AGENT = "no agent has polled yet"

_UNFETCHED_MANY = statement(
    """
    SELECT s.gpu_id, s.slot_index, t.task_id, t.type, t.data, t.attempt, t.state
    FROM slots s JOIN tasks t ON t.task_id = s.task_id
    WHERE s.gpu_id IN :ids AND t.attempt = s.attempt
      AND (t.fetched_attempt IS NULL OR t.fetched_attempt <> t.attempt)
    ORDER BY s.gpu_id, s.claimed_at, s.slot_index
    """,
    lists=("ids",),
)
_READ_TASKS_SQL = (
    "SELECT task_id, attempt, state, fetched_attempt FROM tasks WHERE task_id IN :ids ORDER BY task_id"
)
_READ_TASKS = statement(_READ_TASKS_SQL, lists=("ids",))
_LOCK_TASKS = statement(_READ_TASKS_SQL + " FOR UPDATE", lists=("ids",))
_TAKE_MANY = statement(
    "UPDATE tasks SET fetched_attempt = attempt WHERE task_id IN :ids"
    " AND state = 'processing' AND (fetched_attempt IS NULL OR fetched_attempt <> attempt)",
    lists=("ids",),
)
_RENEW_MANY = statement(
    "UPDATE slots SET lease_expires_at = :lease WHERE (task_id, attempt) IN :pairs",
    stamps=("lease",),
    lists=("pairs",),
)
# Standbys bound to its slots too (db/standby.py): their owner may POST them to the old service (early, on
# their holder's callback); its agent must not fetch them as well. The owner takes the rest back.
_DELIVERED = text(
    "UPDATE tasks SET fetched_attempt = attempt WHERE task_id IN"
    " (SELECT next_task_id FROM slots WHERE gpu_id = :gpu_id AND next_task_id IS NOT NULL)"
    " OR task_id IN (SELECT task_id FROM slots WHERE gpu_id = :gpu_id AND task_id IS NOT NULL)"
)


@dataclass(frozen=True, slots=True)
class AgentJob:
    task_id: str
    type: str
    data: Any
    attempt: int


@dataclass(slots=True)
class Poll:
    status: Status
    jobs: list[AgentJob] = field(default_factory=list)
    back: bool = False  # the GPU was out of rotation (no agent) and is back in: placement should look
    released: int = 0  # slots of jobs cancelled before they were fetched, freed now
    # The GPU as the database spells it (``G0 `` in a path finds ``g0``): what a dispatcher keys its waiting
    # polls by, so that each GPU's cap holds whatever spelling its agent uses, and wake-ups reach them.
    gpu_id: str | None = None


def register_pull(conn: Connection, *, gpu_id: str, pool: str, slot_count: int, now: datetime) -> str | None:
    """``gpuq gpu add NAME --pull``: register a pull GPU (or change a known one's pool and slots, or make a
    pushed one a pull GPU). Returns its new agent token when it had none, else None (the token stays)."""
    in_turn(conn)  # before the GPU's row, as register_gpu below takes them
    known = conn.execute(select(gpus.c.url).where(gpus.c.gpu_id == gpu_id).with_for_update()).first()
    register_gpu(conn, gpu_id=gpu_id, url=pull_url(gpu_id), pool=pool, slot_count=slot_count, now=now)
    if known is None or not known.url.startswith(PULL_SCHEME):
        # Out of rotation until its agent polls: jobs placed on a GPU nobody fetches from only wait.
        conn.execute(
            update(gpus)
            .where(gpus.c.gpu_id == gpu_id)
            .values(healthy=False, down_until=None, last_error=NO_AGENT, agent_seen_until=None)
        )
        # Jobs on its slots were POSTed to its service, which runs them and calls back: to the agent (and
        # to the silent-agent sweep) they are fetched, or they would run twice.
        conn.execute(_DELIVERED, {"gpu_id": gpu_id})
    return ensure_token(conn, gpu_id=gpu_id, now=now)


def ensure_token(conn: Connection, *, gpu_id: str, now: datetime) -> str | None:
    """Give a pull GPU without an agent token one (a dispatcher registering ``pull:NAME`` of GPU_ENDPOINTS);
    the token is returned to be shown once. None when it has one already (or is no pull GPU)."""
    row = conn.execute(
        select(gpus.c.url, gpus.c.agent_token_hash, gpus.c.agent_seen_until)
        .where(gpus.c.gpu_id == gpu_id)
        .with_for_update()
    ).first()
    if row is None or not row.url.startswith(PULL_SCHEME) or row.agent_token_hash is not None:
        return None
    token = new_agent_token()
    values: dict[str, object] = {"agent_token_hash": hash_agent_token(token), "updated_at": now}
    if row.agent_seen_until is None:
        values |= {"healthy": False, "down_until": None, "last_error": NO_AGENT}
    conn.execute(update(gpus).where(gpus.c.gpu_id == gpu_id).values(**values))
    return token


def rotate_token(conn: Connection, *, gpu_id: str, now: datetime) -> str | None:
    """A new agent token for a pull GPU; the old one stops working at once (its polls in progress get
    nothing more). None when the GPU is unknown or no pull GPU."""
    row = conn.execute(select(gpus.c.url).where(gpus.c.gpu_id == gpu_id).with_for_update()).first()
    if row is None or not row.url.startswith(PULL_SCHEME):
        return None
    token = new_agent_token()
    conn.execute(
        update(gpus)
        .where(gpus.c.gpu_id == gpu_id)
        .values(agent_token_hash=hash_agent_token(token), updated_at=now)
    )
    return token


def pull_gpu(conn: Connection, *, gpu_id: str) -> tuple[bool, bool] | None:
    """(is a pull GPU, has a token) of a known GPU, None for an unknown one."""
    row = conn.execute(select(gpus.c.url, gpus.c.agent_token_hash).where(gpus.c.gpu_id == gpu_id)).first()
    if row is None:
        return None
    return row.url.startswith(PULL_SCHEME), row.agent_token_hash is not None


def _authenticate(conn: Connection, *, gpu_id: str, token_hash: str) -> tuple[Status, Any]:
    """Who is polling. A token no GPU has is 401 whatever the path names (an unauthenticated caller learns
    nothing about which GPUs exist); an agent of another GPU is 403 for a GPU that exists, 404 else."""
    row = conn.execute(
        select(
            gpus.c.gpu_id, gpus.c.agent_token_hash, gpus.c.healthy, gpus.c.url, gpus.c.agent_seen_until
        ).where(gpus.c.gpu_id == gpu_id)
    ).first()
    stored = row.agent_token_hash if row is not None and row.url.startswith(PULL_SCHEME) else None
    if stored is not None and hmac.compare_digest(stored.encode(), token_hash.encode()):
        return "ok", row
    owner = conn.execute(select(gpus.c.gpu_id).where(gpus.c.agent_token_hash == token_hash)).first()
    if owner is None:
        return "unauthenticated", None
    return ("unknown" if row is None else "forbidden"), None


def poll(
    conn: Connection,
    *,
    gpu_id: str,
    token_hash: str,
    max_jobs: int,
    now: datetime,
    lease_seconds: float,
    seen_until: datetime | None,
    seen_slack: timedelta = SEEN_SLACK,
) -> Poll:
    """One look of an agent's long poll: check its token, note that it is there (``seen_until``: when its
    poll ends, given on the first look), free the slots of jobs cancelled before they were fetched, and
    take up to ``max_jobs`` jobs placed on its slots. A batch of one (``poll_many``)."""
    look = {"gpu_id": gpu_id, "token_hash": token_hash, "max_jobs": max_jobs, "now": now}
    look |= {"lease_seconds": lease_seconds, "seen_until": seen_until, "seen_slack": seen_slack}
    return poll_many(conn, looks=[look])[0]


def poll_many(conn: Connection, *, looks: list[dict[str, Any]]) -> list[Poll]:
    """The looks of several waiting polls in one transaction, each answered as if alone and in turn (a GPU
    polled twice splits its jobs in order), in five statements whatever their number: their GPUs, their
    unfetched jobs, those jobs' task rows locked, the jobs taken marked fetched, their leases renewed. One
    statement per look and two per job took 15 ms per batch of 4-5 looks in the pull benchmark, one batch at
    a time, and the agents' next jobs waited for it (pickup p50 ~90 ms).

    Locks: only the task rows of the jobs to take, in key order, then their slots (as ending an attempt,
    a hand-off or a cancel lock a task, then its slot): no slot row is locked while a task row is awaited,
    and free slots are never locked (placement does not wait for a look)."""
    out = [Poll("ok") for _ in looks]
    gpu_of, agent = _authenticate_many(conn, looks, out)
    if not agent:
        return out
    waiting: dict[str, list[Any]] = {gpu_id: [] for gpu_id in agent}
    for r in conn.execute(_UNFETCHED_MANY, {"ids": sorted(agent)}):
        waiting[r.gpu_id].append(r)
    _keep_unfetched(conn, waiting)
    taken: list[Any] = []
    for i, look in enumerate(looks):
        gpu_id = gpu_of[i]
        if gpu_id is None:
            continue
        out[i].gpu_id = gpu_id
        rest = []
        for r in waiting[gpu_id]:
            if r.state != TaskState.PROCESSING.value:  # cancelled (or ended) before its agent had it
                out[i].released += release_cancelled(conn, task_id=r.task_id, attempt=r.attempt)
            elif len(out[i].jobs) < look["max_jobs"]:
                out[i].jobs.append(AgentJob(r.task_id, r.type, json.loads(r.data), r.attempt))
                taken.append(r)
            else:
                rest.append(r)  # for the GPU's next look in this batch
        waiting[gpu_id] = rest
        _mark_seen(conn, out[i], gpu_id, look, agent[gpu_id])
    if taken:
        _take_many(conn, taken, lease=looks[0]["now"] + timedelta(seconds=looks[0]["lease_seconds"]))
    return out


@dataclass(slots=True)
class _Agent:
    """What a batch's transaction knows of a polling GPU, kept up to date as it writes."""

    healthy: bool
    seen_until: datetime | None


def _authenticate_many(
    conn: Connection, looks: list[dict[str, Any]], out: list[Poll]
) -> tuple[list[str | None], dict[str, _Agent]]:
    """``_authenticate`` for every look, their GPUs read at once; a look whose GPU id or token does not match
    a row exactly is asked again alone (its status 401, 403 or 404 as a lone poll gets; or "ok" for an id
    the database compares equal, in another case say). Returns each look's GPU as the database spells it
    (None: not this agent's), and the GPUs polled rightly."""
    ids = sorted({look["gpu_id"] for look in looks})
    columns = (gpus.c.gpu_id, gpus.c.agent_token_hash, gpus.c.healthy, gpus.c.url, gpus.c.agent_seen_until)
    rows = {r.gpu_id: r for r in conn.execute(select(*columns).where(gpus.c.gpu_id.in_(ids)))}
    gpu_of: list[str | None] = []
    agent: dict[str, _Agent] = {}
    for i, look in enumerate(looks):
        row, token = rows.get(look["gpu_id"]), look["token_hash"]
        stored = row.agent_token_hash if row is not None and row.url.startswith(PULL_SCHEME) else None
        if row is None or stored is None or not hmac.compare_digest(stored.encode(), token.encode()):
            out[i].status, row = _authenticate(conn, gpu_id=look["gpu_id"], token_hash=token)
        if row is None:
            gpu_of.append(None)
            continue
        gpu_of.append(row.gpu_id)
        if row.gpu_id not in agent:
            agent[row.gpu_id] = _Agent(row.healthy, row.agent_seen_until)
    return gpu_of, agent


def _keep_unfetched(conn: Connection, waiting: dict[str, list[Any]]) -> None:
    """Lock the task rows of the jobs about to be taken (read without a lock) and keep those still waiting
    for their agent: another look, here or at another dispatcher, that took one first has committed by the
    time the lock is ours, and one that comes after waits for this transaction and finds them fetched."""
    ids = sorted(
        {r.task_id for rows in waiting.values() for r in rows if r.state == TaskState.PROCESSING.value}
    )
    if not ids:
        return
    lock = _LOCK_TASKS if conn.dialect.name in ("mysql", "mariadb") else _READ_TASKS  # SQLite: one writer
    now = {t.task_id: t for t in conn.execute(lock, {"ids": ids})}
    for gpu_id, rows in waiting.items():
        waiting[gpu_id] = [r for r in rows if r.state != TaskState.PROCESSING.value or _unfetched(now, r)]


def _unfetched(now: dict[str, Any], r: Any) -> bool:
    t = now.get(r.task_id)
    return (
        t is not None
        and t.state == TaskState.PROCESSING.value
        and t.attempt == r.attempt
        and (t.fetched_attempt is None or t.fetched_attempt != t.attempt)
    )


def _mark_seen(conn: Connection, out: Poll, gpu_id: str, look: dict[str, Any], agent: _Agent) -> None:
    """The "seen until" mark and return to rotation, for one look: the agent is there until its poll's wait
    runs out (or it hangs up: ``agent_left``). Written only when it moves the mark by the slack or more (an
    agent polling again and again costs no write per poll), and always when the GPU comes back; the caller
    keeps the slack well below AGENT_STALE_SECONDS, or a mark left behind by the slack would make a polling
    agent look silent."""
    seen_until = look.get("seen_until")
    if seen_until is None:
        return
    slack = min(SEEN_SLACK, look.get("seen_slack", SEEN_SLACK))
    values: dict[str, object] = {}
    if not agent.healthy or agent.seen_until is None or agent.seen_until < seen_until - slack:
        values["agent_seen_until"] = seen_until
        agent.seen_until = seen_until
    if not agent.healthy:
        values |= {"healthy": True, "consecutive_failures": 0, "down_until": None, "last_error": None}
        out.back = True
        agent.healthy = True
    if values:
        conn.execute(update(gpus).where(gpus.c.gpu_id == gpu_id).values(**values))


def _take_many(conn: Connection, taken: list[Any], *, lease: datetime) -> None:
    """Mark the jobs fetched and give their slots the whole lease from now. Their task rows are locked by
    this transaction (``_keep_unfetched``), so a count that differs is a bug: everything is rolled back
    rather than a job handed out twice or lost."""
    ids = [r.task_id for r in taken]
    got = conn.execute(_TAKE_MANY, {"ids": ids}).rowcount
    if got != len(ids):
        raise RuntimeError(f"marked {got} of {len(ids)} locked jobs fetched")
    pairs = [(r.task_id, r.attempt) for r in taken]
    conn.execute(_RENEW_MANY, {"pairs": pairs, "lease": lease})
