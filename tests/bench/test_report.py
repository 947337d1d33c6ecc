"""The results table's targets: the column a reader sees and the check that colours it come from the same
number in ``TARGETS``, so the two cannot say different things."""

from __future__ import annotations

from bench.report import _at_least, _at_most
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
