"""The ``gpuq`` command: one Typer app with a sub-app per noun (gpu, task, queue, db).

Exit status: 0 done, 1 refused (unknown GPU or task, busy GPU, final task), 2 bad argument or setting,
3 Redis or the database unreachable. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError
from typer.core import TyperGroup

from dispatcher.cli import admin, gpus, queues, status, tasks
from dispatcher.cli.context import Stores
from dispatcher.cli.errors import BadArgument, OperatorError, Unreachable
from dispatcher.db.engine import StoreUnavailable, driver_error
from producer.errors import ConfigError, InvalidJob, QueueUnavailable


def _translate(ctx: Any, exc: Exception) -> OperatorError | None:
    """The operator's reading of an error from below, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, OperatorError):
        return exc
    if isinstance(exc, ConfigError | InvalidJob):
        return BadArgument(exc.message)
    s = ctx.find_root().obj
    if isinstance(exc, RedisError | QueueUnavailable):
        where = s.redis_where() if s is not None else "Redis"
        detail = exc.detail if isinstance(exc, QueueUnavailable) else str(exc)
        return Unreachable(f"Redis at {where} is unreachable: {detail}")
    if isinstance(exc, StoreUnavailable | DBAPIError):
        return _database(s.db_where() if s is not None else "the database", exc)
    return None


def _database(where: str, exc: Exception) -> Unreachable:
    orig, code = driver_error(exc)
    if code == 1146 or "no such table" in str(orig):
        return Unreachable(f"database {where} has no gpuq tables yet: run `gpuq db init`")
    if code == 1049:
        return Unreachable(
            f"database {where} does not exist: create it (CREATE DATABASE <name>), then run `gpuq db init`"
        )
    detail = str(exc.orig) if isinstance(exc, DBAPIError) else str(exc)
    # A column this gpuq knows and the database lacks: its schema predates it (db/migrations.py adds it).
    if code == 1054 or "no such column" in str(orig):
        return Unreachable(
            f"database {where} has the schema of an earlier gpuq ({detail}): run `gpuq db init`"
            " (or start a dispatcher of this version) to upgrade it"
        )
    return Unreachable(f"database {where} is unreachable: {detail}")


class GpuqGroup(TyperGroup):
    """Runs every subcommand under one error policy (see the module docstring)."""

    def invoke(self, ctx: Any) -> Any:  # typer's vendored click.Context
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except Exception as exc:
            err = _translate(ctx, exc)
            if err is None:
                raise
            typer.echo(f"gpuq: {err.message}", err=True)
            raise typer.Exit(err.exit_code) from None


app = typer.Typer(
    cls=GpuqGroup,
    help="Operate a gpuq deployment: GPU load, GPUs, tasks, queues, the database.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    ctx: typer.Context,
    env_file: Annotated[
        Path | None,
        typer.Option(
            "--env-file",
            envvar="GPUQ_ENV_FILE",
            help="Read settings from this file instead of ./.env, e.g. /etc/gpuq/dispatcher.env.",
        ),
    ] = None,
) -> None:
    """Settings come from the environment and ./.env (or --env-file), as for the dispatcher (CALLBACK_SECRET
    not needed)."""
    if env_file is not None and not env_file.is_file():
        typer.echo(f"gpuq: --env-file {env_file}: no such file", err=True)
        raise typer.Exit(2)
    root = ctx.find_root()
    if not isinstance(root.obj, Stores):
        root.obj = Stores(env_file)
        root.call_on_close(root.obj.close)


app.command()(status.status)
app.command()(tasks.submit)
app.command()(admin.sql)
app.add_typer(gpus.app, name="gpu")
app.add_typer(tasks.app, name="task")
app.add_typer(queues.app, name="queue")
app.add_typer(admin.db_app, name="db")


def main() -> None:
    command = typer.main.get_command(app)  # what app() runs, built once here to be read as plain help
    _plain_help(command)
    sys.exit(command(prog_name="gpuq"))


def _plain_help(command: Any) -> None:
    """The docstrings a command's help comes from mark code as ``this`` (reST, for the source's readers):
    shown as plain text, so that ``gpuq gpu --help`` does not print the double backticks."""
    for name in ("help", "short_help"):
        text = getattr(command, name, None)
        if isinstance(text, str):
            setattr(command, name, text.replace("``", ""))
    for sub in getattr(command, "commands", {}).values():
        _plain_help(sub)
