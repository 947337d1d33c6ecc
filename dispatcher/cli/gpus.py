"""``gpuq gpu``: add, drain, activate, remove and list GPU services while dispatchers run.

Every dispatcher reads the GPU table at each placement, so a change here takes effect at once on all of
them; after adding or activating a GPU a wake-up makes them look for work for it straight away. A GPU listed
in GPU_ENDPOINTS is registered again when a dispatcher starts if it is unknown (remove it there too); a known
one is never changed by a dispatcher: ``gpu set`` changes it, and a dispatcher whose GPU_ENDPOINTS disagrees
stops at start.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Annotated
from urllib.parse import urlsplit

import typer

from dispatcher.cli.agents import add_pull, check_names, endpoint, kept_note, token
from dispatcher.cli.context import stores
from dispatcher.cli.errors import BadArgument, OperatorError
from dispatcher.cli.render import console, rows_table
from dispatcher.db.engine import utcnow
from dispatcher.db.gpus import (
    UrlTaken,
    list_gpus,
    register_gpu,
    remove_gpu,
    set_gpu_state,
    update_gpu,
)
from dispatcher.gpus.endpoints import DEFAULT_POOL
from dispatcher.gpus.same_service import shown_url
from dispatcher.states import GpuState


@contextlib.contextmanager
def _url_taken_refused() -> Iterator[None]:
    """Another GPU of the pool has this URL: a bad argument (exit 2) naming it, not a traceback."""
    try:
        yield
    except UrlTaken as exc:
        raise BadArgument(str(exc)) from None


app = typer.Typer(help="Add, drain, activate, remove and list GPU services.", no_args_is_help=True)

Name = Annotated[str, typer.Argument(help="GPU name, e.g. g0.")]
app.command()(token)

# How often `gpu drain --wait` looks at the GPU's slots: one indexed COUNT per look.
DRAIN_POLL_SECONDS = 0.5


@app.command()
def add(
    ctx: typer.Context,
    name: Name,
    url: Annotated[
        str | None, typer.Argument(help="The GPU service's URL, e.g. http://10.0.0.5:9000/infer.")
    ] = None,
    *,
    pool: Annotated[
        str | None,
        typer.Option(
            help=f"Pool serving the task types routed to it. Default: {DEFAULT_POOL}, or a known GPU's."
        ),
    ] = None,
    slots: Annotated[
        int | None, typer.Option(min=1, max=1024, help="Default: SLOTS_PER_GPU, or a known GPU's.")
    ] = None,
    probe: Annotated[bool, typer.Option(help="GET the URL first and say what answered.")] = True,
    pull: Annotated[
        bool, typer.Option("--pull", help="A GPU that cannot be reached: its agent polls (no URL).")
    ] = False,
) -> None:
    """Register a GPU (or change the URL, pool or slot count of a known one: what is not given is kept).
    Its URL is probed first and the answer shown: a wrong path (404) stops the command (exit 2), a token it
    wants (401/403) is said, before jobs go there. With ``--pull`` its agent token is printed, once."""
    if pull and url is not None:
        raise BadArgument("a pull GPU has no URL: `gpuq gpu add NAME --pull [--pool P]`")
    if not pull and url is None:
        raise BadArgument("give the GPU's URL, or --pull for a GPU whose agent polls")
    check_names(name, pool or DEFAULT_POOL)  # bad input is refused before any store is asked
    if url is not None:
        endpoint(f"{pool or DEFAULT_POOL}:{name}={url}")
    s = stores(ctx)
    # A known GPU keeps the pool and slots not given: re-running a provisioning script's `gpu add` moved a
    # 2-slot GPU of pool embed to the default pool with SLOTS_PER_GPU slots, silently (an outside trial).
    old = next((g for g in s.db(list_gpus) if g.gpu_id == name), None)
    kept = [what for what, given in (("pool", pool), ("slots", slots)) if old is not None and given is None]
    pool = pool if pool is not None else old.pool if old is not None else DEFAULT_POOL
    count = slots or (old.slots if old is not None else s.settings.slots_per_gpu)
    if pull:
        add_pull(ctx, name, pool=pool, slots=count, kept=kept)
        return
    check_names(name, pool)
    ep = endpoint(f"{pool}:{name}={url}")
    if probe:
        _say_probe(ep.url)
    with _url_taken_refused():
        s.db(register_gpu, gpu_id=ep.gpu_id, url=ep.url, pool=ep.pool, slot_count=count, now=utcnow())
    s.wake("slot")
    verb = "updated" if old is not None else "added"
    console().print(
        f"{verb} GPU {ep.gpu_id} ({shown_url(ep.url)}) in pool {ep.pool} with {count} slots{kept_note(kept)}"
    )


def _say_probe(url: str) -> None:
    """One line on stderr about what answers at ``url``: registration goes on (a GPU may be registered
    before it starts, or want a token the GET lacks), but a wrong URL is better seen now than in failed jobs.
    A 404 stops the command (exit 2): the service is up and says the path is wrong."""
    import httpx

    from dispatcher.gpus.gpu_client import probe_ok

    shown = shown_url(url)
    if urlsplit(url).username is not None:
        typer.echo(
            f"probe: {shown} carries credentials (user:password@): a dispatcher with BEARER_TOKEN set"
            " cannot send them (one Authorization header), and refuses every job to it",
            err=True,
        )
    try:
        status = httpx.get(url, timeout=5).status_code
    # ValueError: a URL httpx cannot request (an outside trial got a traceback); InvalidURL is not HTTPError
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
        what = type(exc).__name__
        typer.echo(f"probe: no answer from {shown} ({what}): jobs go there once it answers", err=True)
        return
    if status == 404:  # a service is there, and it has no such path: every job would be refused
        raise BadArgument(
            f"probe: {shown} answered 404: wrong path? Nothing registered (--no-probe registers it anyway)"
        )
    if status in (401, 403):
        typer.echo(f"probe: {shown} answered {status}: it wants a token (BEARER_TOKEN must be its)", err=True)
    elif not probe_ok(status):
        typer.echo(
            f"probe: WARNING {shown} answered {status}: is it up? A GPU that refuses jobs is taken "
            "out of rotation (its jobs wait for other GPUs)",
            err=True,
        )
    else:
        typer.echo(f"probe: {shown} answered {status}: a service is there", err=True)


@app.command("set")
def set_(
    ctx: typer.Context,
    name: Name,
    *,
    url: Annotated[str | None, typer.Option(help="Its new URL.")] = None,
    pool: Annotated[str | None, typer.Option(help="Its new pool.")] = None,
    slots: Annotated[int | None, typer.Option(min=1, max=1024, help="Its new slot count.")] = None,
    cancel_url: Annotated[
        str | None,
        typer.Option(help="Where its service takes cancels, if not at <url>/cancel; '' for that again."),
    ] = None,
) -> None:
    """Change a known GPU's registration (what a dispatcher's GPU_ENDPOINTS never changes by itself)."""
    if url is None and pool is None and slots is None and cancel_url is None:
        raise BadArgument("say what to change: --url, --pool, --slots or --cancel-url")
    check_names(None, pool)  # the name is a known GPU's (one from before the rules is still changed)
    if cancel_url:
        endpoint(f"{DEFAULT_POOL}:{name}={cancel_url}", "--cancel-url: ")
    if url is not None or pool is not None:
        endpoint(f"{pool or DEFAULT_POOL}:{name}={url or 'http://placeholder'}")
    s = stores(ctx)
    with _url_taken_refused():
        changed = s.db(
            update_gpu, gpu_id=name, url=url, pool=pool, slot_count=slots, cancel_url=cancel_url, now=utcnow()
        )
    if not changed:
        raise OperatorError(f"no GPU named {name!r} (gpuq gpu add registers one)")
    s.wake("slot")
    g = next(g for g in s.db(list_gpus) if g.gpu_id == name)
    console().print(f"GPU {name} is now {shown_url(g.url)} in pool {g.pool} with {g.slots} slots")
    if cancel_url is not None:
        console().print(f"cancels go to {shown_url(cancel_url) if cancel_url else 'its URL + /cancel'}")


def _set_state(ctx: typer.Context, name: str, state: GpuState) -> int:
    s = stores(ctx)
    if not s.db(set_gpu_state, gpu_id=name, state=state, now=utcnow()):
        raise OperatorError(f"no GPU named {name!r} (gpuq gpu list shows them)")
    return next(g.busy for g in s.db(list_gpus) if g.gpu_id == name)


def _busy(ctx: typer.Context, name: str) -> int:
    """Busy slots of the GPU; 0 once it is gone (removed meanwhile: nothing can run on it)."""
    return next((g.busy for g in stores(ctx).db(list_gpus) if g.gpu_id == name), 0)


@app.command()
def drain(
    ctx: typer.Context,
    name: Name,
    wait: Annotated[
        bool, typer.Option("--wait", help="Return only once no job runs on it (exit 1 at --timeout).")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(min=0, help="With --wait: give up after this many seconds.")
    ] = None,
) -> None:
    """Take no new jobs on a GPU; the running ones finish (then it can be removed).

    ``--wait`` is for a GPU service's stop hook (a Kubernetes preStop, a systemd ExecStop): the service
    keeps running until its slots are empty, so scaling it down kills no running job. A slot is empty once
    its job called back, was cancelled and confirmed, or its lease ran out."""
    if timeout is not None and not wait:  # it was ignored without a word (an outside trial)
        raise BadArgument("--timeout only applies with --wait: `gpuq gpu drain NAME --wait --timeout S`")
    busy = _set_state(ctx, name, GpuState.DRAINING)
    console().print(f"GPU {name} draining: {busy} job(s) still running, no new ones")
    if not wait:
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    while busy:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise OperatorError(f"GPU {name} still runs {busy} job(s) after {timeout:g} s of draining")
        time.sleep(DRAIN_POLL_SECONDS if left is None else min(DRAIN_POLL_SECONDS, left))
        busy = _busy(ctx, name)
    console().print(f"GPU {name} drained: no job running")


@app.command()
def activate(ctx: typer.Context, name: Name) -> None:
    """Put a drained GPU back into rotation."""
    _set_state(ctx, name, GpuState.ACTIVE)
    stores(ctx).wake("slot")
    console().print(f"GPU {name} active")


@app.command()
def remove(ctx: typer.Context, name: Name) -> None:
    """Delete a GPU that runs nothing (drain it first and wait for its jobs)."""
    s = stores(ctx)
    removed, busy = s.db(remove_gpu, gpu_id=name)
    if busy:
        raise OperatorError(
            f"GPU {name} still runs {busy} job(s): `gpuq gpu drain {name}`, wait until gpuq gpu list "
            "shows it idle, then remove it"
        )
    if not removed:
        raise OperatorError(f"no GPU named {name!r} (gpuq gpu list shows them)")
    console().print(f"removed GPU {name}")


@app.command("list")
def list_(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """Every GPU: pool, URL, state, health, busy slots."""
    rows = stores(ctx).db(list_gpus)
    if as_json:
        typer.echo(json.dumps([asdict(g) | {"url": shown_url(g.url)} for g in rows], indent=2))
        return
    console().print(
        rows_table(
            ("GPU", "pool", "state", "healthy", "busy", "failures", "url"),
            (
                (
                    g.gpu_id,
                    g.pool,
                    g.state,
                    "yes" if g.healthy else "NO",
                    f"{g.busy}/{g.slots}",
                    g.consecutive_failures,
                    shown_url(g.url),
                )
                for g in rows
            ),
        )
    )
