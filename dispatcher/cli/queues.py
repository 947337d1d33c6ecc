"""``gpuq queue``: what waits in Redis; the dead-letter list read, put back on its queues, or emptied."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from redis import Redis

from dispatcher.cli.context import Stores, stores
from dispatcher.cli.errors import BadArgument, OperatorError
from dispatcher.cli.render import age, console, rows_table
from dispatcher.db.gpus import list_gpus
from dispatcher.db.known import advice, known_rows, verdict
from dispatcher.queues import dead_requeue
from dispatcher.queues.dead_letters import listed
from dispatcher.queues.dead_letters import purge as purge_dead
from dispatcher.queues.dead_requeue import DeadLetter, Moved, Requeue
from dispatcher.queues.queue_view import Plan, read_sync
from producer.keys import Keys

app = typer.Typer(help="Queue depths and dead letters.", no_args_is_help=True)


@app.command("list")
def list_(
    ctx: typer.Context,
    dead: Annotated[
        bool,
        typer.Option(
            "--dead",
            help="List the dead letters instead: index, age, queue, task id, reason (--json: the job).",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Depth of every queue at every priority, the oldest job's wait, parked jobs, jobs dispatchers took and
    have not started (ready buffers), dead letters. A priority's oldest wait counts its jobs parked or taken
    (the head of each processing list) too, as jobs waiting for a full pool (SPEC §4). A queue's depth
    counts the jobs set aside from it (their pool had no room and they blocked a queue that mixes pools:
    ``<prefix>{<queue>}:aside:<priority>:<pool>``); the kind column says how many."""
    s = stores(ctx)
    if dead:
        _list_dead(s.redis, s.keys, as_json=as_json)
        return
    pools = sorted({g.pool for g in s.db(list_gpus)} | set(s.settings.routes.values()) | {"default"})
    view = read_sync(s.redis, Plan(s.keys, s.settings.all_queues, pools))
    if as_json:
        typer.echo(json.dumps(view.to_json(), indent=2))
        return
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
    rows += [
        (s.keys.parked("<queue>", pool), pool, "parked", n, age(view.parked_age.get(pool)))
        for pool, n in view.parked.items()
    ]
    taken = s.keys.proc("<queue>", "<dispatcher>")
    rows.append((taken, "", "taken, not started", view.taken, age(view.taken_age)))
    rows.append((s.keys.dead, "", "dead letters", view.dead, ""))
    console().print(rows_table(("redis list", "queue / pool", "kind", "jobs", "oldest waiting"), rows))


def _list_dead(client: Redis, keys: Keys, *, as_json: bool) -> None:
    """Each entry with the index ``gpuq queue requeue --index`` takes; the job itself only in JSON (it may be
    megabytes, or not text at all)."""
    letters = dead_requeue.read(client, keys)
    now = datetime.now(UTC)
    if as_json:
        typer.echo(json.dumps([d.to_json(now) for d in letters], indent=2))
        return
    rows = [(d.index, age(d.age(now)), d.queue or "-", d.task_id or "-", d.reason) for d in letters]
    console().print(rows_table(("#", "age", "queue", "task id", "reason"), rows))
    console().print(f"{len(letters)} dead letter(s) in {keys.dead}")


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


@app.command()
def requeue(
    ctx: typer.Context,
    task_ids: Annotated[
        list[str] | None, typer.Argument(help="Task ids of dead letters (as `queue list --dead` shows them).")
    ] = None,
    index: Annotated[
        list[int] | None,
        typer.Option(
            "--index", "-i", min=0, help="A dead letter's index in `queue list --dead` (repeatable)."
        ),
    ] = None,
    every: Annotated[bool, typer.Option("--all", help="Every dead letter.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would happen to each.")] = False,
) -> None:
    """Put dead-lettered jobs back on their queue, at their priority, behind the jobs waiting there (as a
    fresh job), once what refused them is fixed. Each entry leaves the dead-letter list and enters its
    queue in one step. An entry whose job today's rules still refuse, whose queue is not served, or whose
    task the database says would not run again (it ran, runs, or owns the id) stays, and is named with the
    reason; then the exit status is 1."""
    if not (task_ids or index or every):
        raise BadArgument(
            "say which dead letters: task ids, --index N (see `gpuq queue list --dead`) or --all"
        )
    if every and (task_ids or index):
        raise BadArgument("--all, or task ids and --index: not both")
    s = stores(ctx)
    chosen = _select(dead_requeue.read(s.redis, s.keys), task_ids or [], index or [], every=every)
    if not chosen:
        console().print(f"no dead letters in {s.keys.dead}: nothing to requeue")
        return
    go, kept = _judge(s, chosen)
    requeued = 0
    for r in go:
        if dry_run:
            typer.echo(f"would requeue {_where(r)}")
            continue
        outcome = dead_requeue.move(
            s.redis,
            s.keys,
            r,
            cluster=s.settings.redis_cluster,
            mark_ttl=s.settings.idempotency_ttl_seconds,
            wait_replicas=s.settings.redis_wait_replicas,
            wait_timeout_ms=int(s.settings.redis_wait_timeout_seconds * 1000),
        )
        if outcome in (Moved.MOVED, Moved.EARLIER):
            requeued += 1
            done = "" if outcome is Moved.MOVED else " (pushed by an earlier, interrupted requeue)"
            typer.echo(f"requeued {_where(r)}{done}")
        else:
            kept.append((r.letter, _NOT_MOVED[outcome]))
    for letter, why in kept:
        typer.echo(f"kept {_name(letter)}: {why}")
    if dry_run:
        console().print(f"dry run: {len(go)} of {len(chosen)} dead letter(s) would be requeued")
    else:
        console().print(f"requeued {requeued} of {len(chosen)} dead letter(s)")
    if kept:
        raise OperatorError(f"{len(kept)} of {len(chosen)} dead letter(s) not requeued: see each above")


_NOT_MOVED = {
    Moved.GONE: "it left the dead-letter list meanwhile (purged, or requeued by another run): nothing pushed",
    Moved.UNREPLICATED: "its job is pushed but fewer replicas than REDIS_WAIT_REPLICAS hold it yet, so its "
    "entry stays: run the requeue again (it will not push the job twice)",
}


def _where(r: Requeue) -> str:
    return f"{_name(r.letter, r.job.task_id)} onto {r.key} ({r.job.priority.value} priority)"


def _name(letter: DeadLetter, task_id: str | None = None) -> str:
    """``#3 (task abc)``: the index, and the task id the job has (or, requeued, is given) when it has one."""
    task_id = task_id or letter.task_id
    return f"#{letter.index}" + (f" (task {task_id})" if task_id else "")


def _select(
    letters: list[DeadLetter], task_ids: list[str], indexes: list[int], *, every: bool
) -> list[DeadLetter]:
    """The entries asked for, oldest first, each once; an id or index that names none refuses the whole
    command before anything moves (a typo must not requeue half a selection)."""
    if every:
        return letters
    unknown = [f"#{i}" for i in indexes if i >= len(letters)]
    unknown += [t for t in task_ids if not any(d.task_id == t for d in letters)]
    if unknown:
        raise OperatorError(
            f"no dead letter {', '.join(unknown)} among the {len(letters)} in the list"
            " (`gpuq queue list --dead` shows them)"
        )
    wanted = set(task_ids)
    return [d for d in letters if d.index in indexes or d.task_id in wanted]


def _judge(s: Stores, chosen: list[DeadLetter]) -> tuple[list[Requeue], list[tuple[DeadLetter, str]]]:
    """Which entries go back, and why each other one stays: today's job rules and queues, then the database,
    read as a dispatcher taking the job would read it (``db/known.py``)."""
    plans = [
        (d, dead_requeue.plan(d, queues=s.settings.all_queues, max_bytes=s.settings.max_job_bytes))
        for d in chosen
    ]
    ready = [p for _, p in plans if isinstance(p, Requeue)]
    rows = s.db(known_rows, task_ids=sorted({r.job.task_id for r in ready})) if ready else {}
    go: list[Requeue] = []
    kept: list[tuple[DeadLetter, str]] = []
    first: dict[str, DeadLetter] = {}
    for letter, p in plans:
        if isinstance(p, str):
            kept.append((letter, p))
            continue
        task_id = p.job.task_id
        if task_id in first:
            instead = _name(first[task_id])
            kept.append(
                (letter, f"{instead} holds the same task and goes back instead: a second copy would not run")
            )
            continue
        v = verdict(rows.get(task_id), p.job)
        if v is not None:
            what = "drop it without running it" if v.outcome == "dropped" else "dead-letter it again"
            kept.append((letter, f"a dispatcher would {what} ({v.reason}); {advice(v, task_id)}"))
            continue
        first[task_id] = letter
        go.append(p)
    return go, kept
