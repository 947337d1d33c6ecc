"""The soak (``make soak``, bench/soak.py) in miniature: ~1,000 jobs arriving over ~15 s through two
dispatchers while a fault comes every 2 s (a GPU answering 500s, lost callbacks, kill -9 of one dispatcher
and its restart, a GPU down and back). Nothing lost, nothing run beyond its attempts, no slot drift, and no
GPU given more jobs than slots: the same verdict as ``make soak`` (bench/soak_audit.py ``problems``; that it
catches an oversubscription is tested in tests/faults/test_soak_audit.py)."""

from __future__ import annotations

import pytest

from bench.soak import SoakConfig, run_soak
from bench.soak_audit import problems

pytestmark = pytest.mark.slow  # a soak with faults


def test_short_soak(database_url, redis_url, tmp_path):
    report = run_soak(
        SoakConfig(
            jobs=1000,
            rate=70.0,
            fault_every=2.0,
            gpus=4,
            redis_url=redis_url,
            database_url=database_url,
            timeout=100,
            log_dir=tmp_path,
        ),
        progress=False,
    )
    assert report["faults"].get("kill_dispatcher", 0) >= 1, report
    assert problems(report) == [], report  # lost, duplicates, drift, dead letters, any oversubscription
    assert report["requests_over_slots"] == 0, report
    assert report["lost"] == 0, report
    assert report["duplicates_beyond_attempts"] == 0, report
    assert report["same_attempt_delivered_twice"] == 0, report
    assert report["slot_drift_end"] == 0 and report["slot_drift_samples"] == 0, report
    assert report["busy_slots_end"] == 0 and report["left_in_redis"] == 0, report
    assert report["dead_letters"] == 0, report
    assert report["states"] == {"finished": 1000}, report
