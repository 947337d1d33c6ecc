"""The per-pool ready buffer (dispatcher/loop/ready.py): bounded, oldest first, filled only for pools in demand."""

from __future__ import annotations

from dispatcher.loop.ready import (
    BY_HANDOFF,
    BY_LOOP,
    BY_STANDBY,
    DEMAND_SECONDS,
    SLOTS_CAP,
    SLOTS_CAP_FACTOR,
    Ready,
    ReadyBuffer,
)
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
    assert b.lapsed(now=DEMAND_SECONDS) == ([], [])
    park, back = b.lapsed(now=DEMAND_SECONDS + 0.1)
    assert len(park) == 2 and back == []  # its slots were freed here: parked, served first anywhere
    assert len(b) == 0
    assert b.deficit(now=DEMAND_SECONDS + 0.1) == {}


def test_a_primed_pools_jobs_go_back_to_their_queue_if_no_slot_frees() -> None:
    # GIVEN a pool no slot of which was seen freed here, which a pass of ours just filled
    b = ReadyBuffer(3)
    assert b.deficit(now=0.0) == {}
    b.prime(["a"], now=0.0)
    # THEN its buffer is filled at once, as for a pool whose slots turn over
    assert b.deficit(now=0.0) == {"a": 3}
    assert b.add(_ready("a", 3), now=0.5) == []
    # WHEN no slot of it frees within DEMAND_SECONDS (long jobs)
    assert b.lapsed(now=DEMAND_SECONDS) == ([], [])
    park, back = b.lapsed(now=DEMAND_SECONDS + 0.1)
    # THEN its jobs go back to the head of the lists they were taken from, in order, not to the parked lists
    assert park == [] and [r.job.task_id for r in back] == ["a-0", "a-1", "a-2"]
    assert len(b) == 0 and b.deficit(now=DEMAND_SECONDS + 0.1) == {}


def test_a_primed_pool_whose_slots_then_turn_over_here_parks_as_any_pool_in_demand() -> None:
    b = ReadyBuffer(2)
    b.prime(["a"], now=0.0)
    assert b.add(_ready("a", 2), now=0.0) == []
    b.demand(["a"], now=1.0)  # a slot of it freed here after the priming
    assert b.lapsed(now=1.0 + DEMAND_SECONDS) == ([], [])  # in demand from the freed slot on
    park, back = b.lapsed(now=1.1 + DEMAND_SECONDS)
    assert len(park) == 2 and back == []
    b.prime(["a"], now=5.0)  # primed again after the freed slot: its jobs go back if none frees
    assert b.add(_ready("a", 1), now=5.0) == []
    assert [len(x) for x in b.lapsed(now=5.1 + DEMAND_SECONDS)] == [0, 1]


def test_size_zero_is_never_primed() -> None:
    b = ReadyBuffer(0)
    b.prime(["a"], now=0.0)
    assert b.deficit(now=0.0) == {}
    assert len(b.add(_ready("a", 1), now=0.0)) == 1


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
    assert [r.job.task_id for r in b.lapsed(now=0.0)[0]] == ["late-0", "late-1"]
    assert b.elements() == [] and b.lapsed(now=0.0) == ([], [])


def test_jobs_popped_are_lent_until_they_come_back_or_are_released() -> None:
    b = ReadyBuffer(4)
    b.demand(["a", "b"], now=0.0)
    assert b.add(_ready("a", 3) + _ready("b", 2), now=0.0) == []
    # a hand-off whose ends free slots of "a" only takes candidates of "a"
    lent = b.pop_each(9, {"a": 2})
    assert [r.job.task_id for r in lent] == ["a-0", "a-1"]
    assert (b.lent("a"), b.lent("a", BY_HANDOFF), b.lent("a", BY_LOOP), b.lent("b")) == (2, 2, 0, 0)
    b.put_back(lent[1:])  # one back, the other decided (placed)
    b.release(lent)
    b.release(lent)  # idempotent: a ``finally`` releases whatever it popped
    assert b.lent("a") == 0
    assert [r.job.task_id for r in b.pop("a", 1)] == ["a-1"]  # the one given back goes first


def test_a_hand_off_takes_no_candidates_of_a_pool_whose_jobs_a_pass_holds() -> None:
    b = ReadyBuffer(4)
    b.demand(["a", "b"], now=0.0)
    assert b.add(_ready("a", 2) + _ready("b", 2), now=0.0) == []
    placing = b.pop("a", 1)  # a pass placing a-0 on a slot of "a" it counted
    assert b.lent("a", BY_LOOP) == 1
    # a hand-off whose pools are unknown: every pool, but not "a" (a-1 would race a-0 for that slot)
    assert [r.job.task_id for r in b.pop_each(1)] == ["b-0"]
    b.release(placing)
    assert [r.job.task_id for r in b.pop_each(1)] == ["a-1", "b-1"]


def test_jobs_out_with_a_standby_bind_count_as_held_and_keep_hand_offs_away() -> None:
    b = ReadyBuffer(3)
    b.demand(["a"], now=0.0)
    b.add(_ready("a", 3), now=0.0)
    out = b.pop("a", 3, BY_STANDBY)
    # not refilled meanwhile: they mostly come back, and the youngest would then be pushed out
    assert b.deficit(now=0.0) == {}
    assert b.held_outside_a_pass("a")
    b.add(_ready("b", 0), now=0.0)
    assert b.pop_each(9) == []  # a hand-off would start a younger job before them
    b.release(out[:1])  # one bound
    b.put_back(out[1:])
    assert b.deficit(now=0.0) == {"a": 1}
    assert not b.held_outside_a_pass("a")
    assert [r.job.task_id for r in b.pop_each(9)] == ["a-1", "a-2"]


def test_a_pool_of_more_slots_than_the_buffer_holds_one_job_per_slot_up_to_four_times_it() -> None:
    # GIVEN HANDOFF_BUFFER 3 and pools of 2, 5 and 40 slots (40 > 4 x 3), all in demand
    b = ReadyBuffer(3)
    b.sized({"small": 2, "mid": 5, "big": 40})
    b.demand(["small", "mid", "big"], now=0.0)
    # THEN each buffer holds HANDOFF_BUFFER jobs, or one per slot when more, at most SLOTS_CAP_FACTOR times
    assert [b.cap(p) for p in ("small", "mid", "big", "unknown")] == [3, 5, 3 * SLOTS_CAP_FACTOR, 3]
    assert b.deficit(now=0.0) == {"small": 3, "mid": 5, "big": 12}
    assert len(b.add(_ready("mid", 7), now=0.0)) == 2  # the rest is parked
    # ... a pass that gives jobs back pushes out the youngest past that, not past HANDOFF_BUFFER
    popped = b.pop("mid", 5)
    b.put_back(popped)
    assert [r.job.task_id for r in b.pop_each(9) if r.pool == "mid"] == [f"mid-{i}" for i in range(5)]
    # ... and a big pool at most SLOTS_CAP, whatever HANDOFF_BUFFER x SLOTS_CAP_FACTOR
    huge = ReadyBuffer(64)
    huge.sized({"huge": 1000})
    assert huge.cap("huge") == SLOTS_CAP


def test_a_pool_that_loses_slots_keeps_its_jobs_in_order_and_refills_once_used_down_to_its_size() -> None:
    # GIVEN a 5-slot pool's full buffer (HANDOFF_BUFFER 3)
    b = ReadyBuffer(3)
    b.sized({"mid": 5})
    b.demand(["mid"], now=0.0)
    assert b.add(_ready("mid", 5), now=0.0) == []
    # WHEN it loses 3 slots (a GPU drained)
    b.sized({"mid": 2})
    # THEN it takes no more, and keeps what it holds: a hand-off's jobs given back push none out (parked,
    # they would start after younger jobs a pass takes meanwhile)
    assert (
        b.cap("mid") == 3 and b.deficit(now=0.0) == {} and len(b.add(_ready("x", 0) + _ready("mid", 1))) == 1
    )
    b.put_back(b.pop("mid", 2, BY_HANDOFF))
    assert b.count("mid") == 5 and b.lapsed(now=0.0) == ([], [])
    # ... until hand-offs use it down to its size: then it is refilled as any
    b.release(b.pop("mid", 2))
    assert b.deficit(now=0.0) == {}
    b.release(b.pop("mid", 1))
    assert b.deficit(now=0.0) == {"mid": 1}
    assert [r.job.task_id for r in b.pop_each(9)] == ["mid-3", "mid-4"]  # oldest first throughout


def test_no_buffer_stays_no_buffer_whatever_the_pools_slots() -> None:
    b = ReadyBuffer(0)
    b.sized({"a": 64})
    b.demand(["a"], now=0.0)
    assert b.cap("a") == 0 and b.deficit(now=0.0) == {} and len(b.add(_ready("a", 1), now=0.0)) == 1
