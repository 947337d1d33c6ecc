"""``python -m bench.handoff``: one group-commit hand-off batch (``end_and_hand_off``) as the dispatcher runs
it, on the hot database thread, with the end, history and snapshot folded into one round trip (``fold``) or
sent one after the other (``unfolded``, as before); round trips per batch (COMMIT included) and latency as
the event loop sees it (issue 12: part 1 of a slot's turnaround), and the process's CPU per batch (the hot
thread's, with the loop otherwise idle unless ``--busy``).

A database of its own with gpuq's schema (dropped at the end): ``gpus`` GPUs of ``slots`` slots, every slot
busy, ``rows`` finished tasks beside them. Each turn ends ``items`` running attempts with ``finished``
callbacks and hands their slots to as many new jobs, committed, so the fleet stays full (saturation);
``--no-handoff``: the batch only ends and frees (an empty buffer), and the slots are refilled untimed. The two
forms take turns (the machine's load drifts): compare them within one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid
from typing import Any

from sqlalchemy import create_engine, text

from bench.hotpath import busy_loop
from dispatcher.db.attempts import Backoff
from dispatcher.db.dispatch import dispatch
from dispatcher.db.engine import init_schema, make_engine, transaction, utcnow
from dispatcher.db.gpus import register_gpu
from dispatcher.db.handoff import end_and_hand_off
from dispatcher.db.hot import HotThread
from dispatcher.states import Outcome
from producer.job import Job


def _setup(engine: Any, gpus: int, slots: int, rows: int) -> list[str]:
    """The fleet, full, and ``rows`` finished tasks; returns the running tasks' ids."""
    now = utcnow()
    for g in range(gpus):
        transaction(
            engine, register_gpu, gpu_id=f"g{g}", url=f"http://127.0.0.1:1/g{g}", pool="default",
            slot_count=slots, now=now,
        )  # fmt: skip
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO tasks (task_id, queue, state, type, data, attempt, max_attempts, created_at,"
                " updated_at) VALUES (:task_id, 'q', 'finished', 't', '{}', 1, 3, :now, :now)"
            ),
            [{"task_id": f"old{i}", "now": now} for i in range(rows)],
        )
    running = [f"r{i}" for i in range(gpus * slots)]
    res = transaction(
        engine, dispatch, items=[(Job(task_id=t, type="t", queue="q"), "default") for t in running],
        dispatcher_id="bench", lease_seconds=600, max_attempts=3, now=utcnow(),
    )  # fmt: skip
    assert len(res.placed) == len(running), "the fleet did not fill"
    return running


async def _turns(engine: Any, running: list[str], args: argparse.Namespace) -> dict[str, Any]:
    hot = HotThread(engine)
    hot.start()
    rng = random.Random(1)
    stop = asyncio.Event()
    spinner = asyncio.create_task(busy_loop(args.busy, 0.5, stop))
    times: dict[str, list[float]] = {"fold": [], "unfolded": []}
    trips: dict[str, list[int]] = {"fold": [], "unfolded": []}
    cpu: dict[str, list[float]] = {"fold": [], "unfolded": []}
    serial = 0
    try:
        for turn in range(args.n + 5):
            for mode in ("fold", "unfolded"):
                ending = rng.sample(running, args.items)
                fresh = [f"n{serial + i}" for i in range(args.items)]
                serial += args.items
                now = utcnow()
                items = [
                    {"task_id": t, "attempt": 1, "outcome": Outcome.FINISHED, "result": None, "error": None,
                     "reported": "finished"}
                    for t in ending
                ]  # fmt: skip
                jobs = [(Job(task_id=t, type="t", queue="q"), "default") for t in fresh]
                t0, c0 = time.perf_counter(), time.process_time()
                out = await hot.run(
                    end_and_hand_off, items=items, now=now, backoff=Backoff(),
                    candidates=[] if args.no_handoff else jobs,
                    check_existing=False, dispatcher_id="bench", lease_seconds=600, max_attempts=3,
                    rng=rng, fold=mode == "fold",
                )  # fmt: skip
                elapsed = (time.perf_counter() - t0) * 1000
                used = (time.process_time() - c0) * 1000
                if args.no_handoff:  # the loop's part, untimed: refill the freed slots
                    out.result = await asyncio.to_thread(
                        transaction, engine, dispatch, items=jobs, dispatcher_id="bench",
                        lease_seconds=600, max_attempts=3, now=utcnow(),
                    )  # fmt: skip
                placed = [p.job.task_id for p in out.result.placed] if out.result else []
                if len(placed) != args.items:
                    raise SystemExit(f"{mode}: {len(placed)} of {args.items} handed off")
                running = [t for t in running if t not in set(ending)] + placed
                if turn >= 5:  # the first turns warm up (connections, caches)
                    times[mode].append(elapsed)
                    trips[mode].append(hot.last_round_trips)
                    cpu[mode].append(used)
    finally:
        stop.set()
        await spinner
        await hot.close()
    return {"times": times, "trips": trips, "cpu": cpu}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.handoff", description=__doc__.split("\n\n")[0])
    p.add_argument("--mysql", default="root@127.0.0.1:3306", help="user[:pw]@host:port of MariaDB")
    p.add_argument("--n", type=int, default=300, help="batches per form")
    p.add_argument("--items", type=int, default=4, help="callbacks per batch (and jobs handed off)")
    p.add_argument("--gpus", type=int, default=16)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--rows", type=int, default=30_000, help="finished tasks in the table")
    p.add_argument("--no-handoff", action="store_true", help="batches with no job to hand off (empty buffer)")
    p.add_argument("--busy", type=float, default=0.0, help="share of the event loop kept busy meanwhile")
    args = p.parse_args()
    db = f"gpuq_handoff_{uuid.uuid4().hex[:8]}"
    admin = create_engine(f"mysql+pymysql://{args.mysql}/")
    with admin.begin() as conn:
        conn.execute(text(f"CREATE DATABASE {db}"))
    try:
        engine = make_engine(f"mysql+pymysql://{args.mysql}/{db}", pool_size=2)
        init_schema(engine)
        running = _setup(engine, args.gpus, args.slots, args.rows)
        got = asyncio.run(_turns(engine, running, args))
        head = ("form", "items", "trips", "p50 ms", "p90 ms", "mean ms", "CPU ms")
        print("{:9} {:>5} {:>5} {:>8} {:>8} {:>8} {:>7}".format(*head))
        p50 = {}
        for mode, lat in got["times"].items():
            q = statistics.quantiles(sorted(lat), n=10)
            p50[mode] = statistics.median(lat)
            n_trips = statistics.mean(got["trips"][mode])
            mean = statistics.mean(lat)
            cpu = statistics.mean(got["cpu"][mode])
            figures = f"{p50[mode]:8.2f} {q[8]:8.2f} {mean:8.2f} {cpu:7.2f}"
            print(f"{mode:9} {args.items:>5} {n_trips:5.1f} {figures}")
        print(f"p50 unfolded / fold: {p50['unfolded'] / p50['fold']:.2f}x")
        engine.dispose()
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP DATABASE {db}"))
        admin.dispose()


if __name__ == "__main__":
    main()
