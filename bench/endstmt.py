"""``python -m bench.endstmt``: the two statements that end a burst of attempts, timed against each other
(bench/RESULTS.md, "Cheaper end statement"): ``end_attempts`` (a join against a derived table of every
column of every item, any outcome) and ``end_final_attempts`` (one single-table UPDATE by primary key, for
bursts of final endings: every ``finished`` callback at saturation).

A database of its own with gpuq's schema (dropped at the end) holds ``rows`` tasks, ``items`` of them
running; each turn ends those with one statement in a transaction and rolls it back, so every turn changes
the same rows. The two statements take turns (the machine's load drifts); the time includes the rollback's
round trip, the same for both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import text

from bench.scratch_db import scratch_database
from dispatcher.db.attempts import Backoff, _params
from dispatcher.db.batch import end_attempts, end_final_attempts
from dispatcher.db.engine import init_schema, make_engine, utcnow
from dispatcher.states import Outcome

_RESULT = json.dumps({"gpu": "g0", "type": "bench", "data": {"i": 1}})


def _fill(engine: Any, rows: int, items: int) -> list[str]:
    """``rows`` finished tasks, the first ``items`` of them processing; their ids."""
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO tasks (task_id, queue, state, type, data, attempt, max_attempts, created_at,"
                " updated_at) VALUES (:task_id, 'q', :state, 't', '{}', 1, 3, :now, :now)"
            ),
            [
                {"task_id": f"t{i}", "state": "processing" if i < items else "finished", "now": now}
                for i in range(rows)
            ],
        )
    return [f"t{i}" for i in range(items)]


def _finished(task_id: str, now: Any) -> dict[str, Any]:
    """A ``finished`` callback of attempt 1 with a small result, as the group commit prepares it."""
    return _params(
        task_id=task_id,
        attempt=1,
        outcome=Outcome.FINISHED,
        now=now,
        backoff=Backoff(),
        result=_RESULT,
        error=None,
        reported="finished",
    )


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.endstmt", description=__doc__.split("\n\n")[0])
    p.add_argument("--mysql", default="root@127.0.0.1:3306", help="user[:pw]@host:port of MariaDB")
    p.add_argument("--n", type=int, default=300, help="turns per statement and size")
    p.add_argument("--items", type=int, nargs="+", default=[12, 40], help="attempts ended per statement")
    p.add_argument("--rows", type=int, default=30_000, help="tasks in the table")
    args = p.parse_args()
    with scratch_database(args.mysql, "gpuq_endstmt") as db:
        engine = make_engine(f"mysql+pymysql://{args.mysql}/{db}", pool_size=2)
        init_schema(engine)
        ids = _fill(engine, args.rows, max(args.items))
        statements: dict[str, Callable[..., int]] = {"join": end_attempts, "final": end_final_attempts}
        print(f"{'statement':10} {'items':>5} {'p50 ms':>8} {'p90 ms':>8}")
        with engine.connect() as conn:
            for k in args.items:
                times: dict[str, list[float]] = {name: [] for name in statements}
                for _ in range(args.n):
                    for name, fn in statements.items():
                        now = utcnow()
                        items = [_finished(t, now) for t in ids[:k]]
                        t0 = time.perf_counter()
                        with conn.begin() as tx:
                            changed = fn(conn, items=items, now=now)
                            tx.rollback()
                        times[name].append((time.perf_counter() - t0) * 1000)
                        if changed != k:
                            raise SystemExit(f"{name} changed {changed} rows of {k}")
                for name, lat in times.items():
                    q = statistics.quantiles(sorted(lat), n=10)
                    print(f"{name:10} {k:>5} {statistics.median(lat):8.2f} {q[8]:8.2f}")
        engine.dispose()


if __name__ == "__main__":
    main()
