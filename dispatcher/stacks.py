"""``kill -USR1 <pid>``: the dispatcher writes where every thread and every asyncio task stands to stderr.

A dispatcher that is alive but does nothing (a loop awaiting a reply that never comes) leaves no log line
to read; this answers "what is it waiting for" on a production box without a debugger, and the tests send
it to a dispatcher that did not finish its jobs in time, so a CI log shows the cause of a hang.

Threads come from ``faulthandler``, called from the Python-level handler with the GIL held: its C-level
``register`` walks other threads' frames while they run, and killed a busy dispatcher once (CI of e08b773);
the price is that a main thread stuck in a C call that never returns to Python dumps nothing. Tasks are walked
through their ``cr_await`` chain (``Task.get_stack`` shows only a task's outermost frame, not the await deep
inside redis-py that it is waiting on), by the loop itself once the dispatcher runs (``attach``). Installed
first thing in ``main``: before that, SIGUSR1's default action would end a process that is only starting (a
hang at start is one to diagnose too).
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import signal
import sys
from types import FrameType
from typing import Any, TextIO

_MAX_DEPTH = 40
#: The loop whose tasks a SIGUSR1 dumps (``attach``); None before the dispatcher runs and after it stopped.
_loop: asyncio.AbstractEventLoop | None = None
_out: TextIO = sys.stderr
#: The last line of a dump of the tasks (``dispatcher/testing.py`` waits for it).
END = "--- end of tasks ---"


def await_chain(task: asyncio.Task[Any]) -> list[str]:
    """``file:line in function`` for each coroutine the task is suspended in, outermost first, then what
    the innermost one waits on (a Future, a sleep)."""
    out: list[str] = []
    obj: Any = task.get_coro()
    for _ in range(_MAX_DEPTH):
        frame: FrameType | None = getattr(obj, "cr_frame", None) or getattr(obj, "gi_frame", None)
        if frame is None:
            if obj is not None:
                out.append(f"waiting on {obj!r}"[:300])
            break
        code = frame.f_code
        out.append(f"{code.co_filename}:{frame.f_lineno} in {code.co_name}")
        obj = getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None)
    return out


def dump_tasks(loop: asyncio.AbstractEventLoop, out: TextIO) -> None:
    tasks = asyncio.all_tasks(loop)
    out.write(f"--- gpuq: {len(tasks)} asyncio tasks ---\n")
    for task in sorted(tasks, key=lambda t: t.get_name()):
        out.write(f"task {task.get_name()}:\n")
        for line in await_chain(task):
            out.write(f"    {line}\n")
    out.write(END + "\n")
    out.flush()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """The threads now; the tasks from the loop, if one runs."""
    with contextlib.suppress(Exception):
        faulthandler.dump_traceback(file=_out, all_threads=True)
    loop = _loop
    if loop is None or loop.is_closed():
        with contextlib.suppress(Exception):
            _out.write(f"--- gpuq: no event loop running: no tasks ---\n{END}\n")
            _out.flush()
        return
    with contextlib.suppress(RuntimeError):  # closed meanwhile
        loop.call_soon_threadsafe(dump_tasks, loop, _out)


def install(out: TextIO = sys.stderr) -> None:
    """SIGUSR1 dumps the threads (at once) and the tasks of the attached loop. The main thread only."""
    global _out  # noqa: PLW0603 - one handler per process, set once at start
    _out = out
    signal.signal(signal.SIGUSR1, _on_signal)


def attach(loop: asyncio.AbstractEventLoop | None) -> None:
    """The loop whose tasks SIGUSR1 dumps from now on (None: the dispatcher stopped)."""
    global _loop  # noqa: PLW0603 - see install
    _loop = loop
