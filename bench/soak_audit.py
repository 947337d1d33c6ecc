"""Naming the culprits of an oversubscription: simgpu's overlap log joined with the attempts in the database.

simgpu logs every request that found all slots of its GPU held, with the jobs holding them (``overlaps`` in
its stats). For each, this looks up every job involved in the database (its GPU, slot, start and end of the
attempt, how it ended) and sorts the overlap into one of two kinds:

- ``oversubscriptions``: when the request arrived, the database still had enough of the holders' attempts
  live to fill every slot (or the arriving attempt was not recorded at all): a slot was given to two live
  attempts, or freed under one. A placement error; it must never happen.
- ``oversubscribed_after_lease_expiry``: the database had already ended one of the holders' attempts by its
  lease running out, and the GPU was still working on it. The dispatcher did what a lease promises (the slot
  of an attempt silent for ``TASK_TIMEOUT_SECONDS`` is reused); the GPU outlived the lease. The bound is the
  lease: a longer ``TASK_TIMEOUT_SECONDS``, or ``running`` heartbeats from a long job.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, text

from dispatcher.states import Outcome

_ENDED = text(
    "SELECT task_id, attempt, gpu_id, slot_index, started_at, ended_at, outcome FROM attempts"
    " WHERE task_id IN :ids"
).bindparams(bindparam("ids", expanding=True))
_LIVE = text(
    "SELECT task_id, attempt, gpu_id, slot_index, started_at, state FROM tasks WHERE task_id IN :ids"
).bindparams(bindparam("ids", expanding=True))


def _stamp(value: datetime | None) -> str | None:
    return value.isoformat(timespec="milliseconds") if value is not None else None


def _naive(wall: float) -> datetime:
    """A simgpu wall-clock time as the database writes times: naive UTC (same machine, same clock)."""
    return datetime.fromtimestamp(wall, UTC).replace(tzinfo=None)


def _wall(wall: float) -> str | None:
    return _stamp(_naive(wall))


def _attempts(conn: Connection, ids: list[str]) -> dict[tuple[str, int], dict[str, Any]]:
    """(task, attempt) -> where it ran and when and how it ended (``ended_at`` None: still running)."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    if not ids:
        return out
    for r in conn.execute(_LIVE, {"ids": ids}):
        if r.state == "processing":
            out[(r.task_id, int(r.attempt))] = {
                "gpu_id": r.gpu_id,
                "slot_index": r.slot_index,
                "started_at": r.started_at,
                "ended_at": None,
                "outcome": None,
            }
    for r in conn.execute(_ENDED, {"ids": ids}):
        out[(r.task_id, int(r.attempt))] = {
            "gpu_id": r.gpu_id,
            "slot_index": r.slot_index,
            "started_at": r.started_at,
            "ended_at": r.ended_at,
            "outcome": r.outcome,
        }
    return out


def _account(
    known: dict[tuple[str, int], dict[str, Any]], task_id: str | None, attempt: int | None, arrived: datetime
) -> dict[str, Any]:
    """One job of an overlap as the database knows it; ``live_at_arrival``: started and not yet ended."""
    row = known.get((task_id or "", attempt or 0))
    if row is None:
        return {"task_id": task_id, "attempt": attempt, "in_database": False}
    return {
        "task_id": task_id,
        "attempt": attempt,
        "in_database": True,
        "gpu_id": row["gpu_id"],
        "slot_index": row["slot_index"],
        "started_at": _stamp(row["started_at"]),
        "ended_at": _stamp(row["ended_at"]),
        "outcome": row["outcome"],
        "live_at_arrival": row["ended_at"] is None or row["ended_at"] > arrived,
    }


def explain_overlaps(
    conn: Connection, overlaps: list[dict[str, Any]], slots: Mapping[str, int]
) -> list[dict[str, Any]]:
    """Each of simgpu's overlaps with the database's account of every job in it and its ``kind``;
    ``slots``: each GPU's slot count."""
    ids = sorted(
        {o["task_id"] for o in overlaps if o["task_id"]}
        | {h["task_id"] for o in overlaps for h in o["holding"]}
    )
    known = _attempts(conn, ids)
    explained = []
    for o in overlaps:
        arrived = _naive(o["at"])
        holders = [
            _account(known, h["task_id"], h["attempt"], arrived) | {"reached_gpu_at": _wall(h["received_at"])}
            for h in o["holding"]
        ]
        newcomer = _account(known, o["task_id"], o["attempt"], arrived)
        live = sum(1 for h in holders if h.get("live_at_arrival", True))
        expired = [
            h for h in holders if h.get("live_at_arrival") is False and h["outcome"] == Outcome.EXPIRED.value
        ]
        # The dispatcher's own books had room only if fewer holders than slots were live there; that room
        # must come from leases that ran out, else something freed a slot the GPU was still using.
        room = slots[o["gpu"]]
        after_lease = live < room and live + len(expired) >= room and newcomer.get("in_database", False)
        explained.append(
            {
                "kind": "oversubscribed_after_lease_expiry" if after_lease else "oversubscriptions",
                "gpu": o["gpu"],
                "arrived_at": _stamp(arrived),
                "arriving": newcomer,
                "holding": holders,
            }
        )
    return explained


def describe(overlap: dict[str, Any]) -> str:
    """One line naming the GPU, the slot and the tasks of an overlap, for a failing run's output."""
    a = overlap["arriving"]

    def who(j: dict[str, Any]) -> str:
        if not j.get("in_database"):
            return f"{j['task_id']}#{j['attempt']} (not in the database)"
        end = f"ended {j['ended_at']} {j['outcome']}" if j["ended_at"] else "running"
        reached = f", on the GPU from {j['reached_gpu_at']}" if "reached_gpu_at" in j else ""
        return f"{j['task_id']}#{j['attempt']} slot {j['slot_index']} from {j['started_at']}{reached}, {end}"

    holders = "; ".join(who(h) for h in overlap["holding"])
    return (
        f"{overlap['kind']}: {overlap['gpu']} at {overlap['arrived_at']} got {who(a)} while holding {holders}"
    )


def overlap_report(conn: Connection, stats: dict[str, Any]) -> dict[str, Any]:
    """The soak report's oversubscription figures from simgpu's ``stats`` (with its overlap log)."""
    slots = {name: int(g["slots"]) for name, g in stats["gpus"].items()}
    overlaps = explain_overlaps(conn, stats["totals"]["overlaps"], slots)
    return {
        "requests_over_slots": stats["totals"]["oversubscriptions"],  # simgpu's count, sorted by cause below
        "oversubscriptions": sum(o["kind"] == "oversubscriptions" for o in overlaps),
        "oversubscribed_after_lease_expiry": sum(
            o["kind"] == "oversubscribed_after_lease_expiry" for o in overlaps
        ),
        "overlaps": [describe(o) for o in overlaps],
        "overlap_details": overlaps,
    }


def problems(report: dict[str, Any]) -> list[str]:
    """What makes a soak run fail, one line each, naming the GPU and tasks of any oversubscription."""
    out = [
        f"{key}: {report[key]}"
        for key in (
            "lost",
            "duplicates_beyond_attempts",
            "same_attempt_delivered_twice",
            "slot_drift_end",
            "slot_drift_samples",
            "dead_letters",
        )
        if report[key]
    ]
    if report["requests_over_slots"] != len(report["overlaps"]):
        out.append(
            f"simgpu counted {report['requests_over_slots']} requests over slots"
            f" but logged {len(report['overlaps'])}"
        )
    return out + [str(line) for line in report["overlaps"]]


def describe_tasks(engine: Engine, task_ids: list[str]) -> list[str]:
    """Where each of these tasks stands in the database, one line each."""
    if not task_ids:
        return []
    sql = text(
        "SELECT t.task_id, t.state, t.attempt, t.gpu_id, t.slot_index, t.dispatcher_id, t.updated_at,"
        " s.gpu_id AS held_gpu, s.slot_index AS held_slot FROM tasks t"
        " LEFT JOIN slots s ON s.task_id = t.task_id WHERE t.task_id IN :ids"
    ).bindparams(bindparam("ids", expanding=True))
    with engine.connect() as conn:
        rows = {r.task_id: r for r in conn.execute(sql, {"ids": task_ids})}
    out = []
    for task_id in task_ids:
        r = rows.get(task_id)
        if r is None:
            out.append(f"{task_id}: no row")
            continue
        held = f"holds {r.held_gpu}/{r.held_slot}" if r.held_gpu is not None else "holds no slot"
        out.append(
            f"{task_id}: {r.state} attempt {r.attempt} on {r.gpu_id}/{r.slot_index} by {r.dispatcher_id}"
            f" since {r.updated_at}, {held}"
        )
    return out
