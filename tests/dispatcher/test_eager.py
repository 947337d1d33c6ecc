"""``dispatcher/eager.py``: a task started at once behaves as the task ``create_task`` would have made, except
that its first step has run when ``start_now`` returns (on the loop the dispatcher runs, uvloop, and on
asyncio's own)."""

from __future__ import annotations

import asyncio
import contextvars
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import pytest
import uvloop

from dispatcher.eager import start_now

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


@pytest.fixture(params=["uvloop", "asyncio"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    def go(main: Coroutine[Any, Any, Any]) -> Any:
        if request.param == "uvloop":
            return uvloop.run(main)
        return asyncio.run(main)

    return go


def test_the_first_step_runs_before_start_now_returns_as_the_task_itself(run: Any) -> None:
    seen: list[Any] = []

    async def work() -> str:
        seen.append(("step 1", asyncio.current_task()))
        await asyncio.sleep(0)
        seen.append(("step 2", asyncio.current_task()))
        return "done"

    async def main() -> None:
        caller = asyncio.current_task()
        task = start_now(work(), name="w")
        assert seen == [("step 1", task)]  # ran already, and current_task() was the new task, not the caller
        assert asyncio.current_task() is caller  # given back
        assert asyncio.get_running_loop().get_task_factory() is None
        assert await task == "done"
        assert seen[1] == ("step 2", task)
        assert task.get_name() == "w"

    run(main())


def test_a_coroutine_that_never_waits_returns_and_one_that_raises_raises(run: Any) -> None:
    async def returns() -> int:
        return 7

    async def raises() -> None:
        raise ValueError("boom")

    async def main() -> None:
        assert await start_now(returns()) == 7
        task = start_now(raises())
        with pytest.raises(ValueError, match="boom"):
            await task

    run(main())


def test_tasks_created_during_the_first_step_start_at_once_too(run: Any) -> None:
    order: list[str] = []

    async def inner() -> None:
        order.append("inner")
        await asyncio.sleep(0)

    async def outer() -> None:
        t = asyncio.get_running_loop().create_task(inner())  # as aiohttp's body writer on 3.11
        order.append("outer after create_task")
        await t

    async def main() -> None:
        task = start_now(outer())
        assert order == ["inner", "outer after create_task"]
        await task
        # outside a first step, create_task is the loop's own again
        later = asyncio.get_running_loop().create_task(inner())
        assert order[-1] == "outer after create_task"
        await later

    run(main())


async def _waits(cleaned: list[str]) -> None:
    try:
        await asyncio.sleep(10)
    finally:
        cleaned.append("finally")


def test_a_cancel_while_it_waits_is_thrown_into_the_coroutine(run: Any) -> None:
    cleaned: list[str] = []

    async def main() -> None:
        task = start_now(_waits(cleaned))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cleaned == ["finally"]
        assert task.cancelled()

    run(main())


def test_a_cancel_before_its_first_turn_closes_the_coroutine(run: Any) -> None:
    cleaned: list[str] = []

    async def main() -> None:
        task = start_now(_waits(cleaned))
        task.cancel()  # in the same turn: the task never ran a step of its own
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cleaned == ["finally"]

    run(main())


def test_a_cancel_before_its_first_turn_cancels_what_it_waits_for_as_a_task_would(run: Any) -> None:
    # A task that took its first step itself would be waiting on the child started there; its cancel
    # cancels that child, and the coroutine sees CancelledError (not GeneratorExit: its handlers run).
    ran: list[str] = []

    async def child() -> None:
        await asyncio.sleep(0.1)
        ran.append("child ran on")

    async def parent() -> None:
        try:
            await asyncio.get_running_loop().create_task(child())
        except asyncio.CancelledError:
            ran.append("parent saw the cancel")
            await asyncio.sleep(0)  # may still wait in its handler
            raise

    async def main() -> None:
        task = start_now(parent())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.2)
        assert ran == ["parent saw the cancel"]

    run(main())


class Boom(BaseException):
    pass


def test_a_base_exception_in_the_first_step_ends_the_task_with_it(run: Any) -> None:
    async def booms() -> None:
        raise Boom

    async def main() -> None:
        task = start_now(booms())  # not raised into the caller: the task's, as with create_task
        with pytest.raises(Boom):
            await task

    run(main())


def test_a_timeout_entered_in_the_first_step_cancels_that_task_not_the_caller(run: Any) -> None:
    # aiohttp's timeouts (and asyncio.timeout) cancel the task current when they were entered.
    async def slow() -> str:
        try:
            async with asyncio.timeout(0.05):
                await asyncio.sleep(10)
        except TimeoutError:
            return "timed out"
        return "not timed out"

    async def main() -> None:
        task = start_now(slow())
        await asyncio.sleep(0.2)  # the caller is not cancelled meanwhile
        assert await task == "timed out"

    run(main())


def test_context_variables_are_the_tasks_own(run: Any) -> None:
    async def sets() -> str:
        VAR.set("inside")
        await asyncio.sleep(0)
        return VAR.get()

    async def main() -> None:
        VAR.set("caller")
        task = start_now(sets())
        assert VAR.get() == "caller"
        assert await task == "inside"

    run(main())


def test_a_posts_bytes_are_on_the_wire_when_start_now_returns(run: Any) -> None:
    # The point of it all: with the loop blocked right after start_now, a server still gets the whole request
    # (a keep-alive connection, as to a busy GPU). create_task would have sent nothing by then.
    got: list[bytes] = []
    body = b'{"task_id": "t1"}'
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    answer = b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n{}"

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            for _ in range(2):
                data = b""
                while not data.endswith(body):
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                got.append(data)
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/run"

            async def post() -> int:
                async with session.post(url, data=body) as r:
                    await r.read()
                    return r.status

            assert await post() == 202  # the connection is up and kept
            task = start_now(post())
            time.sleep(0.3)  # the loop is blocked: only what start_now wrote can have arrived
            assert len(got) == 2 and got[1].endswith(body)
            assert await task == 202

    try:
        run(main())
    finally:
        server.close()
        thread.join(2)
