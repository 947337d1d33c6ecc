"""How the benchmark reads the simulator's job log: slot occupancy rebuilt per GPU, dispatch latency and
slot turnaround as RESULTS.md defines them, makespan and efficiency."""

from __future__ import annotations

from typing import Any

import pytest

from bench.analysis import measure, percentile, slot_samples
from bench.workloads import Workload


def job(
    task_id: str, gpu: str, received: float, freed: float | None, *, sync: bool = False
) -> dict[str, Any]:
    record: dict[str, Any] = {"task_id": task_id, "gpu": gpu, "received_mono": received}
    record["answered_mono" if sync else "callback_sent_mono"] = freed
    record["callback_sent_mono" if sync else "answered_mono"] = None
    return record


def test_a_waiting_job_counts_from_the_slot_freed_and_a_late_job_from_its_enqueue() -> None:
    # GIVEN one GPU with one slot: a runs 0-1.0; b waited (enqueued 0.5) and arrived 2 ms after the slot
    # freed; c was enqueued at 3.0 when the slot had long been free, and arrived 1 ms later
    jobs = [job("a", "g0", 0.001, 1.0), job("b", "g0", 1.002, 2.0), job("c", "g0", 3.001, 4.0)]
    enqueued = {"a": 0.0, "b": 0.5, "c": 3.0}
    got = slot_samples(jobs, enqueued, slots=1)
    assert got.latencies == pytest.approx([0.001, 0.002, 0.001])
    assert got.turnarounds == pytest.approx([0.002])  # only b was waiting when a slot freed
    assert got.anomalies == 0


def test_a_job_takes_the_slot_free_the_longest_and_sync_answers_free_slots_too() -> None:
    # GIVEN a GPU with two slots, both busy, freed at 1.0 and 1.5 (sync mode: the answer frees the slot)
    jobs = [
        job("a", "g0", 0.0, 1.5, sync=True),
        job("b", "g0", 0.0, 1.0, sync=True),
        job("c", "g0", 1.01, 3.0, sync=True),
        job("d", "g0", 1.52, 3.0, sync=True),
    ]
    enqueued = dict.fromkeys("abcd", 0.0)
    got = slot_samples(jobs, enqueued, slots=2)
    assert got.turnarounds == pytest.approx([0.01, 0.02])
    assert got.anomalies == 0
    assert got.recorded == []  # sync mode: no callback to split the turnaround at


def test_a_job_arriving_while_every_slot_is_held_is_an_anomaly() -> None:
    jobs = [job("a", "g0", 0.0, 1.0), job("b", "g0", 0.5, 1.0)]
    assert slot_samples(jobs, {"a": 0.0, "b": 0.0}, slots=1).anomalies == 1


def test_a_turnaround_splits_where_the_dispatcher_answered_the_callback() -> None:
    a = job("a", "g0", 0.0, 1.0) | {"callback_answered_mono": 1.003}
    b = job("b", "g0", 1.010, 2.0)
    got = slot_samples([a, b], {"a": 0.0, "b": 0.5}, slots=1)
    assert got.turnarounds == pytest.approx([0.010])
    assert got.recorded == pytest.approx([0.003])
    assert got.pickup == pytest.approx([0.007])


def test_a_standby_sent_before_the_callback_was_answered_has_a_negative_part_2_and_counts_as_sent_first() -> (
    None
):
    # GIVEN one slot: b (a standby) reached the GPU 1 ms after a's callback went out, 2 ms before its answer
    w = Workload("efficiency", gpus=1, slots=1, service=1.0, jobs=3)
    a = job("a", "g0", 0.0, 1.0) | {"callback_answered_mono": 1.003}
    b = job("b", "g0", 1.001, 2.0) | {"callback_answered_mono": 2.002}
    c = job("c", "g0", 2.010, 3.0)  # c went out after b's callback was answered
    result = measure(w, [a, b, c], {"a": 0.0, "b": 0.5, "c": 0.5}, started=0.0)
    split = result["turnaround_split_ms"]["then_next_request"]
    assert split["p50"] == pytest.approx((-2 + 8) / 2, abs=1e-6)
    assert result["sent_before_answer_share"] == 0.5


def test_makespan_runs_from_the_first_enqueue_to_the_last_slot_freed() -> None:
    # GIVEN 4 jobs of 100 ms on 2 GPUs x 1 slot: ideally 0.2 s; they took 0.25 s from the first enqueue
    w = Workload("efficiency", gpus=2, slots=1, service=0.1, jobs=4)
    jobs = [
        job("a", "g0", 10.01, 10.11),
        job("b", "g1", 10.01, 10.11),
        job("c", "g0", 10.12, 10.22),
        job("d", "g1", 10.15, 10.25),
        job("a", "g1", 10.3, 10.4),  # a second run of a: a duplicate, not a completion of the workload
    ]
    result = measure(w, jobs[:4], dict.fromkeys("abcd", 10.0), started=10.0)
    assert result["makespan_s"] == pytest.approx(0.25)
    assert result["efficiency"] == pytest.approx(0.8)
    assert result["jobs_per_s"] == pytest.approx(16)
    assert result["duplicates"] == 0
    again = measure(w, jobs, dict.fromkeys("abcd", 10.0), started=10.0)
    assert (again["duplicates"], again["completed"]) == (1, 4)


def test_percentile_interpolates_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile([], 50) != percentile([], 50)  # NaN


def test_the_settled_turnaround_leaves_out_slots_freed_in_the_first_second() -> None:
    # GIVEN one GPU, one slot, clock started at 10.0: a slot freed at 10.5 took 50 ms to refill (during the
    # driver's enqueue burst), the ones freed at 11.2 and 12.0 took 2 and 4 ms
    w = Workload("efficiency", gpus=1, slots=1, service=0.1, jobs=4)
    jobs = [
        job("a", "g0", 10.0, 10.5),
        job("b", "g0", 10.55, 11.2),
        job("c", "g0", 11.202, 12.0),
        job("d", "g0", 12.004, 12.1),
    ]
    result = measure(w, jobs, dict.fromkeys("abcd", 10.0), started=10.0)
    assert result["turnaround_ms"]["n"] == 3
    assert result["turnaround_settled_ms"]["n"] == 2
    assert result["turnaround_settled_ms"]["max"] == pytest.approx(4.0)
