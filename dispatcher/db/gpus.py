"""GPU rows: registration (with their slot rows), drain, removal, and health shared by all dispatchers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, delete, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from dispatcher.db.attempts import Backoff, finish_attempt
from dispatcher.db.schema import gpus, schema_version, slots
from dispatcher.gpus.endpoints import name_problem, url_taken
from dispatcher.gpus.pull import is_pull
from dispatcher.gpus.same_service import same_service
from dispatcher.states import GpuState, Outcome

_UNFETCHED = text(
    """
    SELECT t.task_id, t.attempt FROM slots s JOIN tasks t ON t.task_id = s.task_id
    WHERE s.gpu_id = :gpu_id AND t.attempt = s.attempt AND t.state = 'processing'
      AND (t.fetched_attempt IS NULL OR t.fetched_attempt <> t.attempt)
    """
)
_MARK_FETCHED = text(
    "UPDATE tasks SET fetched_attempt = :attempt WHERE task_id = :task_id AND attempt = :attempt"
    " AND state = 'processing' AND (fetched_attempt IS NULL OR fetched_attempt <> :attempt)"
)


@dataclass(frozen=True, slots=True)
class GpuRow:
    gpu_id: str
    url: str
    pool: str
    slots: int
    busy: int
    state: str
    healthy: bool
    consecutive_failures: int
    last_error: str | None


class UrlTaken(ValueError):
    """A GPU registered at the URL of another: one service would get the jobs of both (``same_service``)."""


class NameRefused(ValueError):
    """A new GPU of GPU_ENDPOINTS whose name no agent's URL can hold (``NOT_IN_GPU_NAMES``). Judged here, not
    when GPU_ENDPOINTS is read: a GPU registered under such a name before the rule keeps starting."""


def in_turn(conn: Connection) -> None:
    """Registrations run one at a time: each takes this lock first (the schema's rows, there once the schema
    is made), before any GPU row, so no two orders of locks meet. Under READ COMMITTED a read of the pool's
    GPUs locks no row not yet inserted: two ``gpu add`` of one URL under two names at the same moment both
    passed ``_check_url``, and one service got the jobs of two GPUs (a review). SQLite has one writer."""
    conn.execute(select(schema_version.c.version).with_for_update()).all()


def _check_url(conn: Connection, *, gpu_id: str, url: str, pool: str) -> None:
    """Raise UrlTaken when another GPU of ``pool`` is registered at ``url`` (a fleet is small: every URL of
    the pool is read). Not against what is registered already: a database holding such a pair from before
    keeps working, and each of its GPUs can still be changed."""
    rows = conn.execute(select(gpus.c.gpu_id, gpus.c.url).where(gpus.c.gpu_id != gpu_id, gpus.c.pool == pool))
    for other, theirs in rows:
        if same_service(theirs, url):
            raise UrlTaken(url_taken(gpu_id, other, url))


def register_gpu(
    conn: Connection, *, gpu_id: str, url: str, pool: str, slot_count: int, now: datetime
) -> None:
    """Add a GPU or update its URL, pool and slot count (idempotent: every dispatcher does it at start).
    UrlTaken when another GPU has that URL."""
    in_turn(conn)
    row = conn.execute(
        select(gpus.c.url, gpus.c.pool).where(gpus.c.gpu_id == gpu_id).with_for_update()
    ).first()
    if row is None or (row.url, row.pool) != (url, pool):  # what it had stays allowed
        _check_url(conn, gpu_id=gpu_id, url=url, pool=pool)
    if row is None:
        conn.execute(
            insert(gpus).values(
                gpu_id=gpu_id, url=url, pool=pool, slots=slot_count, created_at=now, updated_at=now
            )
        )
    else:
        values: dict[str, object] = {"url": url, "pool": pool, "slots": slot_count, "updated_at": now}
        if not is_pull(url):  # a pull GPU given a URL: its agent token no longer opens anything
            values |= {"agent_token_hash": None, "agent_seen_until": None}
            if is_pull(row.url):
                _unfetched_back(conn, gpu_id=gpu_id, now=now)
        conn.execute(update(gpus).where(gpus.c.gpu_id == gpu_id).values(**values))
    have = set(conn.execute(select(slots.c.slot_index).where(slots.c.gpu_id == gpu_id)).scalars())
    missing = [{"gpu_id": gpu_id, "slot_index": i} for i in range(slot_count) if i not in have]
    if missing:
        conn.execute(insert(slots), missing)
    trim_slots(conn, gpu_id=gpu_id, slot_count=slot_count)


def register_new(
    conn: Connection, *, gpu_id: str, url: str, pool: str, slot_count: int, now: datetime
) -> GpuRow | None:
    """A dispatcher's start: register ``gpu_id`` if the database does not know it yet. A known GPU is left
    as it is (``gpuq gpu set`` changes it) and returned when its URL or pool differ, so the caller can stop:
    a dispatcher with a stale or malformed GPU_ENDPOINTS must not rewrite a fleet others are using.
    NameRefused for a new GPU whose name an agent's URL cannot hold."""
    # In turn before the look: a dispatcher starting beside another that registers this GPU now waits for
    # that one's commit and then judges its row, instead of finding none and writing over it in register_gpu.
    in_turn(conn)
    row = conn.execute(select(gpus).where(gpus.c.gpu_id == gpu_id).with_for_update()).first()
    if row is None and (problem := name_problem("GPU name", gpu_id, in_url=True)):
        raise NameRefused(problem)
    if row is None:
        # Without the turn (SQLite takes one writer at a time anyway; a database whose schema rows are gone),
        # under READ COMMITTED the locking read above locks no row that does not exist yet: two dispatchers
        # starting together both get here, and the second INSERT waits for the first, then fails on the key.
        # That one then judges the registration the other made, like any known GPU, instead of dying.
        try:
            with conn.begin_nested():
                register_gpu(conn, gpu_id=gpu_id, url=url, pool=pool, slot_count=slot_count, now=now)
            return None
        except IntegrityError:
            row = conn.execute(select(gpus).where(gpus.c.gpu_id == gpu_id)).first()
            if row is None:
                raise
    if row.url == url and row.pool == pool:
        return None
    return GpuRow(
        gpu_id=row.gpu_id,
        url=row.url,
        pool=row.pool,
        slots=row.slots,
        busy=0,
        state=row.state,
        healthy=bool(row.healthy),
        consecutive_failures=row.consecutive_failures,
        last_error=row.last_error,
    )


def update_gpu(
    conn: Connection,
    *,
    gpu_id: str,
    now: datetime,
    url: str | None = None,
    pool: str | None = None,
    slot_count: int | None = None,
    cancel_url: str | None = None,
) -> bool:
    """``gpuq gpu set``: change what is given of a known GPU's registration; False when it is unknown.
    A new URL starts with a clean health record (the failures were the old URL's). ``cancel_url``: where
    cancels go instead of ``<url>/cancel``; ``""`` goes back to that."""
    in_turn(conn)
    row = conn.execute(select(gpus).where(gpus.c.gpu_id == gpu_id).with_for_update()).first()
    if row is None:
        return False
    values: dict[str, object] = {"updated_at": now}
    if (url is not None and url != row.url) or (pool is not None and pool != row.pool):
        _check_url(conn, gpu_id=gpu_id, url=url or row.url, pool=pool or row.pool)
    if url is not None and url != row.url:
        values |= {"url": url, "healthy": True, "consecutive_failures": 0, "down_until": None}
        # A pull GPU given a URL is pushed to from now on: its agent token no longer opens anything.
        values |= {"agent_token_hash": None, "agent_seen_until": None}
        if is_pull(row.url) and not is_pull(url):
            _unfetched_back(conn, gpu_id=gpu_id, now=now)
    if pool is not None:
        values["pool"] = pool
    if slot_count is not None:
        values["slots"] = slot_count
    if cancel_url is not None:
        values["cancel_url"] = cancel_url or None
    conn.execute(update(gpus).where(gpus.c.gpu_id == gpu_id).values(**values))
    if slot_count is not None:
        have = set(conn.execute(select(slots.c.slot_index).where(slots.c.gpu_id == gpu_id)).scalars())
        missing = [{"gpu_id": gpu_id, "slot_index": i} for i in range(slot_count) if i not in have]
        if missing:
            conn.execute(insert(slots), missing)
        trim_slots(conn, gpu_id=gpu_id, slot_count=slot_count)
    return True


def _unfetched_back(conn: Connection, *, gpu_id: str, now: datetime) -> None:
    """A pull GPU becomes a pushed one: jobs placed on it that its agent never fetched would never be sent
    (a job is POSTed when placed) nor fetched (the token goes): they wait again at once, no attempt used,
    instead of holding their slot for a whole lease and then using an attempt. Marked fetched first, so a
    poll under way cannot take one as well."""
    for r in conn.execute(_UNFETCHED, {"gpu_id": gpu_id}).all():
        params = {"task_id": r.task_id, "attempt": r.attempt}
        if conn.execute(_MARK_FETCHED, params).rowcount == 1:
            finish_attempt(
                conn,
                task_id=r.task_id,
                attempt=r.attempt,
                outcome=Outcome.GPU_REFUSED,
                now=now,
                backoff=Backoff(),
                error=f"GPU {gpu_id} became a pushed GPU before its agent fetched the job",
            )


def trim_slots(conn: Connection, *, gpu_id: str, slot_count: int) -> None:
    """Drop free slot rows beyond the GPU's slot count. Busy ones stay until the next change of the count
    (or registration): placement never uses a slot number at or above the count (db/snapshot.py), so once
    their job ends they are rows, not capacity."""
    conn.execute(
        delete(slots).where(
            slots.c.gpu_id == gpu_id, slots.c.slot_index >= slot_count, slots.c.task_id.is_(None)
        )
    )


def set_gpu_state(conn: Connection, *, gpu_id: str, state: GpuState, now: datetime) -> bool:
    """Drain or activate a GPU. Activating is an operator's word that the GPU is fine: it also clears a
    health record (the way back for a GPU held out of rotation, see ``record_failure``)."""
    values: dict[str, object] = {"state": state.value, "updated_at": now}
    if state is GpuState.ACTIVE:
        values |= {"healthy": True, "consecutive_failures": 0, "down_until": None}
    res = conn.execute(update(gpus).where(gpus.c.gpu_id == gpu_id).values(**values))
    return res.rowcount == 1


def remove_gpu(conn: Connection, *, gpu_id: str) -> tuple[bool, int]:
    """Delete a GPU that runs nothing; returns (removed, busy slots that prevented it).

    Only free slot rows are deleted, by a conditional DELETE that locks them: a dispatcher claiming one at
    the same moment either committed first (the slot is busy, stays, and the removal is undone) or waits
    for us and then finds no row to claim. Counting first and deleting after would race with such a claim.
    """
    if conn.execute(select(gpus.c.gpu_id).where(gpus.c.gpu_id == gpu_id).with_for_update()).first() is None:
        return False, 0
    with conn.begin_nested() as savepoint:
        conn.execute(delete(slots).where(slots.c.gpu_id == gpu_id, slots.c.task_id.is_(None)))
        busy = int(conn.execute(select(func.count()).where(slots.c.gpu_id == gpu_id)).scalar_one())
        if busy:
            savepoint.rollback()
            return False, busy
    conn.execute(delete(gpus).where(gpus.c.gpu_id == gpu_id))
    return True, 0


def record_failure(
    conn: Connection,
    *,
    gpu_id: str,
    error: str,
    threshold: int,
    probe_seconds: float,
    now: datetime,
    hold: bool = False,
) -> bool:
    """Count a failed request; returns True when this failure takes the GPU out of rotation.

    ``hold``: the failure is one a probe cannot see (the URL refuses POST with 405/501 while it may well
    answer a GET), so a GPU it takes out is not probed back in - it would refuse job after job, each cycle
    refunded to the job - but waits for an operator (``gpuq gpu activate`` or ``gpuq gpu set --url``)."""
    conn.execute(
        update(gpus)
        .where(gpus.c.gpu_id == gpu_id)
        .values(consecutive_failures=gpus.c.consecutive_failures + 1, last_error=error[:2000], updated_at=now)
    )
    res = conn.execute(
        update(gpus)
        .where(gpus.c.gpu_id == gpu_id, gpus.c.healthy.is_(True), gpus.c.consecutive_failures >= threshold)
        .values(healthy=False, down_until=None if hold else now + timedelta(seconds=probe_seconds))
    )
    return res.rowcount == 1


def record_success(conn: Connection, *, gpu_id: str) -> None:
    conn.execute(
        update(gpus)
        .where(gpus.c.gpu_id == gpu_id, gpus.c.consecutive_failures > 0)
        .values(consecutive_failures=0)
    )


def probes_due(conn: Connection, *, now: datetime) -> list[tuple[str, str]]:
    rows = conn.execute(
        select(gpus.c.gpu_id, gpus.c.url).where(gpus.c.healthy.is_(False), gpus.c.down_until <= now)
    )
    return [(r.gpu_id, r.url) for r in rows]


def probe_result(
    conn: Connection, *, gpu_id: str, ok: bool, error: str, probe_seconds: float, now: datetime
) -> None:
    values: dict[str, object]
    if ok:
        values = {"healthy": True, "consecutive_failures": 0, "down_until": None, "updated_at": now}
    else:
        values = {
            "down_until": now + timedelta(seconds=probe_seconds),
            "last_error": error[:2000],
            "updated_at": now,
        }
    conn.execute(update(gpus).where(gpus.c.gpu_id == gpu_id).values(**values))


def pool_slots(conn: Connection) -> dict[str, int]:
    """Slots of the active GPUs, per pool (healthy or not: one out of rotation for a moment comes back)."""
    rows = conn.execute(
        select(gpus.c.pool, func.sum(gpus.c.slots))
        .where(gpus.c.state == GpuState.ACTIVE.value)
        .group_by(gpus.c.pool)
    )
    return {r[0]: int(r[1] or 0) for r in rows}


def list_gpus(conn: Connection) -> list[GpuRow]:
    busy = (
        select(slots.c.gpu_id, func.count(slots.c.task_id).label("busy"), func.count().label("slot_rows"))
        .group_by(slots.c.gpu_id)
        .subquery()
    )
    rows = conn.execute(
        select(gpus, func.coalesce(busy.c.busy, 0).label("busy"))
        .select_from(gpus.outerjoin(busy, busy.c.gpu_id == gpus.c.gpu_id))
        .order_by(gpus.c.pool, gpus.c.gpu_id)
    )
    return [
        GpuRow(
            gpu_id=r.gpu_id,
            url=r.url,
            pool=r.pool,
            slots=r.slots,
            busy=int(r.busy),
            state=r.state,
            healthy=bool(r.healthy),
            consecutive_failures=r.consecutive_failures,
            last_error=r.last_error,
        )
        for r in rows
    ]
