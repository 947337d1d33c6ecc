"""``gpuq gpu add NAME --pull`` and ``gpuq gpu token NAME --rotate``: pull GPUs and their agent tokens.

A token is printed once, alone on stdout (``TOKEN=$(gpuq gpu add g7 --pull)`` keeps it out of the terminal
history's output); what it is for goes to stderr. The database keeps only its hash, so a lost token is
replaced, not shown again: ``gpuq gpu token NAME --rotate`` (the old one stops working at once).
"""

from __future__ import annotations

from typing import Annotated

import typer

from dispatcher.cli.context import stores
from dispatcher.cli.errors import BadArgument, OperatorError
from dispatcher.db.agents import pull_gpu, register_pull, rotate_token
from dispatcher.db.engine import utcnow
from dispatcher.gpus.endpoints import GpuEndpoint, name_problem, parse_gpu_endpoints


def endpoint(spec: str, what: str = "") -> GpuEndpoint:
    """The one GPU ``spec`` names in GPU_ENDPOINTS' syntax, so the CLI accepts exactly the names, pools and
    URLs a dispatcher does; a wrong one is the operator's mistake (exit 2), said after ``what``."""
    try:
        (ep,) = parse_gpu_endpoints(spec)
    except ValueError as exc:
        raise BadArgument(f"{what}{exc}") from exc
    return ep


def check_names(name: str | None, pool: str | None) -> None:
    """A GPU name and pool GPU_ENDPOINTS could hold, checked alone (in the spec ``endpoint`` parses, a comma
    in a name split it and the error named a GPU nobody typed: ``'po ol:p' is not [pool:]NAME=URL``), the
    name also one an agent's URL can hold (``NOT_IN_GPU_NAMES``; a GPU registered with one before keeps it,
    and ``gpu set`` changes it). None: not given here (``gpu set`` changes a known GPU's pool; its name is
    not new)."""
    problems = [
        None if name is None else name_problem("GPU name", name, colon=False, in_url=True),
        None if pool is None else name_problem("pool", pool),
    ]
    for problem in problems:
        if problem:
            raise BadArgument(problem)


def kept_note(kept: list[str]) -> str:
    """What ``gpu add`` kept of a known GPU because it was not given."""
    return f" ({' and '.join(kept)} kept: --pool, --slots or `gpuq gpu set` change them)" if kept else ""


def add_pull(ctx: typer.Context, name: str, *, pool: str, slots: int, kept: list[str]) -> None:
    """Register a pull GPU (or change a known one's pool and slots); print its token if it got one."""
    check_names(name, pool)
    ep = endpoint(f"{pool}:pull:{name}")
    s = stores(ctx)
    known = s.db(pull_gpu, gpu_id=ep.gpu_id)
    token = s.db(register_pull, gpu_id=ep.gpu_id, pool=ep.pool, slot_count=slots, now=utcnow())
    verb = "updated" if known is not None else "added"
    typer.echo(f"{verb} pull GPU {ep.gpu_id} in pool {ep.pool} with {slots} slots{kept_note(kept)}", err=True)
    if token is None:
        typer.echo(
            f"its agent token is unchanged (`gpuq gpu token {ep.gpu_id} --rotate` issues a new one)", err=True
        )
        return
    _show(ep.gpu_id, token)


def token(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The pull GPU's name.")],
    rotate: Annotated[
        bool, typer.Option("--rotate", help="Issue a new agent token; the old one stops.")
    ] = False,
) -> None:
    """A pull GPU's agent token: stored hashed, so it is never shown again; ``--rotate`` issues a new one."""
    s = stores(ctx)
    kind = s.db(pull_gpu, gpu_id=name)
    if kind is None:
        raise OperatorError(f"no GPU named {name!r} (gpuq gpu list shows them)")
    if not kind[0]:
        raise OperatorError(f"GPU {name} is no pull GPU (`gpuq gpu add {name} --pull` makes it one)")
    if not rotate:
        said = "has an agent token" if kind[1] else "has no agent token yet"
        raise BadArgument(
            f"GPU {name} {said}; tokens are stored hashed and never shown again: "
            f"`gpuq gpu token {name} --rotate` issues a new one"
        )
    new = s.db(rotate_token, gpu_id=name, now=utcnow())
    if new is None:  # removed or made a pushed GPU meanwhile
        raise OperatorError(f"GPU {name} is no pull GPU any more")
    typer.echo(f"new agent token for pull GPU {name}; the old one no longer works", err=True)
    _show(name, new)


def _show(name: str, value: str) -> None:
    # The environment, not --agent-token: a command line is readable by every local user (ps, /proc).
    typer.echo(f"agent token (shown once; run the agent with GPUQ_AGENT_TOKEN=it --gpu-id {name}):", err=True)
    typer.echo(value)
