"""The results table's targets: the column a reader sees and the check that colours it come from the same
number in ``TARGETS``, so the two cannot say different things."""

from __future__ import annotations

from bench.report import _at_least, _at_most, cpu_ceiling, cpu_per_job, python_loop_ms
from bench.workloads import TARGETS


def test_an_upper_bound_passes_at_its_target_and_fails_past_it() -> None:
    row = _at_most("p50", lambda runs: runs, "dispatch_p50_ms", "{:.2f}")
    limit = TARGETS["dispatch_p50_ms"]
    assert row.target == f"≤ {limit:g}"
    assert row.ok is not None and row.ok(limit) and not row.ok(limit + 0.01)


def test_a_lower_bound_passes_at_its_target_and_fails_below_it() -> None:
    row = _at_least("efficiency", lambda runs: runs, "efficiency", "{:.3f}")
    limit = TARGETS["efficiency"]
    assert row.target == f"≥ {limit:g}"
    assert row.ok is not None and row.ok(limit) and not row.ok(limit - 0.001)


def _run(**cpu: float) -> dict[str, float]:
    parts = {
        "consumer_cpu_ms_per_job": 2.0,
        "sim_cpu_ms_per_job": 1.0,
        "mariadb_cpu_ms_per_job": 0.5,
        "redis_cpu_ms_per_job": 0.25,
        "driver_cpu_ms_per_job": 0.25,
    }
    return parts | cpu | {"capacity": 64, "service": 0.1}


def test_the_cpu_ceiling_is_what_the_cores_pay_for_over_what_the_fleet_takes() -> None:
    # 4 ms per job: 2 cores pay for 500 jobs/s; 64 slots x 100 ms take 640 jobs/s.
    assert cpu_per_job(_run()) == 4.0
    assert cpu_ceiling(_run(), cores=2) == 500 / 640
    # Cheap enough: the machine is not the limit, the ceiling is 1.
    assert cpu_ceiling(_run(consumer_cpu_ms_per_job=0.1), cores=2) == 1.0


def test_the_cpu_ceiling_counts_the_cores_of_the_machine_that_ran_it() -> None:
    # GIVEN a run recorded on a 2-core machine, rendered on a machine with another number of cores
    # THEN the ceiling is that of 2 cores, whatever os.cpu_count() says here
    assert cpu_ceiling(_run(cores=2)) == 500 / 640
    assert cpu_ceiling(_run(cores=1)) == 250 / 640


def test_the_cpu_ceiling_is_blank_when_a_figure_is_missing() -> None:
    run = _run()
    del run["sim_cpu_ms_per_job"]
    assert cpu_per_job(run) is None and cpu_ceiling(run, cores=2) is None
    assert cpu_ceiling(None, cores=2) is None


def test_the_machine_speed_is_measured_in_milliseconds() -> None:
    ms = python_loop_ms(n=10_000, tries=2)
    assert 0 < ms < 10_000
