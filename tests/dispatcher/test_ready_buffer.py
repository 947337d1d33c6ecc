"""The per-pool ready buffer (dispatcher/loop/ready.py): bounded, oldest first, filled only for pools in demand."""

from __future__ import annotations

from dispatcher.loop.ready import DEMAND_SECONDS, Ready, ReadyBuffer
from tests.dispatcher.helpers import job


def _ready(pool: str, n: int) -> list[Ready]:
    return [Ready(job(task_id=f"{pool}-{i}"), pool, f"el-{pool}-{i}") for i in range(n)]


def test_bounded_oldest_first_and_put_back_in_front() -> None:
    b = ReadyBuffer(3)
    b.demand(["a"], now=0.0)
    assert b.deficit(now=0.0) == {"a": 3}
    over = b.add(_ready("a", 5), now=0.0)
    assert [r.job.task_id for r in over] == ["a-3", "a-4"]  # the bound: the rest is parked
    assert b.deficit(now=0.0) == {}
    first = b.pop("a", 2)
    assert [r.job.task_id for r in first] == ["a-0", "a-1"]
    b.add(_ready("x", 0), now=0.0)
    b.put_back(first)  # not placed: ahead of what came after them
    assert [r.job.task_id for r in b.pop_each(9)] == ["a-0", "a-1", "a-2"]


def test_only_pools_in_demand_are_filled_and_lapsed_ones_are_given_up() -> None:
    b = ReadyBuffer(2)
    assert b.add(_ready("a", 1), now=0.0) != []  # nobody freed a slot of "a" here: not buffered
    b.demand(["a"], now=0.0)
    assert b.add(_ready("a", 2), now=1.0) == []
    assert b.lapsed(now=DEMAND_SECONDS) == []
    gone = b.lapsed(now=DEMAND_SECONDS + 0.1)
    assert len(gone) == 2
    assert len(b) == 0
    assert b.deficit(now=DEMAND_SECONDS + 0.1) == {}


def test_size_zero_turns_it_off() -> None:
    b = ReadyBuffer(0)
    b.demand(["a"], now=0.0)
    assert b.deficit(now=0.0) == {}
    assert len(b.add(_ready("a", 1), now=0.0)) == 1


def test_a_hand_off_returning_its_candidates_never_grows_the_buffer_past_its_size() -> None:
    # GIVEN a full buffer of 2 whose jobs a hand-off takes as candidates (its transaction in flight)
    b = ReadyBuffer(2)
    b.demand(["a"], now=0.0)
    assert b.add(_ready("a", 2), now=0.0) == []
    lent = b.pop_each(2)
    # WHILE the loop refills the buffer the hand-off emptied
    assert b.deficit(now=0.0) == {"a": 2}
    assert b.add([Ready(job(task_id=f"late-{i}"), "a", f"el-late-{i}") for i in range(2)], now=0.0) == []
    # WHEN the hand-off placed none of them and gives them back
    b.put_back(lent)
    # THEN they go first, the buffer holds its size (it held 4), and the youngest leave it to be parked
    assert b.count("a") == 2 and len(b) == 2
    assert [r.job.task_id for r in b.pop("a", 9)] == ["a-0", "a-1"]
    assert sorted(b.elements()) == ["el-late-0", "el-late-1"]  # still known until the pass parks them
    assert [r.job.task_id for r in b.lapsed(now=0.0)] == ["late-0", "late-1"]
    assert b.elements() == [] and b.lapsed(now=0.0) == []
