"""``gpuq queue``: what waits in Redis, and emptying the dead-letter list."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from dispatcher.cli.context import stores
from dispatcher.cli.errors import BadArgument, OperatorError
from dispatcher.cli.render import age, console, rows_table
from dispatcher.db.gpus import list_gpus
from dispatcher.queues.dead_letters import listed
from dispatcher.queues.dead_letters import purge as purge_dead
from dispatcher.queues.queue_view import Plan, read_sync

app = typer.Typer(help="Queue depths and dead letters.", no_args_is_help=True)


@app.command("list")
def list_(
    ctx: typer.Context,
    dead: Annotated[
        bool, typer.Option("--dead", help="List the dead letters instead: when, queue, reason, the job.")
    ] = False,
) -> None:
    """Depth of every queue at every priority, the oldest job's wait, parked jobs and dead letters. A queue's
    depth counts the jobs set aside from it (their pool had no room and they blocked a queue that mixes
    pools: ``<prefix>{<queue>}:aside:<priority>:<pool>``); the kind column says how many."""
    s = stores(ctx)
    if dead:
        entries = listed(s.redis, s.keys)
        for raw in entries:
            typer.echo(_describe(raw))
        console().print(f"{len(entries)} dead letter(s) in {s.keys.dead}")
        return
    pools = sorted({g.pool for g in s.db(list_gpus)} | set(s.settings.routes.values()) | {"default"})
    view = read_sync(s.redis, Plan(s.keys, s.settings.all_queues, pools))
    rows: list[tuple[Any, ...]] = [
        (
            q.key,
            q.queue,
            q.priority + (f" ({q.aside} set aside)" if q.aside else ""),
            q.depth,
            age(q.oldest_age),
        )
        for q in view.queues
    ]
    rows += [(s.keys.parked("<queue>", pool), pool, "parked", n, "") for pool, n in view.parked.items()]
    rows.append((s.keys.dead, "", "dead letters", view.dead, ""))
    console().print(rows_table(("redis list", "queue / pool", "kind", "jobs", "oldest waiting"), rows))


def _describe(raw: bytes | str) -> str:
    try:
        entry = json.loads(raw)
        where = entry.get("queue") or "-"
        return f"{entry.get('at', '?')}  {where}  {entry.get('reason')}  {entry.get('raw')!s:.120}"
    except (ValueError, AttributeError):
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        return text[:200]


@app.command()
def purge(
    ctx: typer.Context,
    dead: Annotated[bool, typer.Option("--dead", help="Empty the dead-letter list.")] = False,
    yes: Annotated[
        bool, typer.Option("--yes", help="Really delete (without it: show what would go).")
    ] = False,
) -> None:
    """Empty the dead-letter list, printing every entry removed. Waiting queues are never purged here."""
    if not dead:
        raise BadArgument(
            "say what to purge: --dead (the dead-letter list; waiting queues are not purgeable)"
        )
    s = stores(ctx)
    key = s.keys.dead
    if not yes:
        entries = listed(s.redis, s.keys)
        for raw in entries:
            typer.echo(_describe(raw))
        raise OperatorError(f"{len(entries)} dead letter(s) in {key}; run again with --yes to delete them")
    entries = purge_dead(s.redis, s.keys)  # read and delete in one step: none added meanwhile is lost
    for raw in entries:
        typer.echo(_describe(raw))
    console().print(f"removed {len(entries)} dead letter(s) from {key}")
