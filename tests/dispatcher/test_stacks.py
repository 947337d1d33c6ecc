"""``kill -USR1``: a dispatcher process writes its threads and asyncio tasks to its log and keeps running
(dispatcher/stacks.py); the suite asks it of the dispatchers of a failed test."""

from __future__ import annotations

import asyncio

import pytest

from dispatcher import stacks
from tests.dispatcher.conftest import Stack
from tests.dispatcher.harness import DispatcherProc
from tests.dispatcher.helpers import wait_for


@pytest.mark.slow  # a real process
def test_sigusr1_dumps_threads_and_tasks_and_the_process_goes_on(stack: Stack) -> None:
    fleet = stack.fleet(gpus=1)
    d = stack.process(fleet, name="dumped")
    first = d.dump_stacks(wait=10)
    assert "Thread 0x" in first and "most recent call first" in first  # faulthandler's threads
    assert "task dispatch-loop:" in first and "task housekeeping:" in first
    assert first.count(stacks.END) == 1
    second = d.dump_stacks(wait=10)  # waits for a second dump, not the first one seen again
    assert second.count(stacks.END) == 2
    assert d.alive()
    assert d.term() == 0  # a clean stop is still one


@pytest.mark.slow
def test_sigusr1_while_starting_does_not_end_the_process(stack: Stack) -> None:
    # A start that hangs is one to diagnose too: before the handler was installed first thing, SIGUSR1's
    # default action ended a process that was only starting (a review).
    fleet = stack.fleet(gpus=1)
    starting = DispatcherProc(stack.env(fleet), name="starting")
    stack.procs.append(starting)
    starting.spawn()
    wait_for(lambda: "listening on" in starting.logs(), 60, 0.02, what="the start past its preflight")
    out = starting.dump_stacks(wait=10)
    assert "most recent call first" in out and stacks.END in out  # its threads (maybe only the main one)
    starting.wait_ready(60)
    assert starting.alive()


def test_a_tasks_await_chain_names_the_call_it_waits_on() -> None:
    async def innermost() -> None:
        await asyncio.sleep(30)

    async def outer() -> None:
        await innermost()

    async def scenario() -> list[str]:
        task = asyncio.create_task(outer(), name="t")
        await asyncio.sleep(0)
        chain = stacks.await_chain(task)
        task.cancel()
        return chain

    chain = asyncio.run(scenario())
    assert [line.rsplit(" in ", 1)[1] for line in chain[:3]] == ["outer", "innermost", "sleep"]
    assert chain[-1].startswith("waiting on <")  # the future sleep awaits
