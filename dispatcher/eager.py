"""Start a task now, not on the event loop's next turn: Python 3.12's ``eager_start``, for 3.11.

Why: the dispatcher's hot path is a GPU's callback answered by the next job's POST (README "Standby jobs").
``asyncio.create_task`` runs nothing until the loop's next turn, and aiohttp then writes the request's body
from a task of its own (on 3.11; eagerly on 3.12+), a turn later again: two turns of a loop that, at
saturation on 2 cores, takes 1-5 ms each (measured, ``bench/RESULTS.md``). ``start_now`` runs the coroutine
at once, as the task it returns, up to its first real wait; tasks it creates meanwhile start the same way, so
the POST's bytes are on the wire when ``start_now`` returns.

Only for coroutines that cannot call back into the caller's state while it is mid-way (the GPU client's
``send``): whatever the coroutine does before it first waits runs inside the caller's call.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import types
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")

_enter_task: Any = getattr(asyncio.tasks, "_enter_task")  # noqa: B009 - private, no public equivalent on 3.11
_leave_task: Any = getattr(asyncio.tasks, "_leave_task")  # noqa: B009


def start_now(coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
    """``coro`` as a task, already run up to its first wait (``eager_start``)."""
    loop = asyncio.get_running_loop()
    if sys.version_info >= (3, 12):  # pragma: no cover - this repository runs 3.11
        return asyncio.Task(coro, loop=loop, name=name, eager_start=True)  # type: ignore[call-arg]
    return _start_now(loop, coro, name, contextvars.copy_context())


def _start_now(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, T],
    name: str | None,
    ctx: contextvars.Context,
) -> asyncio.Task[T]:
    # The task exists before its first step, so that what the step asks for (``current_task()``: aiohttp's
    # timeouts cancel the task they were entered in) is this task, not the caller's. Its coroutine is a driver
    # whose first step is run here; it then pauses until the task's first turn.
    driver = _drive(coro)
    task: asyncio.Task[T] = asyncio.Task(driver, loop=loop, name=name, context=ctx)
    outer = asyncio.current_task(loop)
    if outer is not None:
        _leave_task(loop, outer)
    _enter_task(loop, task)
    factory = loop.get_task_factory()
    loop.set_task_factory(_eager_factory)  # type: ignore[arg-type] # tasks created in the step (aiohttp's writer)
    try:
        ctx.run(driver.send, None)
    finally:
        loop.set_task_factory(factory)
        _leave_task(loop, task)
        if outer is not None:
            _enter_task(loop, outer)
    return task


def _eager_factory(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, Any],
    *,
    context: contextvars.Context | None = None,
) -> asyncio.Task[Any]:
    return _start_now(loop, coro, None, context if context is not None else contextvars.copy_context())


@types.coroutine
def _drive(coro: Coroutine[Any, Any, Any]) -> Generator[Any, Any, Any]:
    """``coro`` as its task would run it, the first step taken at once (by ``_start_now``)."""
    first = _step(coro.send, None)
    try:
        yield  # until the task's first turn
    except BaseException as exc:
        first = _cancelled_early(coro, first, exc)
    how, value = first
    if how == "return":
        return value
    if how == "raise":
        raise value
    return (yield from _follow(coro, value))


def _step(how: Any, what: Any) -> tuple[str, Any]:
    """One step of a coroutine (``coro.send`` or ``coro.throw``): what it waits for, or how it ended."""
    try:
        return "wait", how(what)
    except StopIteration as stop:
        return "return", stop.value
    except BaseException as exc:  # the task's, on its first turn (a KeyboardInterrupt too, as a Task does)
        return "raise", exc


def _cancelled_early(
    coro: Coroutine[Any, Any, Any], first: tuple[str, Any], exc: BaseException
) -> tuple[str, Any]:
    """A cancel before the task's first turn. Had the task taken the first step itself, it would be waiting on
    what the step waits for, and its cancel would cancel that (an eagerly started child, say): so here. A
    result or error already there stands, as for a task already done."""
    how, waits_for = first
    if how != "wait" or (isinstance(waits_for, asyncio.Future) and waits_for.cancel()):
        return first
    return _step(coro.throw, exc)


def _follow(coro: Coroutine[Any, Any, Any], waits_for: Any) -> Generator[Any, Any, Any]:
    """Drive ``coro`` on: what it waits for is handed to the task, which wakes us when it is done; a cancel
    the task throws in is ``coro``'s to handle."""
    while True:
        try:
            sent = yield waits_for
        except BaseException as exc:
            how, value = _step(coro.throw, exc)
        else:
            how, value = _step(coro.send, sent)
        if how == "return":
            return value
        if how == "raise":
            raise value
        waits_for = value
