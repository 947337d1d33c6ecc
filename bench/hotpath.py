"""``python -m bench.hotpath``: how long one hot-path transaction takes from the event loop's point of view,
by the way it reaches the database, while the loop is busy with other work (as a dispatcher taking hundreds
of callbacks a second is). The comparison behind ``dispatcher/db/hot.py`` (issue 12, item 2):

- ``to_thread``: ``asyncio.to_thread(transaction, engine, fn)`` per transaction (what the dispatcher did);
- ``hot``: the dedicated database thread with its own connection (``HotThread``);
- ``asyncmy``: SQLAlchemy's asyncio engine on the asyncmy driver, the same sync store function through
  ``AsyncConnection.run_sync`` (greenlets: no thread at all, the I/O awaited on the loop).

The transaction is ``statements`` single-row UPDATEs then COMMIT, on a scratch table in a database of its own
(dropped at the end). The loop is kept busy ``busy`` of the time in slices of ``slice_ms`` of pure Python
(the HTTP parsing and JSON of callbacks), which is what makes a thread wait for the GIL: a thread whose
socket read returned waits for the loop thread to drop the GIL, up to the switch interval (5 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import Connection, text

from bench.scratch_db import scratch_database
from dispatcher.db.engine import make_engine, transaction
from dispatcher.db.hot import HotThread


def work(conn: Connection, *, statements: int) -> int:
    n = 0
    for i in range(statements):
        n += conn.execute(text("UPDATE hot SET v = v + 1 WHERE id = :id"), {"id": i % 8}).rowcount
    return n


async def busy_loop(fraction: float, slice_ms: float, stop: asyncio.Event) -> None:
    """Keep the loop busy ``fraction`` of the time, in slices of ``slice_ms`` of CPU."""
    if fraction <= 0:
        return
    pause = slice_ms * (1 - fraction) / fraction / 1000
    while not stop.is_set():
        end = time.perf_counter() + slice_ms / 1000
        while time.perf_counter() < end:
            pass
        await asyncio.sleep(pause)


async def measure(
    runs: dict[str, Callable[[], Awaitable[Any]]], n: int, fraction: float, slice_ms: float
) -> dict[str, list[float]]:
    """``n`` timed transactions per runner, the runners taking turns (the machine's load drifts)."""
    stop = asyncio.Event()
    spinner = asyncio.create_task(busy_loop(fraction, slice_ms, stop))
    out: dict[str, list[float]] = {name: [] for name in runs}
    try:
        for run in runs.values():  # warm up (connections opened)
            for _ in range(5):
                await run()
        for _ in range(n):
            for name, run in runs.items():
                t0 = time.perf_counter()
                await run()
                out[name].append((time.perf_counter() - t0) * 1000)
    finally:
        stop.set()
        await spinner
    return out


async def main_async(args: argparse.Namespace) -> None:
    with scratch_database(args.mysql, "gpuq_hotpath") as db:
        engine = make_engine(f"mysql+pymysql://{args.mysql}/{db}", pool_size=4)
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE hot (id INT PRIMARY KEY, v INT NOT NULL)"))
            conn.execute(text("INSERT INTO hot VALUES " + ",".join(f"({i}, 0)" for i in range(8))))
        hot = HotThread(engine)
        hot.start()
        runners: dict[str, Callable[[int], Awaitable[Any]]] = {
            "to_thread": lambda k: asyncio.to_thread(transaction, engine, work, statements=k),
            "hot": lambda k: hot.run(work, statements=k),
        }
        aengine: Any = None
        try:
            from sqlalchemy.ext.asyncio import create_async_engine

            aengine = create_async_engine(
                f"mysql+asyncmy://{args.mysql}/{db}", isolation_level="READ COMMITTED", pool_size=4
            )

            async def via_asyncmy(k: int) -> Any:
                async with aengine.begin() as conn:
                    return await conn.run_sync(work, statements=k)

            runners["asyncmy"] = via_asyncmy
        except ImportError as exc:
            print(f"asyncmy: not available ({exc})")
        print(f"{'runner':10} {'stmts':>5} {'busy':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
        for k in args.statements:
            for fraction in args.busy:
                runs: dict[str, Callable[[], Awaitable[Any]]] = {
                    name: functools.partial(run, k) for name, run in runners.items()
                }
                for name, lat in (await measure(runs, args.n, fraction, args.slice_ms)).items():
                    p = statistics.quantiles(sorted(lat), n=100)
                    print(f"{name:10} {k:>5} {fraction:>5.2f} {p[49]:8.2f} {p[89]:8.2f} {p[98]:8.2f}")
        await hot.close()
        if aengine is not None:
            await aengine.dispose()
        engine.dispose()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__.split("\n\n")[0])
    p.add_argument("--mysql", default="root@127.0.0.1:3306", help="user[:pw]@host:port of MariaDB")
    p.add_argument("--n", type=int, default=300, help="transactions per figure")
    p.add_argument("--statements", type=int, nargs="+", default=[1, 6])
    p.add_argument("--busy", type=float, nargs="+", default=[0.0, 0.6])
    p.add_argument("--slice-ms", type=float, default=0.5)
    p.add_argument("--switch-ms", type=float, default=None, help="sys.setswitchinterval, ms (default 5)")
    args = p.parse_args()
    if args.switch_ms is not None:
        sys.setswitchinterval(args.switch_ms / 1000)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
