"""What the CLI tells an operator when a command cannot do its job, and with which exit status.

    OperatorError         1  the command was understood but refused (unknown GPU, busy GPU, final task)
     ├── BadArgument      2  an argument or a setting is wrong (as click's usage errors)
     └── Unreachable      3  Redis or the database did not answer

``app.GpuqGroup`` turns these, and the store and producer errors they stand for, into one line on stderr
and the exit status; no command prints a traceback.
"""

from __future__ import annotations


class OperatorError(Exception):
    """The command was refused."""

    exit_code = 1

    def __init__(self, message: str | None = None) -> None:
        self.message = message or (self.__doc__ or "").strip()
        super().__init__(self.message)


class BadArgument(OperatorError):
    """An argument or a setting is not valid."""

    exit_code = 2


class Unreachable(OperatorError):
    """A store (Redis or the database) did not answer."""

    exit_code = 3
