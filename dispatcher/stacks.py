"""``kill -USR1 <pid>``: the dispatcher writes where every thread and every asyncio task stands to stderr.

A dispatcher that is alive but does nothing (a loop awaiting a reply that never comes) leaves no log line
to read; this answers "what is it waiting for" on a production box without a debugger, and the tests send
it to a dispatcher that did not finish its jobs in time, so a CI log shows the cause of a hang.

Threads come from ``faulthandler`` (safe in a signal handler, and it shows a loop thread stuck in a
blocking call). Tasks are walked through their ``cr_await`` chain: ``Task.get_stack`` shows only a task's
outermost frame, not the await deep inside redis-py that it is waiting on.
"""

from __future__ import annotations

import asyncio
import faulthandler
import signal
import sys
from types import FrameType
from typing import Any, TextIO

_MAX_DEPTH = 40


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
    out.write("--- end of tasks ---\n")
    out.flush()


def install(loop: asyncio.AbstractEventLoop, out: TextIO = sys.stderr) -> None:
    """SIGUSR1 dumps the threads at once (from the handler) and the tasks from the loop (a loop that is
    blocked shows up in the threads' dump, and its tasks then never come)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        faulthandler.dump_traceback(file=out, all_threads=True)
        loop.call_soon_threadsafe(dump_tasks, loop, out)

    signal.signal(signal.SIGUSR1, handler)
