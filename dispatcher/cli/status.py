"""``gpuq status``: the GPU load table per pool and what waits, once or refreshed in place (``--watch``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from itertools import groupby
from typing import Annotated, Any

import typer
from redis.exceptions import RedisError
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from dispatcher.cli.context import Stores, stores
from dispatcher.cli.render import age, bar, console
from dispatcher.db.engine import StoreUnavailable, utcnow
from dispatcher.db.overview import overview
from dispatcher.queues.queue_view import Plan, pools_of, read_sync


def collect(s: Stores) -> dict[str, Any]:
    """The same data the dashboard's ``/api/overview`` serves, read straight from the stores."""
    db = s.db(overview, now=utcnow(), minutes=1, bucket_seconds=60)
    plan = Plan(s.keys, s.settings.all_queues, pools_of(db["gpus"], s.settings.routes))
    try:
        waiting = read_sync(s.redis, plan).to_json()
    except RedisError as exc:  # the GPU table still helps: show it, and say what is missing
        waiting = {"redis_error": f"Redis at {s.redis_where()} is unreachable: {exc}"}
    return {"now": datetime.now(UTC).isoformat(timespec="seconds"), **db, **waiting}


def _gpu_tables(gpus: list[dict[str, Any]]) -> list[RenderableType]:
    out: list[RenderableType] = []
    for pool, members in groupby(gpus, key=lambda g: g["pool"]):
        table = Table(title=f"pool {pool}", title_justify="left", title_style="bold")
        for column in ("GPU", "state", "healthy", "busy", "", "done/1m", "last error"):
            table.add_column(column, justify="right" if column in ("", "done/1m") else "left")
        for g in members:
            healthy = Text("yes", "green") if g["healthy"] else Text("NO", "bold red")
            state = Text(g["state"], "yellow" if g["state"] != "active" else "")
            table.add_row(
                g["gpu_id"],
                state,
                healthy,
                bar(g["busy"], g["slots"]),
                f"{g['busy']}/{g['slots']}",
                str(g["finished_recent"]),
                (g["last_error"] or "")[:40] if not g["healthy"] else "",
            )
        out.append(table)
    return out or [Text("no GPUs registered: gpuq gpu add NAME URL, or GPU_ENDPOINTS", "yellow")]


def _queue_table(view: dict[str, Any]) -> Table:
    table = Table(title="queues", title_justify="left", title_style="bold")
    for column in ("queue", "high", "normal", "low", "oldest waiting"):
        table.add_column(column, justify="left" if column == "queue" else "right")
    for queue, levels in groupby(view["queues"], key=lambda q: q["queue"]):
        depth = {q["priority"]: q for q in levels}
        ages = [q["oldest_age"] for q in depth.values() if q["oldest_age"] is not None]
        table.add_row(
            queue,
            *(str(depth[p]["depth"]) for p in ("high", "normal", "low")),
            age(max(ages) if ages else None),
        )
    return table


def render(view: dict[str, Any]) -> Group:
    gpus = view["gpus"]
    busy = sum(g["busy"] for g in gpus)
    total = sum(g["slots"] for g in gpus)
    tasks = view["tasks"]
    if "redis_error" in view:
        return Group(
            Text.assemble(("gpuq status ", "bold"), f"{view['now']}   slots busy {busy}/{total}"),
            *_gpu_tables(gpus),
            Text("queues unknown: Redis is unreachable", "bold red"),
            Text(f"retrying {tasks['retrying']}   scheduled {tasks['scheduled']}"),
        )
    parked = ", ".join(f"{pool} {n}" for pool, n in view["parked"].items() if n) or "none"
    dead = Text(f"dead letters {view['dead']}", "bold red" if view["dead"] else "")
    return Group(
        Text.assemble(
            ("gpuq status ", "bold"),
            f"{view['now']}   slots busy {busy}/{total}   waiting {view['waiting']}",
        ),
        *_gpu_tables(gpus),
        _queue_table(view),
        Text.assemble(
            f"parked (pool full): {parked}   ",
            dead,
            f"   retrying {tasks['retrying']}   scheduled {tasks['scheduled']}",
        ),
    )


def status(
    ctx: typer.Context,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh in place until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between refreshes.")] = 1.0,
    count: Annotated[int, typer.Option(min=0, help="With --watch: stop after N refreshes (0: never).")] = 0,
) -> None:
    """GPU load per pool (busy slots, health, jobs done in the last minute) and queue depths."""
    s = stores(ctx)
    out = console()
    if not watch:
        view = collect(s)
        out.print(render(view))
        if "redis_error" in view:  # as for any unreachable store, after showing what the database knows
            typer.echo(f"gpuq: {view['redis_error']}", err=True)
            raise typer.Exit(3)
        return
    if not out.is_terminal:  # piped to a file or a log: one full table per refresh, nothing redrawn
        _watch(s, interval, count, lambda view: out.print(view, "\n"))
        return
    with Live(render(collect(s)), console=out, auto_refresh=False) as live:
        _watch(s, interval, count, lambda view: live.update(view, refresh=True), first_shown=True)


def _watch(
    s: Stores, interval: float, count: int, show: Callable[[RenderableType], None], first_shown: bool = False
) -> None:
    shown = 1 if first_shown else 0
    try:
        while count == 0 or shown < count:
            if shown:
                time.sleep(interval)
            try:
                show(render(collect(s)))
            except (StoreUnavailable, RedisError) as exc:  # keep watching through a store's restart
                show(Text(f"store unavailable, retrying: {exc}", "bold red"))
            shown += 1
    except KeyboardInterrupt:
        pass
