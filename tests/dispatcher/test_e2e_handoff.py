"""Slot hand-off between real processes: three dispatchers share one fleet and every GPU calls back to the
first one, which refills the freed slots itself; the others are only woken when it had nothing to hand off."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.dispatcher.harness import free_port, push_jobs, received_per_task, reconcile, wait_final


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.mark.slow  # three dispatchers, a long backlog
def test_three_dispatchers_with_every_callback_to_one(stack):
    # GIVEN three dispatchers sharing 2 GPUs x 4 slots; the GPUs call back to the first one only
    fleet = stack.fleet(gpus=2, service_time="exp:0.01")
    port = free_port()
    callback = f"http://127.0.0.1:{port}/callback"
    first = stack.dispatcher(fleet, name="d0", CALLBACK_PORT=str(port), CALLBACK_URL=callback)
    others = [stack.dispatcher(fleet, name=f"d{i}", CALLBACK_URL=callback) for i in (1, 2)]
    # WHEN a backlog arrives
    ids = push_jobs(stack.rds, stack.queues[0], 600)
    # THEN every job runs once, no GPU gets a fifth job, and the first one refilled slots in its callbacks'
    # own transactions (its buffer is fed because it sees the slots freed; the others' are not)
    wait_final(stack.engine, ids, timeout=120)
    stats = fleet.stats()
    assert stats["totals"]["oversubscriptions"] == 0
    assert max(received_per_task(stats).values()) == 1
    assert _metric(first.url, "gpuq_handoffs_total") > 0
    assert all(_metric(d.url, "gpuq_handoffs_total") == 0 for d in others)
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)
