"""The in-process dispatcher (dispatcher/inproc.py) the scenarios run on: it must be the real daemon (real
HTTP both ways, real stores), its burst-mode wait must be able to fail, and it must clean up after itself so
the next test in this worker starts clean."""

from __future__ import annotations

import logging
import threading

import httpx
import pytest

from dispatcher.inproc import InProcessDispatcher
from dispatcher.testing import ProcessFailed
from tests.dispatcher.harness import DEFAULTS, push_jobs, received_per_task, reconcile, states


def test_burst_runs_every_job_over_real_http_and_ends_idle(any_stack):
    stack = any_stack
    # GIVEN jobs in two queues and a simulated fleet that calls back over HTTP
    fleet = stack.fleet(gpus=2, service_time="exp:0.01")
    ids = push_jobs(stack.rds, stack.queues[0], 30) + push_jobs(stack.rds, stack.queues[1], 30)
    # WHEN an in-process dispatcher runs until idle
    d = stack.dispatcher(fleet)
    d.wait_idle(timeout=60)
    # THEN each job ran once, by the GPUs (POSTed), and was ended by their callbacks
    assert states(stack.engine, ids) == {"finished": len(ids)}
    assert set(received_per_task(fleet.stats())) == set(ids)
    metrics = httpx.get(f"{d.url}/metrics", timeout=10).text
    assert 'gpuq_callbacks_total{code="200"}' in metrics
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)


def test_wait_idle_fails_while_an_attempt_is_in_flight(stack):
    # GIVEN a GPU that takes each job and never calls back (the lease is long)
    fleet = stack.fleet(gpus=1, faults=["lost_callback"])
    push_jobs(stack.rds, stack.queues[0], 1)
    d = stack.dispatcher(fleet, TASK_TIMEOUT_SECONDS="600")
    # THEN waiting for idle times out and says what is still busy
    with pytest.raises(TimeoutError, match="processing or retrying"):
        d.wait_idle(timeout=2)


def test_a_bad_setting_refuses_to_start(stack):
    d = InProcessDispatcher(DEFAULTS | stack.env(None, TASK_TIMEOUT_SECONDS="-1"), name="bad")
    with pytest.raises(ProcessFailed, match="TASK_TIMEOUT_SECONDS"):
        d.start()
    assert not d.alive()


def test_two_dispatchers_keep_their_own_logs_and_stop_cleanly(stack):
    fleet = stack.fleet(gpus=1, service_time="0")
    threads = set(threading.enumerate())
    level = logging.getLogger("gpuq").level
    a = stack.dispatcher(fleet, name="a")
    b = stack.dispatcher(fleet, name="b")
    a_id, b_id = a.env["DISPATCHER_ID"], b.env["DISPATCHER_ID"]
    # WHEN both are told to stop as SIGTERM would
    assert a.term() == 0
    assert b.term() == 0
    # THEN each log holds its own start and graceful stop, not the other's
    assert "dispatcher stopped" in a.logs()
    assert "dispatcher stopped" in b.logs()
    assert a_id in a.logs() and b_id not in a.logs()
    assert b_id in b.logs() and a_id not in b.logs()
    # AND no thread of theirs is left behind
    assert not a.alive() and not b.alive()
    left = {t.name for t in set(threading.enumerate()) - threads if t.is_alive()}
    assert not any(name.startswith("gpuq") for name in left), left
    # AND the test process's loggers are as they were (no later test sees records because of them)
    assert logging.getLogger("gpuq").level == level
