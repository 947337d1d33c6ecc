"""Pull GPUs whose agents are gone, and the jobs placed on them that no agent has: given back to wait
without using an attempt (nothing ran them), and the silent GPUs taken out of rotation until they poll.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Connection, select, text, update

from dispatcher.db.batch import statement
from dispatcher.db.schema import gpus
from dispatcher.gpus.pull import PULL_SCHEME

_TAKE = text(
    "UPDATE tasks SET fetched_attempt = :attempt WHERE task_id = :task_id AND attempt = :attempt"
    " AND state = 'processing' AND (fetched_attempt IS NULL OR fetched_attempt <> :attempt)"
)
_SILENT_UNFETCHED = text(
    """
    SELECT t.task_id, t.attempt, s.gpu_id
    FROM slots s JOIN gpus g ON g.gpu_id = s.gpu_id JOIN tasks t ON t.task_id = s.task_id
    WHERE g.url LIKE 'pull:%' AND g.healthy = 0 AND t.attempt = s.attempt AND t.state = 'processing'
      AND (t.fetched_attempt IS NULL OR t.fetched_attempt <> t.attempt)
    """
)


_UNFETCHED_OF = statement(
    """
    SELECT t.task_id, t.attempt, s.gpu_id
    FROM slots s JOIN gpus g ON g.gpu_id = s.gpu_id JOIN tasks t ON t.task_id = s.task_id
    WHERE (t.task_id, t.attempt) IN :pairs AND s.attempt = t.attempt AND t.state = 'processing'
      AND g.url LIKE 'pull:%' AND (t.fetched_attempt IS NULL OR t.fetched_attempt <> t.attempt)
    """,
    lists=("pairs",),
)


_UNFETCH = statement(
    "UPDATE tasks SET fetched_attempt = NULL WHERE (task_id, attempt) IN :pairs AND state = 'processing'"
    " AND fetched_attempt = attempt",
    lists=("pairs",),
)


def unfetch(conn: Connection, *, jobs: list[tuple[str, int]]) -> int:
    """Jobs a poll took for an agent that hung up before it was answered: nobody has them, so the GPU's next
    poll is handed them again. Left marked fetched, they held their slots until the lease ran out and then
    used an attempt (with MAX_ATTEMPTS=1 the task failed, never having reached a GPU)."""
    if not jobs:
        return 0
    return int(conn.execute(_UNFETCH, {"pairs": [tuple(j) for j in jobs]}).rowcount)


def agent_left(conn: Connection, *, gpu_id: str, seen_until: datetime, now: datetime) -> None:
    """The agent hung up during its poll (killed, or its network gone): it was last seen now, not at the
    end of the wait it asked for, so a dead agent leaves rotation AGENT_STALE_SECONDS from now. Left as it
    is when a later poll of the agent has written since (it polls again elsewhere)."""
    conn.execute(
        update(gpus)
        .where(gpus.c.gpu_id == gpu_id, gpus.c.agent_seen_until <= seen_until, gpus.c.agent_seen_until > now)
        .values(agent_seen_until=now)
    )


def silence(conn: Connection, *, now: datetime, stale_seconds: float) -> list[str]:
    """Take pull GPUs whose agent has not polled for ``stale_seconds`` out of rotation (``healthy`` false,
    never probed: only a poll brings one back); returns their ids. Safe in every dispatcher at once."""
    cutoff = now - timedelta(seconds=stale_seconds)
    rows = conn.execute(
        select(gpus.c.gpu_id).where(
            gpus.c.url.like(f"{PULL_SCHEME}%"),
            gpus.c.healthy.is_(True),
            (gpus.c.agent_seen_until.is_(None)) | (gpus.c.agent_seen_until < cutoff),
        )
    ).scalars()
    gone = []
    for gpu_id in list(rows):
        res = conn.execute(
            update(gpus)
            .where(
                gpus.c.gpu_id == gpu_id,
                gpus.c.healthy.is_(True),
                (gpus.c.agent_seen_until.is_(None)) | (gpus.c.agent_seen_until < cutoff),
            )
            .values(
                healthy=False,
                down_until=None,
                last_error=f"agent silent for over {stale_seconds:g} s",
                updated_at=now,
            )
        )
        if res.rowcount == 1:
            gone.append(gpu_id)
    return gone


def take_back_unfetched_of(conn: Connection, *, leases: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """Of these expired leases, those on a pull GPU's job its agent never fetched: nothing ran them, so they
    must not use an attempt (README: such jobs wait again). Marked taken, as ``take_back_unfetched`` does,
    and returned with their GPUs: {(task_id, attempt): gpu_id}. One look for the whole sweep. With
    TASK_TIMEOUT_SECONDS under AGENT_STALE_SECONDS the lease ran out first and the job used an attempt (an
    outside trial)."""
    out: dict[tuple[str, int], str] = {}
    if not leases:
        return out
    for r in conn.execute(_UNFETCHED_OF, {"pairs": [tuple(lease) for lease in leases]}).all():
        if conn.execute(_TAKE, {"task_id": r.task_id, "attempt": r.attempt}).rowcount == 1:
            out[(r.task_id, r.attempt)] = str(r.gpu_id)
    return out


def take_back_unfetched(conn: Connection) -> list[tuple[str, int, str]]:
    """Jobs placed on pull GPUs now out of rotation that no agent fetched: marked taken (no poll can have
    them any more) and returned as (task_id, attempt, gpu_id), for the caller to send back to wait
    without using an attempt. Marking first: a poll that took one a moment before keeps it."""
    out = []
    for r in conn.execute(_SILENT_UNFETCHED).all():
        if conn.execute(_TAKE, {"task_id": r.task_id, "attempt": r.attempt}).rowcount == 1:
            out.append((r.task_id, r.attempt, r.gpu_id))
    return out
