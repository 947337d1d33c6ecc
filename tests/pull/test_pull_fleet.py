"""Pull GPUs with simulated agents beside pushed GPUs: least-loaded placement over both kinds, never more
jobs than slots with three dispatchers and a kill -9, agents that fall silent or die holding jobs, and a
cancel that reaches an agent through the 409 to its heartbeat."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import httpx
import pytest

from tests.dispatcher.conftest import Stack
from tests.dispatcher.harness import (
    BEARER,
    ROOT,
    DispatcherProc,
    free_port,
    push_jobs,
    reconcile,
    states,
    wait_final,
    wait_swept,
)
from tests.dispatcher.helpers import add_gpu, wait_for
from tests.pull.conftest import add_pull


def _placed(engine, ids) -> Counter[str]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT task_id, gpu_id FROM tasks WHERE state = 'processing'").all()
    return Counter(gpu for task_id, gpu in rows if task_id in set(ids))


def _healthy(url: str) -> dict[str, bool]:
    return {g["gpu_id"]: g["healthy"] for g in httpx.get(f"{url}/gpus", timeout=10).json()}


def _check_fleets(fleets) -> None:
    for fleet in fleets:
        for name, gpu in fleet.stats(jobs=False)["gpus"].items():
            assert gpu["oversubscriptions"] == 0, (name, gpu["overlaps"][:3])
            assert gpu["max_in_flight"] <= 4, (name, gpu)


@pytest.mark.slow
def test_mixed_pool_least_loaded_and_never_oversubscribed_with_three_dispatchers_and_kill_9(stack):
    # GIVEN a pool of two pushed GPUs (g0, g1) and two pull GPUs (p0, p1), 4 slots each
    tokens = {name: add_pull(stack.engine, name) for name in ("p0", "p1")}
    pushed = stack.fleet(gpus=2, service_time="fixed:4")
    q_all, q_first = stack.queues
    ports = [free_port() for _ in range(3)]
    # and three dispatchers; only d0 serves q_first, so the first jobs are placed by d0 alone
    procs = [
        DispatcherProc(
            stack.env(pushed, CALLBACK_PORT=str(port), TASK_QUEUES=f"{q_all},{q_first}" if i == 0 else q_all),
            name=f"d{i}",
        )
        for i, port in enumerate(ports)
    ]
    stack.procs.extend(procs)
    for p in procs:
        p.start()
    d0, d1, d2 = procs
    # the agents poll d1 and d2, never d0: what d0 places reaches them through the database
    agents = [
        stack.fleet(pull=d1.url, agents={"p0": tokens["p0"]}, service_time="fixed:4"),
        stack.fleet(pull=d2.url, agents={"p1": tokens["p1"]}, service_time="fixed:4"),
    ]
    wait_for(lambda: all(_healthy(d0.url).values()), 30, 0.1, what="both agents polling")
    # WHEN d0 places 4 long jobs on the idle pool, then 4 more
    first = push_jobs(stack.rds, q_first, 4)
    wait_for(lambda: sum(_placed(stack.engine, first).values()) == 4, 30, 0.05, what="4 placed")
    # THEN each GPU, pushed or pull, got one: the least-loaded GPU first, whatever its kind
    assert _placed(stack.engine, first) == {"g0": 1, "g1": 1, "p0": 1, "p1": 1}
    second = push_jobs(stack.rds, q_first, 4)
    wait_for(lambda: sum(_placed(stack.engine, first + second).values()) == 8, 30, 0.05, what="8 placed")
    assert _placed(stack.engine, first + second) == {"g0": 2, "g1": 2, "p0": 2, "p1": 2}
    # AND the agents have them running (fetched from d1 and d2, placed by d0)
    for fleet in agents:
        fleet.wait_until(lambda s: s["totals"]["in_flight"] == 2, timeout=30)
    # WHEN 400 short jobs go to all three dispatchers, and d0 is killed -9 mid-run and restarted
    for fleet in (pushed, *agents):
        fleet.configure(service_time="uniform:0.02,0.1")
    load = push_jobs(stack.rds, q_all, 400)
    wait_for(lambda: states(stack.engine, load)["finished"] >= 100, 60, 0.05, what="100 finished")
    d0.kill()
    d0.start()
    # THEN everything finishes, no GPU (pull or pushed) ever held more jobs than slots
    ids = first + second + load
    wait_final(stack.engine, ids, timeout=180)
    _check_fleets([pushed, *agents])
    # AND the pull GPUs did their share, with jobs placed by dispatchers other than the one they poll
    with stack.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT gpu_id, dispatcher_id FROM tasks").all()
    per_gpu = Counter(gpu for gpu, _ in rows)
    assert per_gpu["p0"] >= 20 and per_gpu["p1"] >= 20, per_gpu
    placers = {gpu: {did.split("-")[0] for g, did in rows if g == gpu} for gpu in ("p0", "p1")}
    assert placers["p0"] - {"d1"} and placers["p1"] - {"d2"}, placers
    wait_swept(stack.rds, stack.prefix, stack.queues)
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)


def _a_pushed_gpu_joins(stack: Stack, ids: list[str], timeout: float) -> None:
    """A pushed GPU g0 with 4 slots joins at run time and the dispatchers are woken; the jobs ``ids`` end."""
    fleet = stack.fleet(gpus=1, service_time="fixed:0.05")
    add_gpu(stack.engine, "g0", 4, url=fleet.url("g0"))
    stack.rds.publish(f"{stack.prefix}wake", "slot")
    wait_final(stack.engine, ids, timeout=timeout)


def _poll_nothing(url: str, token: str) -> int:
    """p0's agent polls for no job (it only says it is alive); the answer's status."""
    return httpx.post(
        f"{url}/agents/p0/jobs", json={"max": 0}, headers={"Authorization": f"Bearer {token}"}, timeout=10
    ).status_code


@pytest.mark.slow  # 6 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_silent_agent_leaves_rotation_and_its_unfetched_jobs_wait_again(stack):
    # GIVEN a pull GPU whose agent polled once and then fell silent, and AGENT_STALE_SECONDS=2
    token = add_pull(stack.engine, "p0")
    d = stack.dispatcher(None, AGENT_STALE_SECONDS="2", TASK_TIMEOUT_SECONDS="600")
    assert _poll_nothing(d.url, token) == 204
    # WHEN jobs come while it is the only GPU (they are placed on it: nothing fetches them)
    ids = push_jobs(stack.rds, stack.queues[0], 3)
    wait_for(lambda: _placed(stack.engine, ids) == {"p0": 3}, 30, 0.05, what="placed on p0")
    # THEN once it has been silent too long it is out of rotation and the jobs wait again, with no
    # attempt used and long before their 600 s lease
    wait_for(lambda: not _healthy(d.url)["p0"], 30, 0.1, what="p0 out of rotation")
    wait_for(
        lambda: states(stack.engine, ids) == {"queued": 3},
        30,
        0.1,
        what=lambda: dict(states(stack.engine, ids)),
    )
    gpu = next(g for g in httpx.get(f"{d.url}/gpus", timeout=10).json() if g["gpu_id"] == "p0")
    assert "silent" in gpu["last_error"]
    # AND a pushed GPU added now runs them, the attempt on p0 given back (max_attempts one more)
    _a_pushed_gpu_joins(stack, ids, timeout=60)
    with stack.engine.connect() as conn:
        outcomes = conn.exec_driver_sql("SELECT gpu_id, outcome FROM attempts").all()
        attempts = set(conn.exec_driver_sql("SELECT attempt, max_attempts FROM tasks").all())
    assert Counter(outcomes) == {("p0", "gpu_refused"): 3, ("g0", "finished"): 3}
    assert attempts == {(2, 4)}
    # AND the agent polling again puts p0 back in rotation
    assert _poll_nothing(d.url, token) == 204
    assert _healthy(d.url)["p0"]
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)


@pytest.mark.slow  # a few seconds: leases of 1 s run out on a pull GPU nobody polls
def test_a_lease_that_runs_out_before_the_agent_fetched_the_job_uses_no_attempt(stack):
    """An outside trial: with TASK_TIMEOUT_SECONDS (20) under AGENT_STALE_SECONDS (60), a job placed on a pull
    GPU whose agent never fetched it used an attempt when its lease ran out (README: such jobs wait again)."""
    # GIVEN a pull GPU whose agent polled once and then went quiet, leases far shorter than the time it takes
    # to be called silent, and one attempt per job
    token = add_pull(stack.engine, "p0")
    d = stack.dispatcher(None, AGENT_STALE_SECONDS="600", TASK_TIMEOUT_SECONDS="1", MAX_ATTEMPTS="1")
    assert _poll_nothing(d.url, token) == 204
    ids = push_jobs(stack.rds, stack.queues[0], 3)
    wait_for(lambda: _placed(stack.engine, ids) == {"p0": 3}, 30, 0.05, what="placed on p0")

    # WHEN their leases run out unfetched
    def given_back() -> int:
        with stack.engine.connect() as conn:
            return int(
                conn.exec_driver_sql(
                    "SELECT COUNT(*) FROM attempts WHERE outcome = 'gpu_refused' AND error LIKE '%%did not fetch%%'"
                ).scalar_one()
            )

    wait_for(lambda: given_back() >= 3, 30, 0.1, what="given back")
    # THEN none failed or used an attempt: a pushed GPU added now runs them all
    _a_pushed_gpu_joins(stack, ids, timeout=60)
    with stack.engine.connect() as conn:
        outcomes = Counter(o for (o,) in conn.exec_driver_sql("SELECT outcome FROM attempts").all())
    assert outcomes["finished"] == 3 and outcomes["expired"] == 0, outcomes
    assert set(outcomes) <= {"finished", "gpu_refused"}, outcomes
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)


@pytest.mark.slow
def test_agent_killed_holding_jobs_they_are_retried_after_their_lease(stack):
    # GIVEN a pull GPU whose agent is a simgpu process with long jobs
    token = add_pull(stack.engine, "p0")
    # (leases shorter than the time a dead agent takes to leave rotation: retries may land on it again
    # before it is out, and use attempts; enough are allowed that the test does not hang on that race)
    d = stack.process(None, AGENT_STALE_SECONDS="1", TASK_TIMEOUT_SECONDS="3", MAX_ATTEMPTS="10")
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simgpu",
            "--pull",
            d.url,
            "--agent",
            f"p0={token}",
            "--port",
            "0",
            "--service-time",
            "fixed:600",
            "--token",
            BEARER,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ids = push_jobs(stack.rds, stack.queues[0], 2)

        def fetched() -> bool:
            with stack.engine.connect() as conn:
                return (
                    conn.exec_driver_sql(
                        "SELECT COUNT(*) FROM tasks WHERE fetched_attempt = attempt AND state = 'processing'"
                    ).scalar_one()
                    == 2
                )

        wait_for(fetched, 60, 0.05, what="both jobs fetched by the agent")
        # WHEN the agent is killed -9 while it holds them
        agent.kill()
        agent.wait(10)
    finally:
        if agent.poll() is None:
            agent.kill()
    # THEN their leases run out and, with a pushed GPU added, they run again there
    _a_pushed_gpu_joins(stack, ids, timeout=90)
    with stack.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT task_id, attempt, gpu_id, outcome FROM attempts").all()
    for task_id in ids:
        mine = sorted((a, gpu, outcome) for t, a, gpu, outcome in rows if t == task_id)
        # the first attempt (fetched, then the agent died) ran out its lease; a retry placed on p0 before
        # p0 left rotation was never fetched: sent back when p0 left it, or its lease ran out first; the
        # last one finished on g0
        assert mine[0] == (1, "p0", "lease_expired"), mine
        assert mine[-1][1:] == ("g0", "finished"), mine
        assert all(m[1] == "p0" and m[2] in ("gpu_refused", "lease_expired") for m in mine[1:-1]), mine
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)


def test_cancel_reaches_an_agent_through_the_409_to_its_heartbeat(stack):
    # GIVEN a pull GPU with one slot running a long job that heartbeats
    token = add_pull(stack.engine, "p0", slots=1)
    d = stack.dispatcher(None, TASK_TIMEOUT_SECONDS="600")
    agent = stack.fleet(
        pull=d.url, agents={"p0": token}, service_time="fixed:600", faults=["heartbeat:0.2"], slots=1
    )
    wait_for(lambda: _healthy(d.url)["p0"], 30, 0.1, what="p0 polling")
    victim, after = push_jobs(stack.rds, stack.queues[0], 2)
    agent.wait_until(lambda s: s["totals"]["in_flight"] == 1, timeout=30)
    running = next(iter(_placed(stack.engine, [victim, after])))
    assert running == "p0"
    # WHEN the running task is cancelled (no cancel can be POSTed to a pull GPU)
    res = httpx.post(f"{d.url}/tasks/{victim}/cancel", timeout=10)
    assert res.status_code == 200 and res.json()["slot_held"] is True, res.text
    # THEN the agent's next heartbeat is answered 409, it stops the job and confirms, the slot is freed
    # and the next job takes it; the agent never ran two jobs on its one slot
    agent.wait_until(lambda s: s["totals"]["cancels"].get("stopped", 0) == 1, timeout=30)
    wait_for(lambda: _placed(stack.engine, [after]) == {"p0": 1}, 30, 0.05, what="the next job placed")
    stats = agent.stats(jobs=False)
    assert stats["totals"]["callbacks_answered"].get("409", 0) >= 2, stats[
        "totals"
    ]  # heartbeat, confirmation
    _check_fleets([agent])
    assert agent.stats(jobs=False)["gpus"]["p0"]["max_in_flight"] == 1
    assert states(stack.engine, [victim]) == {"cancelled": 1}


@pytest.mark.slow  # 7 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_a_freed_pull_slot_is_handed_to_the_agents_next_poll(stack):
    # GIVEN a pool of one pull GPU (4 slots) and a backlog much longer than its slots
    token = add_pull(stack.engine, "p0")
    d = stack.dispatcher(None)
    agent = stack.fleet(pull=d.url, agents={"p0": token}, service_time="uniform:0.01,0.05")
    ids = push_jobs(stack.rds, stack.queues[0], 150)
    # THEN every job runs once, never more than 4 at a time on the agent
    wait_final(stack.engine, ids, timeout=120)
    _check_fleets([agent])
    assert max(Counter(j["task_id"] for j in agent.stats()["jobs"]).values()) == 1
    # AND callbacks handed freed slots to waiting jobs in their own transaction (the slot hand-off), which
    # the agent's next poll then took
    metrics = httpx.get(f"{d.url}/metrics", timeout=10).text
    handoffs = next(
        float(line.split()[1]) for line in metrics.splitlines() if line.startswith("gpuq_handoffs_total ")
    )
    assert handoffs > 0, handoffs
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)
