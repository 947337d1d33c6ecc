"""Cancel that reaches the GPU (SPEC §4): a cancelled running task ends at once for the user, its GPU is
asked to stop (``POST <GPU url>/cancel``), and its slot is freed only when the GPU confirms, a final report
for the attempt comes, or the lease runs out, so the GPU never runs more jobs than slots."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from dispatcher.db.attempts import Backoff, cancel_task
from dispatcher.db.engine import transaction, utcnow
from dispatcher.gpus.tokens import make_token
from producer.job import Job
from producer.keys import Keys
from tests.dispatcher.harness import BEARER, SECRET, push_jobs, reconcile, states, wait_final
from tests.dispatcher.helpers import wait_for


def _holders(engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.exec_driver_sql("SELECT task_id FROM slots WHERE task_id IS NOT NULL").scalars())


def _wait_running(stack, fleet, task_id: str) -> None:
    """Until the job holds its slot and its GPU has it (the request may still be on its way after the claim)."""
    wait_for(lambda: _holders(stack.engine) == [task_id], 20, 0.02, what="the job placed")
    fleet.wait_until(lambda s: s["totals"]["in_flight"] == 1, timeout=20)


def _one_long_job(stack, **settings: str):
    """One GPU running one 60 s job: (fleet, dispatcher, task id)."""
    fleet = stack.fleet(gpus=1, service_time="60")
    d = stack.dispatcher(fleet, **settings)
    [victim] = push_jobs(stack.rds, stack.queues[0], 1)
    _wait_running(stack, fleet, victim)
    return fleet, d, victim


def _cancel_as_cli(stack, task_id: str) -> bool:
    """What ``gpuq task cancel`` does: the store function, then the wake-up for the dispatchers. False when
    the task finished just before."""
    fin = transaction(stack.engine, cancel_task, task_id=task_id, now=utcnow(), backoff=Backoff())
    if fin.state == "finished":
        return False
    assert (fin.code, fin.state, fin.freed, fin.held) == ("applied", "cancelled", False, True)
    stack.rds.publish(Keys(stack.prefix).wake, "cancel")
    return True


def _cancel_by_api(d, task_id: str) -> bool:
    res = httpx.post(f"{d.url}/tasks/{task_id}/cancel", timeout=10)
    if res.status_code == 409 and "finished" in res.text:  # it finished just before
        return False
    assert res.status_code == 200, res.text
    assert res.json() == {"task_id": task_id, "state": "cancelled", "applied": True, "slot_held": True}
    return True


@pytest.mark.slow  # 12 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_cancels_under_load_never_oversubscribe_and_free_slots_on_confirmation(stack):
    # GIVEN two GPUs of 4 slots, every slot busy with long jobs and a backlog waiting behind them
    fleet = stack.fleet(gpus=2, service_time="uniform:1,3", faults=["heartbeat:0.1"])
    d = stack.dispatcher(fleet)
    ids = push_jobs(stack.rds, stack.queues[0], 40)
    cancelled: list[str] = []
    # WHEN running tasks are cancelled again and again, half by the CLI's path, half by the HTTP API
    for round_ in range(6):
        wait_for(
            lambda: len(set(_holders(stack.engine)) - set(cancelled)) >= 2, 30, 0.01, what="jobs running"
        )
        victims = [t for t in _holders(stack.engine) if t not in cancelled][:2]
        for victim in victims:
            if _cancel_as_cli(stack, victim) if round_ % 2 else _cancel_by_api(d, victim):
                cancelled.append(victim)
    # THEN each is cancelled at once for the user
    assert states(stack.engine, cancelled) == {"cancelled": len(cancelled)}
    # and every other job still finishes, with no GPU ever over its slots (the GPU counts this itself)
    wait_final(stack.engine, ids, final=("finished", "cancelled"), timeout=90)
    assert states(stack.engine, ids)["cancelled"] == len(cancelled)
    wait_for(lambda: not _holders(stack.engine), 30, 0.05, what="every slot free")
    # the GPUs count a cancel when it reaches them: one still on its way (a job ending just then frees its
    # slot by its callback, so free slots do not prove it arrived) was missed when read at once (11 of 12).
    # A standby cancelled before it was sent never reaches its GPU, nor does its cancel (that cancel, sent
    # as the standby was about to go, let it land on a slot given away: 679bb46)
    received = {job["task_id"] for job in fleet.stats(jobs=True)["jobs"]}
    sent = [t for t in cancelled if t in received]
    confirmed = ("stopped", "not_running")
    fleet.wait_until(
        lambda s: sum(s["totals"]["cancels"].get(k, 0) for k in confirmed) >= len(sent), timeout=30
    )
    stats = fleet.stats(jobs=False)
    for name, gpu in stats["gpus"].items():
        assert gpu["oversubscriptions"] == 0, (name, gpu)
        assert gpu["max_in_flight"] <= 4, (name, gpu)
    # the GPUs were asked to stop each cancelled job (stopped, or finished just before the cancel came)
    cancels = stats["totals"]["cancels"]
    assert cancels.get("stopped", 0) + cancels.get("not_running", 0) >= len(sent), cancels
    assert cancels.get("stopped", 0) >= 1, cancels
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)


@pytest.mark.slow  # 5 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_slot_stays_held_until_the_gpu_confirms_the_cancel(stack):
    # GIVEN one GPU running one long job
    fleet, d, victim = _one_long_job(stack)
    # WHEN its GPU cannot take the cancel (down: 503) and the task is cancelled through the API
    fleet.configure(faults=["down"])
    res = httpx.post(f"{d.url}/tasks/{victim}/cancel", timeout=10)
    assert res.json()["slot_held"] is True, res.json()
    # and a repeated cancel still says the slot is held (it said false: review of issue 16)
    again = httpx.post(f"{d.url}/tasks/{victim}/cancel", timeout=10).json()
    assert (again["applied"], again["slot_held"]) == (False, True), again
    # THEN the task is cancelled at once, but while the cancel fails and is retried the slot stays held
    assert states(stack.engine, [victim]) == {"cancelled": 1}
    fleet.wait_until(lambda s: s["totals"]["answers"].get("503", 0) >= 2, timeout=20)
    assert _holders(stack.engine) == [victim]
    [gpu] = httpx.get(f"{d.url}/gpus", timeout=10).json()
    assert gpu["busy"] == 1
    # and a heartbeat for the cancelled attempt is refused (409) without renewing the lease
    token = make_token(SECRET.encode(), victim, 1)
    beat = d.post_callback({"task_id": victim, "status": "running"}, token)
    assert beat.status_code == 409
    assert _holders(stack.engine) == [victim]
    # WHEN the GPU is back, the next try of the cancel reaches it: the job stops and the slot is freed
    fleet.configure(faults=[])
    wait_for(lambda: not _holders(stack.engine), 45, 0.05, what="slot freed on confirmation")
    assert fleet.stats(jobs=False)["totals"]["cancels"] == {"stopped": 1}
    assert fleet.stats(jobs=False)["totals"]["in_flight"] == 0
    again = httpx.post(f"{d.url}/tasks/{victim}/cancel", timeout=10).json()
    assert (again["applied"], again["slot_held"]) == (False, False), again
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, [victim])


def test_a_final_callback_for_the_cancelled_attempt_confirms_and_frees(stack):
    # GIVEN a GPU that is down for the cancel, running one job
    fleet, d, victim = _one_long_job(stack)
    fleet.configure(faults=["down"])
    _cancel_as_cli(stack, victim)
    fleet.wait_until(lambda s: s["totals"]["answers"].get("503", 0) >= 1, timeout=20)
    assert _holders(stack.engine) == [victim]
    # WHEN the GPU reports the attempt over (it stopped it, or it ended) with a final callback
    token = make_token(SECRET.encode(), victim, 1)
    res = d.post_callback({"task_id": victim, "status": "failed", "error": "stopped"}, token)
    # THEN it is answered 409 (the attempt is no longer current), the task stays cancelled, the slot is free
    assert res.status_code == 409, res.text
    assert "cancelled" in res.json()["detail"]
    assert not _holders(stack.engine)
    assert states(stack.engine, [victim]) == {"cancelled": 1}


@pytest.mark.slow  # 6 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_a_cancel_never_confirmed_is_settled_by_the_lease(stack):
    # GIVEN a short lease and a GPU that goes down after taking the job
    fleet, d, victim = _one_long_job(stack, TASK_TIMEOUT_SECONDS="3")
    fleet.configure(faults=["down"])
    # WHEN the task is cancelled and the GPU never answers the cancel
    assert httpx.post(f"{d.url}/tasks/{victim}/cancel", timeout=10).status_code == 200
    assert _holders(stack.engine) == [victim]
    # THEN the lease expiry frees the slot, and the task stays cancelled (not retried)
    wait_for(lambda: not _holders(stack.engine), 30, 0.1, what="slot freed by the lease")
    assert states(stack.engine, [victim]) == {"cancelled": 1}
    with stack.engine.connect() as conn:
        outcomes = conn.exec_driver_sql(
            "SELECT outcome FROM attempts WHERE task_id = %s", (victim,)
        ).scalars()
        assert list(outcomes) == ["cancelled"]


@pytest.mark.slow  # 3 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_cancel_answers(stack):
    # GIVEN a dispatcher and a finished task
    fleet = stack.fleet(gpus=1, service_time="0")
    d = stack.dispatcher(fleet)
    [done] = push_jobs(stack.rds, stack.queues[0], 1)
    wait_final(stack.engine, [done])
    # THEN cancelling it is 409
    res = httpx.post(f"{d.url}/tasks/{done}/cancel", timeout=10)
    assert res.status_code == 409 and "finished" in res.json()["detail"]
    # and an id neither recorded nor waiting is 404, and leaves no mark: a job submitted later under it runs
    res = httpx.post(f"{d.url}/tasks/not-yet-here/cancel", timeout=10)
    assert res.status_code == 404 and "not-yet-here" in res.json()["detail"]
    queue = stack.queues[0]
    stack.rds.rpush(queue, Job(task_id="not-yet-here", type="x", queue=queue).to_redis())
    wait_final(stack.engine, ["not-yet-here"])
    assert httpx.get(f"{d.url}/tasks/not-yet-here", timeout=10).json()["state"] == "finished"
    # a task waiting for its time is cancelled (200); a repeated cancel is 200 applied false
    later = Job(task_id="later", type="x", queue=queue, not_before=datetime.now(UTC) + timedelta(hours=1))
    stack.rds.rpush(queue, later.to_redis())
    wait_for(lambda: httpx.get(f"{d.url}/tasks/later", timeout=10).json()["state"] == "scheduled", 20, 0.05)
    res = httpx.post(f"{d.url}/tasks/later/cancel", timeout=10)
    assert (res.status_code, res.json()["applied"]) == (200, True)
    res = httpx.post(f"{d.url}/tasks/later/cancel", timeout=10)
    assert (res.status_code, res.json()["applied"]) == (200, False)


@pytest.mark.slow
def test_a_cancel_left_by_a_killed_dispatcher_is_sent_by_another(stack):
    # GIVEN two dispatchers sharing one GPU; d1 sent a long job to it and is killed (kill -9)
    fleet = stack.fleet(gpus=1, service_time="120")
    q1, q2 = stack.queues
    d1 = stack.process(fleet, name="d1", TASK_QUEUES=q1, TASK_TIMEOUT_SECONDS="300")
    d2 = stack.process(fleet, name="d2", TASK_QUEUES=q2, TASK_TIMEOUT_SECONDS="300")
    [victim] = push_jobs(stack.rds, q1, 1)
    _wait_running(stack, fleet, victim)
    d1.kill()
    # WHEN the task is cancelled through d2
    res = httpx.post(f"{d2.url}/tasks/{victim}/cancel", timeout=10)
    assert res.json()["slot_held"] is True
    # THEN once d1's heartbeat is gone d2 asks the GPU to stop, and the slot is freed by that answer
    # (the GPU counts the stop; a lease expiry would not stop it, and the lease is 300 s)
    fleet.wait_until(lambda s: s["totals"]["cancels"].get("stopped") == 1, timeout=40)
    wait_for(lambda: not _holders(stack.engine), 10, 0.05, what="slot freed on confirmation")
    assert states(stack.engine, [victim]) == {"cancelled": 1}
    assert fleet.stats(jobs=False)["totals"]["in_flight"] == 0


@pytest.mark.slow  # 8 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_a_cancel_that_comes_while_the_gpu_is_still_answering_the_job_stops_it(stack):
    # GIVEN a one-slot GPU that takes its jobs but answers the request later than the dispatcher waits
    # (review of issue 16: simgpu's cancel answered "not running" for a job it held but had not started
    # yet; the dispatcher freed the slot, the next job came, and the cancelled one started anyway beside it)
    fleet = stack.fleet(gpus=1, slots=1, service_time="60", faults=["slow_answer:6"])
    d = stack.dispatcher(fleet, GPU_REQUEST_TIMEOUT_SECONDS="1", SLOTS_PER_GPU="1")
    [victim] = push_jobs(stack.rds, stack.queues[0], 1)
    wait_for(lambda: _holders(stack.engine) == [victim], 20, 0.02, what="the job placed")
    wait_for(
        lambda: 'gpuq_gpu_requests_total{verdict="unknown"} 1.0' in httpx.get(f"{d.url}/metrics").text,
        20,
        0.05,
        what="the dispatcher gave up waiting for the answer",
    )
    assert fleet.stats(jobs=False)["totals"]["in_flight"] == 1  # the GPU holds it, not yet started
    # WHEN the task is cancelled now, and another job waits
    assert httpx.post(f"{d.url}/tasks/{victim}/cancel", timeout=10).status_code == 200
    fleet.configure(faults=[])
    [nxt] = push_jobs(stack.rds, stack.queues[0], 1)
    # THEN the GPU stops the cancelled job, the next one runs on the freed slot, never beside it
    wait_for(lambda: _holders(stack.engine) == [nxt], 30, 0.05, what="the next job placed")
    fleet.wait_until(lambda s: s["totals"]["received"] == 2, timeout=20)
    stats = fleet.stats(jobs=False)
    # stopped once; a cancel whose answer took longer than GPU_REQUEST_TIMEOUT_SECONDS (1 s here, which a
    # loaded machine reaches) is sent again and answered "not running": a GPU takes a repeated cancel as one
    cancels = stats["totals"]["cancels"]
    assert cancels["stopped"] == 1 and set(cancels) <= {"stopped", "not_running"}, cancels
    [gpu] = stats["gpus"].values()
    assert gpu["oversubscriptions"] == 0, gpu["overlaps"]
    # and once its late answer is given (409: cancelled), the cancelled job has not started
    fleet.wait_until(lambda s: s["totals"]["answers"].get("409", 0) == 1, timeout=20)
    assert fleet.stats(jobs=False)["totals"]["in_flight"] == 1


class _CancelDesk(ThreadingHTTPServer):
    """A GPU's cancel desk at a URL of its own (not ``<GPU url>/cancel``): records each cancel, says 200."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                desk.seen.append((self.path, self.headers.get("Authorization", ""), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        desk = self
        super().__init__(("127.0.0.1", 0), Handler)


def test_a_gpu_registered_with_a_cancel_url_gets_its_cancels_there(stack, gpuq):
    # GIVEN one GPU running one long job, whose service takes cancels at a URL of its own
    fleet = stack.fleet(gpus=1, service_time="60")
    d = stack.dispatcher(fleet)
    desk = _CancelDesk()
    threading.Thread(target=desk.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{desk.server_address[1]}/jobs/stop?from=gpuq"
        # (a bad URL is refused naming the option; a good one is said back)
        bad = gpuq("gpu", "set", "g0", "--cancel-url", "ftp://x")
        assert bad.exit_code == 2 and "--cancel-url" in bad.stderr, bad
        res = gpuq("gpu", "set", "g0", "--cancel-url", url)
        assert res.exit_code == 0 and f"cancels go to {url}" in res.stdout, res
        [victim] = push_jobs(stack.rds, stack.queues[0], 1)
        _wait_running(stack, fleet, victim)
        # WHEN the task is cancelled
        assert _cancel_by_api(d, victim)
        # THEN the cancel goes to the registered URL, with the GPU's Bearer header and the usual body,
        # and its 2xx confirms the stop: the slot is freed
        wait_for(lambda: not _holders(stack.engine), 30, 0.05, what="slot freed on the desk's 2xx")
        assert desk.seen[0] == ("/jobs/stop?from=gpuq", f"Bearer {BEARER}", {"task_id": victim, "attempt": 1})
        # AND nothing went to <GPU url>/cancel
        assert fleet.stats(jobs=False)["totals"]["cancels"] == {}
        # AND '' brings back the default
        res = gpuq("gpu", "set", "g0", "--cancel-url", "")
        assert res.exit_code == 0 and "cancels go to its URL + /cancel" in res.stdout, res
        with stack.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT cancel_url FROM gpus").scalars().all() == [None]
    finally:
        desk.shutdown()
        desk.server_close()
