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
import contextlib
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
    # timeouts cancel the task they were entered in) is this task, not the caller's.
    gate: asyncio.Future[tuple[str, Any]] = loop.create_future()
    state = {"started": False}
    task: asyncio.Task[T] = asyncio.Task(_go_on(coro, gate, state), loop=loop, name=name, context=ctx)
    task.add_done_callback(lambda t: _close_unstarted(t, coro, state))
    outer = asyncio.current_task(loop)
    if outer is not None:
        _leave_task(loop, outer)
    _enter_task(loop, task)
    factory = loop.get_task_factory()
    loop.set_task_factory(_eager_factory)  # type: ignore[arg-type] # tasks created during the step (aiohttp's body writer) too
    try:
        gate.set_result(ctx.run(_first_step, coro))
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


def _first_step(coro: Coroutine[Any, Any, Any]) -> tuple[str, Any]:
    try:
        waits_for = coro.send(None)
    except StopIteration as stop:
        return "return", stop.value
    except (Exception, asyncio.CancelledError) as exc:
        return "raise", exc
    return "wait", waits_for


async def _go_on(
    coro: Coroutine[Any, Any, T], gate: asyncio.Future[tuple[str, Any]], state: dict[str, bool]
) -> T:
    state["started"] = True
    how, value = await gate  # set before this task's first turn: no wait
    if how == "return":
        return value  # type: ignore[no-any-return]
    if how == "raise":
        raise value
    return await _resume(coro, value)  # type: ignore[no-any-return]


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], waits_for: Any) -> Generator[Any, Any, Any]:
    """Drive ``coro`` on from where its first step left it, as its task would: what it waits for is handed to
    the task (which wakes us when it is done), cancellation is thrown into it."""
    while True:
        try:
            sent = yield waits_for
        except BaseException as exc:  # thrown in by the task (a cancel): it is coro's to handle
            try:
                waits_for = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            waits_for = coro.send(sent)
        except StopIteration as stop:
            return stop.value


def _close_unstarted(task: asyncio.Task[Any], coro: Coroutine[Any, Any, Any], state: dict[str, bool]) -> None:
    """A task cancelled before its first turn never drove ``coro`` on: close it where its first step left
    it."""
    if not state["started"]:
        with contextlib.suppress(BaseException):
            coro.close()
