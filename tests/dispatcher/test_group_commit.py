"""Group commit (``dispatcher/loop/group_commit.py``) waits for no timer: a callback that finds no batch in flight
is committed at once, alone; those arriving while a batch runs go together in the next one. The batch
function here is a stand-in that records its batches and lets the test decide when a batch ends, so the
order of events is the test's, not the scheduler's (the store side is covered by test_handoff*.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from dispatcher.db.attempts import Finish
from dispatcher.loop.group_commit import GroupCommit


class Batches:
    def __init__(self) -> None:
        self.seen: list[list[str]] = []
        self.release: list[asyncio.Event] = []

    async def end_many(self, items: list[dict[str, Any]]) -> list[Finish]:
        self.seen.append([item["task_id"] for item in items])
        gate = asyncio.Event()
        self.release.append(gate)
        await gate.wait()
        return [Finish("applied", "finished", True) for _ in items]


def test_a_lone_callback_commits_at_once_and_callbacks_during_a_batch_share_the_next() -> None:
    async def main() -> None:
        batches = Batches()
        tasks: set[asyncio.Task[None]] = set()

        def spawn(coro: Any) -> None:
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        gc = GroupCommit(batches.end_many, spawn)
        first = asyncio.create_task(gc.submit({"task_id": "a"}))
        while not batches.seen:  # no timer: the batch starts as soon as the loop turns
            await asyncio.sleep(0)
        assert batches.seen == [["a"]]
        later = [asyncio.create_task(gc.submit({"task_id": t})) for t in ("b", "c", "d")]
        for _ in range(5):
            await asyncio.sleep(0)
        assert batches.seen == [["a"]]  # one batch in flight at a time
        batches.release[0].set()
        assert (await first).code == "applied"
        while len(batches.seen) < 2:
            await asyncio.sleep(0)
        assert batches.seen[1] == ["b", "c", "d"]  # all that arrived during the first, together
        batches.release[1].set()
        assert [(await t).code for t in later] == ["applied"] * 3
        await asyncio.gather(*tasks)

    asyncio.run(main())
