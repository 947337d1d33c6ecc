"""The free slots placement works from, and the one statement that gives a slot back.

``snapshot`` reads every eligible GPU (active, healthy) that has room, with its load and its free slot
numbers: what a ``Placer`` proposes from. ``snapshot_ending`` reads the same as it will be once some attempts
have ended, inside the transaction that ends them, for the slot hand-off. Both only propose: the claim
(``dispatch.py``, ``batch.claim_slots``) is a conditional UPDATE that a stale view cannot turn into a double
booking. ``free_slot`` is where a slot is given back, guarded by the attempt that holds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, text

from dispatcher.db.promote import DEFAULT_LEASE_SECONDS, PROMOTE_SETS, promote_params, promote_tasks
from dispatcher.db.schema import Timestamp
from dispatcher.loop.placement import GpuFree

# Room is the GPU's slot count minus its busy slots, not its free slot rows: a GPU given fewer slots while
# busy keeps the busy rows past its count until their jobs end (and their emptied rows until the next
# registration trims them), and neither those rows nor the room they take may be handed out.
# Only the GPUs that hold a candidate slot are read (``s.gpu_id IN (…)``, found through the index on
# ``slots.task_id``): every GPU the HAVING keeps has one, so the rows are the same, but a saturated fleet's
# read costs its few free slots instead of all of its slots. Reading every slot of 256 GPUs x 4 took MariaDB
# 8 ms a read, 41 % of its query time in the scale-out run, read once per hand-off batch (bench/RESULTS.md).
SNAPSHOT = text(
    """
    SELECT s.gpu_id, g.url, g.pool, g.slots, COUNT(s.task_id) AS busy,
           GROUP_CONCAT(CASE WHEN s.task_id IS NULL AND s.slot_index < g.slots THEN s.slot_index END) AS free
    FROM slots s JOIN gpus g ON g.gpu_id = s.gpu_id
    WHERE g.state = 'active' AND g.healthy = 1
      AND s.gpu_id IN (SELECT r.gpu_id FROM slots r WHERE r.task_id IS NULL)
    GROUP BY s.gpu_id, g.url, g.pool, g.slots
    HAVING COUNT(s.task_id) < g.slots
       AND COUNT(CASE WHEN s.task_id IS NULL AND s.slot_index < g.slots THEN 1 END) > 0
    """
)
# The same, as it will be once the attempts of the tasks ``ending`` have ended (their slots count as free,
# and which ones they are), read in the transaction that ends them, before their slots are freed: a hand-off
# then claims a freed slot straight from the ended attempt, in one UPDATE (``claim_slots(takeover=…)``),
# instead of freeing it and claiming it again. ``ending_total`` counts every slot those tasks hold, on any
# GPU: when the hand-off took over fewer, the rest are freed after it. A slot with a standby is not freed by
# its holder's end but given to the standby (db/promote.py): it stays busy, and no hand-off takes it over.
SNAPSHOT_ENDING = text(
    """
    SELECT s.gpu_id, g.url, g.pool, g.slots,
           COUNT(CASE WHEN s.task_id IS NOT NULL
                       AND (s.task_id NOT IN :ending OR s.next_task_id IS NOT NULL) THEN 1 END) AS busy,
           GROUP_CONCAT(CASE WHEN (s.task_id IS NULL OR (s.task_id IN :ending AND s.next_task_id IS NULL))
                              AND s.slot_index < g.slots THEN s.slot_index END) AS free,
           GROUP_CONCAT(CASE WHEN s.task_id IN :ending AND s.next_task_id IS NULL AND s.slot_index < g.slots
                             THEN s.slot_index END) AS ending_free,
           (SELECT COUNT(*) FROM slots e WHERE e.task_id IN :ending) AS ending_total
    FROM slots s JOIN gpus g ON g.gpu_id = s.gpu_id
    WHERE g.state = 'active' AND g.healthy = 1
      AND s.gpu_id IN (SELECT r.gpu_id FROM slots r WHERE r.task_id IS NULL OR r.task_id IN :ending)
    GROUP BY s.gpu_id, g.url, g.pool, g.slots
    HAVING COUNT(CASE WHEN s.task_id IS NOT NULL
                       AND (s.task_id NOT IN :ending OR s.next_task_id IS NOT NULL) THEN 1 END) < g.slots
       AND COUNT(CASE WHEN (s.task_id IS NULL OR (s.task_id IN :ending AND s.next_task_id IS NULL))
                       AND s.slot_index < g.slots THEN 1 END) > 0
    """
).bindparams(bindparam("ending", expanding=True))
ENDING_TOTAL = text("SELECT COUNT(*) FROM slots WHERE task_id IN :ending").bindparams(
    bindparam("ending", expanding=True)
)
_FREE = text(
    f"UPDATE slots SET {PROMOTE_SETS} WHERE task_id = :task_id AND attempt = :attempt"  # noqa: S608
).bindparams(bindparam("now", type_=Timestamp), bindparam("lease", type_=Timestamp))


def free_slot(
    conn: Connection,
    *,
    task_id: str,
    attempt: int,
    now: datetime,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> bool:
    """Free the slot if this attempt still holds it (to its standby, if it has one: ``db/promote.py``); the
    one place a single slot is given back."""
    params = {"task_id": task_id, "attempt": attempt} | promote_params(now, lease_seconds)
    if conn.execute(_FREE, params).rowcount != 1:
        return False
    conn.execute(*promote_tasks(conn, params))
    return True


def snapshot(conn: Connection) -> list[GpuFree]:
    """Eligible GPUs (active, healthy) that have a free slot, with their load and free slot numbers."""
    return [_gpu_free(r) for r in conn.execute(SNAPSHOT)]


@dataclass(slots=True)
class EndingView:
    """``snapshot`` as it will be once the tasks ``ending`` free their slots (see ``SNAPSHOT_ENDING``)."""

    gpus: list[GpuFree]
    ending_slots: set[tuple[str, int]]  # (gpu_id, slot_index) held by them on eligible GPUs, counted free
    ending_total: int  # slots they hold anywhere


def snapshot_ending(conn: Connection, *, ending: list[str]) -> EndingView:
    rows = conn.execute(SNAPSHOT_ENDING, {"ending": ending}).all()
    if not rows:  # no eligible GPU with room: count the slots to free on their own
        total = int(conn.execute(ENDING_TOTAL, {"ending": ending}).scalar_one())
        return EndingView([], set(), total)
    return ending_view(rows, int(rows[0].ending_total))


def free_view(rows: Sequence[Any]) -> list[GpuFree]:
    """``snapshot`` from the rows of ``SNAPSHOT`` read already."""
    return [_gpu_free(r) for r in rows]


def ending_view(rows: Sequence[Any], total: int) -> EndingView:
    """The ``EndingView`` of ``SNAPSHOT_ENDING``'s rows and ``ENDING_TOTAL``'s count (both read already)."""
    slots = {(r.gpu_id, int(i)) for r in rows if r.ending_free is not None for i in _ints(r.ending_free)}
    return EndingView([_gpu_free(r) for r in rows], slots, total)


def _ints(value: Any) -> list[int]:
    text_value = value.decode() if isinstance(value, bytes) else str(value)
    return [int(i) for i in text_value.split(",")]


def _gpu_free(r: Any) -> GpuFree:
    room = int(r.slots) - int(r.busy)
    picks = tuple(sorted(_ints(r.free)))[:room]
    return GpuFree(r.gpu_id, r.url, r.pool, int(r.busy), picks)
