"""``gpuq task show/list/cancel/retry/priority`` and ``gpuq submit``."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Annotated, Any

import typer
from sqlalchemy.exc import DBAPIError

from dispatcher.cli.context import Stores, stores
from dispatcher.cli.errors import BadArgument, OperatorError
from dispatcher.cli.render import console, rows_table
from dispatcher.db.attempts import Backoff, cancel_task
from dispatcher.db.engine import transaction, utcnow
from dispatcher.db.known import known_rows
from dispatcher.db.listing import MAX_LIMIT, BadFilter, TaskFilter, list_tasks, parse_states, since_utc
from dispatcher.db.operator import RETRIABLE, retry_candidates, retry_task
from dispatcher.db.priority import set_priority
from dispatcher.db.reads import get_task
from dispatcher.errors import STORE_ERRORS
from dispatcher.loop.cancels import WAKE_CANCEL
from dispatcher.queues.reprioritize import find_waiting, move_job
from dispatcher.queues.task_events import publish_sync
from dispatcher.states import TaskState
from producer.keys import Priority

app = typer.Typer(help="List tasks; look at, cancel, retry or reprioritize one.", no_args_is_help=True)

TaskId = Annotated[str, typer.Argument(help="The task's id.")]


@app.command()
def show(ctx: typer.Context, task_id: TaskId) -> None:
    """The task as the database has it (the same JSON as GET /tasks/{id}), with its attempts; a job still
    waiting in Redis shows as ``queued`` with its list and position."""
    found = _find(stores(ctx), task_id)
    if found is None:
        raise OperatorError(f"unknown task {task_id!r}: not in the database nor waiting in Redis")
    typer.echo(json.dumps(found, indent=2))


def _find(s: Stores, task_id: str) -> dict[str, Any] | None:
    """The task as recorded, else as it waits in Redis, else None. The database is read again after Redis:
    a job leaves Redis only once its row is committed, so one recorded meanwhile is not taken for unknown."""
    found = s.db(get_task, task_id=task_id)
    if found is None:
        pools = sorted(set(s.settings.routes.values()) | {"default"})
        found = find_waiting(s.redis, keys=s.keys, task_id=task_id, queues=s.settings.all_queues, pools=pools)
    if found is None:
        found = s.db(get_task, task_id=task_id)
    return found


@app.command("list")
def list_(
    ctx: typer.Context,
    *,
    state: Annotated[str | None, typer.Option(help="A state, or several: queued,retrying.")] = None,
    queue: Annotated[str | None, typer.Option(help="Only this queue.")] = None,
    task_type: Annotated[str | None, typer.Option("--type", help="Only this task type.")] = None,
    gpu: Annotated[str | None, typer.Option(help="Only tasks placed on this GPU.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Created at or after: 30m, 2h, 1d ago, or a time (UTC unless it says).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=MAX_LIMIT)] = 50,
    cursor: Annotated[str | None, typer.Option(help="The cursor printed after the previous page.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the page as GET /tasks answers it.")] = False,
) -> None:
    """Tasks newest first, filtered like GET /tasks; the next page's cursor is printed on stderr."""
    try:
        after = parse_since(since, utcnow()) if since is not None else None
        where = TaskFilter(parse_states(state), queue, task_type, gpu, after)
        page = stores(ctx).db(list_tasks, where=where, limit=limit, cursor=cursor)
    except BadFilter as exc:
        raise BadArgument(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    columns = ("task_id", "state", "type", "queue", "priority", "gpu_id", "attempts", "created_at", "error")
    console().print(rows_table(columns, page["tasks"]))
    if page["next_cursor"]:
        typer.echo(f"more: --cursor {page['next_cursor']}", err=True)


@app.command()
def cancel(ctx: typer.Context, task_id: TaskId) -> None:
    """Cancel a task: a waiting one never runs; a running one ends now, its GPU is asked to stop (POST
    <GPU url>/cancel, by the dispatcher that sent it), and its slot is freed once the GPU confirms or the
    lease runs out, so the GPU never runs more jobs than slots."""
    s = stores(ctx)
    if _find(s, task_id) is None:  # marking an unknown id would silently drop a job submitted later as it
        raise OperatorError(
            f"unknown task {task_id!r}: not in the database nor waiting in Redis; nothing to cancel"
        )
    fin = s.db(cancel_task, task_id=task_id, now=utcnow(), backoff=Backoff())
    if fin.code == "applied":  # for anyone watching GET /tasks/{id}/events
        publish_sync(s.redis, s.keys, "cancelled", task_id, by="operator")
    if fin.held:
        s.wake(WAKE_CANCEL)  # the dispatcher that started the attempt tells the GPU
    if fin.code == "applied":
        how = "it will not run"
        if fin.held:
            how = "its GPU is asked to stop; the slot is freed when it confirms"
        console().print(f"task {task_id} cancelled: {how}")
    elif fin.state == "cancelled":
        # what was asked holds (exit 0), as POST /tasks/{id}/cancel answers 200 applied:false: a script that
        # cancels twice, or after someone else did, must not stop on it (an outside trial)
        held = "; its GPU has not confirmed the stop yet" if fin.held else ""
        console().print(f"task {task_id} was already cancelled{held}")
    else:
        raise OperatorError(f"task {task_id} is already {fin.state}: nothing to cancel")


@app.command()
def retry(
    ctx: typer.Context,
    task_id: Annotated[str | None, typer.Argument(help="The task's id; or select with --state.")] = None,
    *,
    attempts: Annotated[int, typer.Option(min=1, max=100, help="More attempts to allow.")] = 1,
    state: Annotated[str | None, typer.Option(help="Every task in this state: failed, cancelled.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Only those that ended since: 30m, 2h, 1d, or a UTC time.")
    ] = None,
    gpu: Annotated[str | None, typer.Option(help="Only those last placed on this GPU.")] = None,
    queue: Annotated[str | None, typer.Option(help="Only this queue.")] = None,
    task_type: Annotated[str | None, typer.Option("--type", help="Only this task type.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="At most this many tasks.")] = 1000,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list the tasks it would retry.")] = False,
) -> None:
    """Run a failed or cancelled task again (within a second, while a dispatcher runs); or, with --state
    (and --since, --gpu, --queue, --type), every task that matches: the bulk recovery after an incident."""
    s = stores(ctx)
    if task_id is None:
        _retry_many(
            s,
            state=state,
            since=since,
            gpu=gpu,
            queue=queue,
            task_type=task_type,
            limit=limit,
            attempts=attempts,
            dry_run=dry_run,
        )
        return
    if state or since or gpu or queue or task_type or dry_run:
        raise BadArgument("give a task id or filters (--state ...), not both")
    res = s.db(retry_task, task_id=task_id, now=utcnow(), extra_attempts=attempts)
    if res.code == "unknown":
        raise OperatorError(f"unknown task {task_id!r}")
    if res.code == "refused":
        raise OperatorError(f"task {task_id} cannot be retried: {res.reason}")
    s.wake("job")
    console().print(f"task {task_id} is retrying (up to {res.max_attempts} attempts in all)")


def _retry_many(
    s: Stores,
    *,
    state: str | None,
    since: str | None,
    gpu: str | None,
    queue: str | None,
    task_type: str | None,
    limit: int,
    attempts: int,
    dry_run: bool,
) -> None:
    if not state:
        raise BadArgument("give a task id, or --state failed (or cancelled) to retry every such task")
    try:
        states = parse_states(state)
    except BadFilter as exc:
        raise BadArgument(str(exc)) from None
    if not set(states) <= set(RETRIABLE):
        raise BadArgument("--state: only failed and cancelled tasks can be retried")
    ids = s.db(
        retry_candidates,
        states=states,
        since=parse_since(since, utcnow()) if since is not None else None,
        gpu_id=gpu,
        queue=queue,
        task_type=task_type,
        limit=limit,
    )
    if dry_run:
        for tid in ids:
            typer.echo(tid)
        typer.echo(f"{len(ids)} task(s) would be retried (--dry-run: nothing changed)", err=True)
        return
    done, refused = 0, 0
    for tid in ids:
        res = s.db(retry_task, task_id=tid, now=utcnow(), extra_attempts=attempts)
        done, refused = (done + 1, refused) if res.code == "applied" else (done, refused + 1)
    if done:
        s.wake("job")
    skipped = f"; {refused} changed state meanwhile and were left alone" if refused else ""
    console().print(f"{done} task(s) retrying{skipped}")


#: The units of a relative ``--since`` (``90s``, ``30m``, ``2h``, ``1d``), in seconds.
_SINCE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: datetime) -> datetime:
    """``--since`` of ``task list`` and ``task retry``, one parser for both: the README promises the CLI takes
    the filters GET /tasks takes, and ``task list`` once read only two strptime formats (an outside trial).
    ``30m``, ``2h``, ``1d``, ``90s`` before ``now``, or an ISO time (UTC unless it carries ``Z`` or an
    offset). Naive UTC, as the database holds times; a time outside the years 1-9999 in UTC is before or
    after every task, as GET /tasks takes it."""
    raw = text.strip()
    count, unit = raw[:-1], _SINCE_UNITS.get(raw[-1:])
    if unit is not None and count.isascii() and count.isdigit():  # isdigit alone takes "²", int() does not
        try:
            return now - timedelta(seconds=int(count) * unit)
        except (OverflowError, ValueError):  # further back than year 1 (or past int()'s digit limit)
            return datetime.min
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise BadArgument(
            f"--since: {text!r} is not a time; give 90s, 30m, 2h or 1d (before now), or an ISO time such as"
            " 2030-01-02, 2030-01-02T03:04:05 or 2030-01-02 03:04:05, with Z or +02:00 (else UTC)"
        ) from None
    return since_utc(when)


@app.command()
def priority(
    ctx: typer.Context,
    task_id: TaskId,
    level: Annotated[Priority, typer.Argument(help="The new priority.")],
) -> None:
    """Change a waiting task's priority: queued in Redis (moved to the back of its new priority's list),
    or retrying / scheduled (its new list when its time comes). Running and ended tasks are refused."""
    s = stores(ctx)
    res = s.db(set_priority, task_id=task_id, priority=level, now=utcnow())
    if res.code == "refused":
        raise OperatorError(f"task {task_id} is {res.state}: only a waiting task's priority can change")
    if res.code == "applied" and res.state != TaskState.QUEUED:
        console().print(
            f"task {task_id} ({res.state}) will wait in line as {level.value} (was {res.previous})"
        )
        return
    queues = [res.queue] if res.queue else s.settings.all_queues
    pools = sorted(set(s.settings.routes.values()) | {"default"})
    moved = move_job(s.redis, task_id=task_id, queues=queues, priority=level, keys=s.keys, pools=pools)
    if moved.found:
        s.wake("job")
        console().print(f"task {task_id} is now {level.value}: waiting in {moved.target}")
    elif res.code == "applied":
        console().print(f"task {task_id} is now {level.value} (a dispatcher is taking it right now)")
    else:
        raise OperatorError(
            f"unknown task {task_id!r}: not in the database nor waiting in {', '.join(queues)}"
        )


def submit(
    ctx: typer.Context,
    *,
    task_type: Annotated[str, typer.Option("--type", "-t", help="Task type, e.g. start_transcribe.")],
    data: Annotated[str, typer.Option("--data", "-d", help="The task's data, a JSON object.")] = "{}",
    queue: Annotated[str | None, typer.Option("--queue", "-q", help="Default: by TASK_ROUTES.")] = None,
    priority: Annotated[Priority, typer.Option("--priority", "-p")] = Priority.NORMAL,
    task_id: Annotated[str | None, typer.Option("--task-id", help="Makes a repeated submit a no-op.")] = None,
    delay: Annotated[float | None, typer.Option(min=0, help="Seconds before it may start.")] = None,
) -> None:
    """Enqueue one task without Lambda: the producer's validation, idempotency and Redis script."""
    from producer import enqueue, events
    from producer.settings import ProducerSettings

    try:
        payload = json.loads(data)
    except ValueError as exc:
        raise BadArgument(f"--data is not JSON: {exc}") from exc
    task: dict[str, Any] = {"type": task_type, "data": payload, "priority": priority.value}
    for key, value in (("queue", queue), ("task_id", task_id), ("delay_seconds", delay)):
        if value is not None:
            task[key] = value
    if task_id is not None and _known(stores(ctx), task_id, task_type, payload):
        return
    s = stores(ctx).settings
    producer = ProducerSettings(
        redis_url=s.redis_dsn(),
        redis_key_prefix=s.redis_key_prefix,
        task_queues=s.task_queues,
        task_routes=s.task_routes,
        redis_secret_arn=None,
    )
    planned = events.plan([events.Item("", task, None)], producer)  # InvalidJob -> exit status 2
    try:
        pushed = enqueue.push(planned, producer)
    finally:
        enqueue.close_clients()
    (tid,) = pushed.task_ids
    typer.echo(tid)  # alone on stdout, for TASK=$(gpuq submit ...)
    job = planned[0].job
    if pushed.duplicates:
        typer.echo("already enqueued by an earlier submit with this task id: not pushed again", err=True)
    else:
        typer.echo(f"queued on {job.queue} ({job.priority.value})", err=True)


#: What a database that did not answer (or has no gpuq tables yet) raises here.
_NO_ANSWER: tuple[type[Exception], ...] = (DBAPIError, *STORE_ERRORS)


def _known(st: Stores, task_id: str, task_type: str, data: Any) -> bool:
    """True when a task with this id exists already, the same task submitted again (nothing to push, exit 0).
    A different task under that id is refused here (exit 1): pushed, the dispatcher would only dead-letter
    it ("task id already used") after this command said it was queued. The producer's own idempotency mark
    lasts a day; the database remembers longer. A database that does not answer is no reason not to push:
    the dispatcher still checks."""
    try:
        row = transaction(st.engine, known_rows, attempts=1, task_ids=[task_id]).get(task_id)
    except _NO_ANSWER as exc:
        why = type(exc).__name__
        typer.echo(f"could not check the database for task {task_id!r} ({why}); pushing it", err=True)
        return False
    if row is None:
        return False
    try:
        same = row.type == task_type and json.loads(row.data) == data
    except ValueError:
        same = False
    if not same:
        raise OperatorError(
            f"task id {task_id!r} is already used by another task ({row.state}, type {row.type}): not"
            " pushed, the dispatcher would refuse it; choose another --task-id, or"
            f" `gpuq task retry {task_id}` to run that task again"
        )
    typer.echo(task_id)  # as a first submit prints it, for TASK=$(gpuq submit ...)
    typer.echo(f"task {task_id} exists already ({row.state}): not pushed again", err=True)
    return True
