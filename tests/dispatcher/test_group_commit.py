"""Group commit (``dispatcher/loop/group_commit.py``) waits for no timer: a callback that finds no batch in flight
is committed at once, alone; those arriving while a batch runs go together in the next one. The batch
function here is a stand-in that records its batches and lets the test decide when a batch ends, so the
order of events is the test's, not the scheduler's (the store side is covered by test_handoff*.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dispatcher.db.attempts import Finish
from dispatcher.db.hot import STATEMENTS_DONE
from dispatcher.loop.group_commit import GroupCommit


class Spawner:
    """What the dispatcher's ``rt.spawn`` does for the group commit: run the batch as a task of its own, kept
    (an event loop holds tasks weakly) until done; ``tasks`` are those still running."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def __call__(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


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
        spawn = Spawner()

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
        await asyncio.gather(*spawn.tasks)

    asyncio.run(main())


class Failing(Batches):
    """Batches whose ``end_many`` raises (a bug in one item, not the store) for any batch holding ``bad``;
    the others say their statements are done (as the hot thread does before its COMMIT) unless told to hold
    the turn (``holding``), then wait for their release (the COMMIT)."""

    def __init__(self, bad: str) -> None:
        super().__init__()
        self.bad = bad
        self.holding: set[str] = set()

    async def end_many(self, items: list[dict[str, Any]]) -> list[Finish]:
        ids = [item["task_id"] for item in items]
        if self.bad in ids:
            self.seen.append(ids)
            raise ValueError(f"cannot end {self.bad}")
        done = STATEMENTS_DONE.get()
        assert done is not None
        if not self.holding & set(ids):
            done()
        return await super().end_many(items)


def test_two_batches_in_flight_and_a_failed_one_is_split_while_the_other_runs() -> None:
    """depth 2 (COMMIT_PIPELINE): a callback arriving while one batch commits starts the second at once; a
    third place is not taken (the rest wait together for the first free one). A batch that fails is ended
    again one item at a time while the other batch is still in flight: every callback is answered, only the
    bad one with the error."""

    async def main() -> None:
        batches = Failing(bad="x")
        spawn = Spawner()

        gc = GroupCommit(batches.end_many, spawn, depth=2)
        first = asyncio.create_task(gc.submit({"task_id": "a"}))
        while len(batches.seen) < 1:
            await asyncio.sleep(0)
        second = asyncio.create_task(gc.submit({"task_id": "b"}))
        while len(batches.seen) < 2:  # no waiting for the first batch: the pipeline's second place
            await asyncio.sleep(0)
        assert batches.seen == [["a"], ["b"]]
        later = {t: asyncio.create_task(gc.submit({"task_id": t})) for t in ("c", "x", "d")}
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(batches.seen) == 2  # two in flight at most
        batches.release[0].set()  # the first place frees: c, x, d go together, fail, and are split
        assert (await first).code == "applied"
        while len(batches.seen) < 4:
            await asyncio.sleep(0)
        assert batches.seen[2] == ["c", "x", "d"]
        assert batches.seen[3] == ["c"]  # one by one, while b's batch is still in flight
        assert not second.done()
        batches.release[2].set()
        while len(batches.seen) < 6:
            await asyncio.sleep(0)
        assert batches.seen[4:] == [["x"], ["d"]]
        batches.release[3].set()
        batches.release[1].set()
        assert (await second).code == "applied"
        assert (await later["c"]).code == "applied"
        assert (await later["d"]).code == "applied"
        with pytest.raises(ValueError, match="cannot end x"):
            await later["x"]
        await asyncio.gather(*spawn.tasks)

    asyncio.run(main())


def test_the_next_batch_waits_while_the_one_before_still_runs_its_statements() -> None:
    """depth 2: only one batch runs statements at a time; the next starts when the one before signals that
    its statements are done (its COMMIT going out), not before, and takes everything queued by then."""

    async def main() -> None:
        batches = Failing(bad="none")
        batches.holding = {"a"}
        spawn = Spawner()

        gc = GroupCommit(batches.end_many, spawn, depth=2)
        first = asyncio.create_task(gc.submit({"task_id": "a"}))
        while not batches.seen:
            await asyncio.sleep(0)
        later = [asyncio.create_task(gc.submit({"task_id": t})) for t in ("b", "c")]
        for _ in range(5):
            await asyncio.sleep(0)
        assert batches.seen == [["a"]]  # a still runs its statements: b and c wait
        batches.release[0].set()  # a ends without signalling (e.g. an error path): the turn passes on
        assert (await first).code == "applied"
        while len(batches.seen) < 2:
            await asyncio.sleep(0)
        assert batches.seen[1] == ["b", "c"]
        batches.release[1].set()
        assert [(await t).code for t in later] == ["applied"] * 2
        await asyncio.gather(*spawn.tasks)

    asyncio.run(main())


def test_a_late_signal_of_an_ended_batch_does_not_release_the_next_batchs_turn() -> None:
    """A batch whose statements-done signal comes only after it ended (a cancelled caller, a rerun) must not
    let a third batch start while the second still runs its statements."""

    async def main() -> None:
        batches = Failing(bad="none")
        batches.holding = {"a", "b"}
        late: list[Any] = []
        real = batches.end_many

        async def end_many(items: list[dict[str, Any]]) -> list[Finish]:
            late.append(STATEMENTS_DONE.get())
            return await real(items)

        spawn = Spawner()

        gc = GroupCommit(end_many, spawn, depth=2)
        first = asyncio.create_task(gc.submit({"task_id": "a"}))
        while not batches.seen:
            await asyncio.sleep(0)
        second = asyncio.create_task(gc.submit({"task_id": "b"}))
        batches.release[0].set()  # a ends without signalling; b takes the turn
        assert (await first).code == "applied"
        while len(batches.seen) < 2:
            await asyncio.sleep(0)
        third = asyncio.create_task(gc.submit({"task_id": "c"}))
        late[0]()  # a's signal, late
        for _ in range(5):
            await asyncio.sleep(0)
        assert batches.seen == [["a"], ["b"]]  # b still holds the turn: c waits
        late[1]()  # b's statements are done
        while len(batches.seen) < 3:
            await asyncio.sleep(0)
        assert batches.seen[2] == ["c"]
        batches.release[1].set()
        batches.release[2].set()
        assert [(await t).code for t in (second, third)] == ["applied"] * 2
        await asyncio.gather(*spawn.tasks)

    asyncio.run(main())
