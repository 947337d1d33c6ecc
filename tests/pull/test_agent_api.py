"""``POST /agents/{gpu_id}/jobs`` at its edge: who may poll (401/403/404), what a body may say (422 naming
the field), an empty long poll (204), token rotation, and the job body a pull GPU gets."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import text

from dispatcher.gpus.tokens import verify_token
from dispatcher.loop.agents import MAX_POLLS_PER_GPU
from tests.dispatcher.harness import SECRET, push_jobs, wait_final
from tests.dispatcher.helpers import wait_for
from tests.pull.conftest import add_pull, poll


@pytest.mark.slow  # 5 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_who_may_poll(stack):
    # GIVEN two pull GPUs and a pushed one
    t7 = add_pull(stack.engine, "g7")
    t8 = add_pull(stack.engine, "g8")
    fleet = stack.fleet(gpus=1)
    d = stack.dispatcher(fleet)
    # THEN no token, a malformed one, a made-up one: 401, whichever GPU the path names, existing or not
    for gpu in ("g7", "nope"):
        for token in (None, "x", "gpuq_agent_made-up", t7 + "x", "Bearer " + t7):
            res = poll(d.url, gpu, token)
            assert res.status_code == 401, (gpu, token, res.text)
            assert res.headers["www-authenticate"] == "Bearer"
    assert poll(d.url, "g7", None, body={"max": 1}).status_code == 401
    # AND a scheme other than Bearer is no token
    res = httpx.post(f"{d.url}/agents/g7/jobs", json={}, headers={"Authorization": f"Basic {t7}"}, timeout=10)
    assert res.status_code == 401
    # AND another GPU's token: 403 for a GPU that exists (pull or pushed), 404 for one that does not
    assert poll(d.url, "g7", t8).status_code == 403
    assert poll(d.url, "g0", t7).status_code == 403
    res = poll(d.url, "g9", t7)
    assert res.status_code == 404 and "g9" in res.json()["detail"]
    # AND its own token: 204 (nothing placed), and the GPU is in rotation from that poll on
    assert poll(d.url, "g7", t7).status_code == 204
    assert poll(d.url, "g8", t8).status_code == 204
    gpus = {g["gpu_id"]: g for g in httpx.get(f"{d.url}/gpus", timeout=10).json()}
    assert gpus["g7"]["url"] == "pull:g7" and gpus["g7"]["healthy"] is True


@pytest.mark.slow  # 6 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_bad_bodies_are_422_naming_the_field(stack):
    token = add_pull(stack.engine, "g7")
    d = stack.dispatcher(None)
    cases = {
        "max": [{"max": -1}, {"max": "2"}, {"max": 2.5}, {"max": True}, {"max": 10_000}, {"max": None}],
        "wait_seconds": [
            {"wait_seconds": 31},
            {"wait_seconds": -1},
            {"wait_seconds": "5"},
            {"wait_seconds": []},
            {"wait_seconds": True},
        ],
        "wait": [{"max": 1, "wait": 5}],  # a typo is refused, not ignored
    }
    for field, bodies in cases.items():
        for body in bodies:
            res = poll(d.url, "g7", token, body=body)
            assert res.status_code == 422, (body, res.text)
            assert field in res.text, (body, res.text)
    # (Python's JSON reader takes NaN and Infinity, and 1e400 is infinite: the 422 echoing them back
    # failed to render, a 500 with a traceback in the log)
    nonfinite = (b'{"wait_seconds": NaN}', b'{"wait_seconds": Infinity}', b'{"wait_seconds": 1e400}')
    for raw in (b"not json", b"[1,2]", b'"x"', *nonfinite, b'{"max": 1, "x": -Infinity}'):
        res = httpx.post(
            f"{d.url}/agents/g7/jobs",
            content=raw,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            timeout=10,
        )
        assert res.status_code == 422, (raw, res.text)
    # AND the limits themselves are fine
    assert poll(d.url, "g7", token, body={"max": 0, "wait_seconds": 30}).status_code == 204  # max 0: at once
    assert poll(d.url, "g7", token, body={"max": 1024, "wait_seconds": 0.2}).status_code == 204
    assert poll(d.url, "g7", token, body={}).status_code == 204


@pytest.mark.slow  # 8 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_job_body_is_the_pushed_body_and_rotation_locks_out_the_old_token(stack, gpuq):
    # GIVEN a pull GPU registered by the CLI: the token alone on stdout
    assert gpuq("db", "init").exit_code == 0
    res = gpuq("gpu", "add", "g7", "--pull", "--slots", "2")
    assert res.exit_code == 0, res
    token = res.stdout.strip()
    assert re.fullmatch(r"gpuq_agent_[A-Za-z0-9_-]{43}", token), res
    assert "shown once" in res.stderr
    # and the hint passes it through the environment (a command line is readable by every local user)
    assert "GPUQ_AGENT_TOKEN" in res.stderr and "--agent-token" not in res.stderr
    # a second add changes nothing of the token, and says so
    again = gpuq("gpu", "add", "g7", "--pull", "--slots", "2")
    assert again.exit_code == 0 and again.stdout.strip() == "" and "unchanged" in again.stderr
    # the hash only is stored
    with stack.engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT agent_token_hash FROM gpus WHERE gpu_id = 'g7'").scalar_one()
    assert token not in stored and len(stored) == 64
    d = stack.dispatcher(None)
    assert poll(d.url, "g7", token).status_code == 204  # in rotation
    ids = push_jobs(stack.rds, stack.queues[0], 3)
    # WHEN the agent polls with max 1 (a long poll: the jobs come while it waits)
    first = poll(d.url, "g7", token, body={"max": 1, "wait_seconds": 20})
    assert first.status_code == 200, first.text
    (job,) = first.json()["jobs"]
    # THEN the body is exactly a pushed GPU's
    assert set(job) == {"task_id", "type", "data", "attempt", "callback_url", "callback_token"}
    assert job["task_id"] in ids and job["type"] == "start_transcribe" and job["attempt"] == 1
    assert job["callback_url"] == f"{d.url}/callback"
    assert verify_token(SECRET.encode(), job["task_id"], job["callback_token"]) == 1
    assert job["data"]["i"] == ids.index(job["task_id"])
    # AND never more than its free slots: 2 slots, 1 fetched, so one more and then nothing
    second = poll(d.url, "g7", token, body={"max": 4, "wait_seconds": 0})
    assert second.status_code == 200 and len(second.json()["jobs"]) == 1
    assert poll(d.url, "g7", token, body={"max": 4, "wait_seconds": 1}).status_code == 204
    # WHEN the operator rotates the token
    rotated = gpuq("gpu", "token", "g7", "--rotate")
    assert rotated.exit_code == 0, rotated
    new = rotated.stdout.strip()
    assert new != token
    # THEN the old one is 401 at once, the new one works
    assert poll(d.url, "g7", token).status_code == 401
    assert poll(d.url, "g7", new).status_code == 204
    # AND callbacks with the fetched jobs' tokens end them; the third job then comes to the next poll
    for j in (job, *second.json()["jobs"]):
        cb = httpx.post(
            j["callback_url"],
            json={"task_id": j["task_id"], "status": "finished", "result": {"ok": 1}},
            headers={"Authorization": f"Bearer {j['callback_token']}"},
            timeout=10,
        )
        assert cb.status_code == 200, cb.text
    third = poll(d.url, "g7", new, body={"max": 4, "wait_seconds": 20})
    assert third.status_code == 200 and len(third.json()["jobs"]) == 1
    j = third.json()["jobs"][0]
    httpx.post(
        j["callback_url"],
        json={"task_id": j["task_id"], "status": "finished"},
        headers={"Authorization": f"Bearer {j['callback_token']}"},
        timeout=10,
    )
    wait_final(stack.engine, ids)
    # AND `gpu token` without --rotate shows nothing (it cannot), a pushed or unknown GPU has none
    assert gpuq("gpu", "token", "g7").exit_code != 0
    assert gpuq("gpu", "token", "nope", "--rotate").exit_code != 0


@pytest.mark.slow  # 4 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_gpu_endpoints_pull_entry_gets_a_token_logged_once(stack):
    d1 = stack.dispatcher(None, name="d1", GPU_ENDPOINTS="embed:pull:g7")
    d2 = stack.dispatcher(None, name="d2", GPU_ENDPOINTS="embed:pull:g7")
    logs = d1.logs() + d2.logs()
    tokens = re.findall(r"gpuq_agent_[A-Za-z0-9_-]{43}", logs)
    assert len(tokens) == 1, logs
    gpus = {g["gpu_id"]: g for g in httpx.get(f"{d2.url}/gpus", timeout=10).json()}
    assert (gpus["g7"]["url"], gpus["g7"]["pool"], gpus["g7"]["healthy"]) == ("pull:g7", "embed", False)
    assert poll(d2.url, "g7", tokens[0]).status_code == 204
    wait_for(
        lambda: httpx.get(f"{d1.url}/gpus", timeout=10).json()[0]["healthy"], 10, 0.1, what="g7 in rotation"
    )


@pytest.mark.slow  # 12 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_one_gpu_cannot_hold_more_than_its_share_of_long_polls(stack):
    # GIVEN a pull GPU whose valid token opens more long polls than MAX_POLLS_PER_GPU
    token = add_pull(stack.engine, "g7")
    other = add_pull(stack.engine, "g8")
    d = stack.dispatcher(None)
    extra = 4
    body = {"max": 1, "wait_seconds": 8}
    with ThreadPoolExecutor(MAX_POLLS_PER_GPU + extra) as pool:
        futures = [pool.submit(poll, d.url, "g7", token, body) for _ in range(MAX_POLLS_PER_GPU + extra)]
        # WHILE they wait, THEN callbacks and another GPU's agent are still served
        wait_for(lambda: sum(f.done() for f in futures) >= extra, timeout=60)
        assert poll(d.url, "g8", other).status_code == 204
        assert httpx.get(f"{d.url}/healthz", timeout=10).status_code == 200
        answers = [f.result() for f in futures]
    # AND exactly the polls over the bound were refused at once with 429 and a Retry-After
    codes = sorted(r.status_code for r in answers)
    assert codes == [204] * MAX_POLLS_PER_GPU + [429] * extra, codes
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and "g7" in refused.json()["detail"]
    # AND once they ended, the GPU may poll again (the count went back down)
    assert poll(d.url, "g7", token, body={"max": 1, "wait_seconds": 0.2}).status_code == 204


def test_the_long_poll_cap_holds_whatever_spelling_of_the_gpu_the_path_uses(stack):
    # GIVEN a pull GPU, and polls naming it as the database compares it: another case, trailing spaces
    token = add_pull(stack.engine, "g7")
    d = stack.dispatcher(None)
    extra = 4
    spellings = ["g7", "G7", "g7 ", "G7  "]
    body = {"max": 1, "wait_seconds": 8}
    with ThreadPoolExecutor(MAX_POLLS_PER_GPU + extra) as pool:
        futures = [
            pool.submit(poll, d.url, spellings[i % len(spellings)], token, body)
            for i in range(MAX_POLLS_PER_GPU + extra)
        ]
        answers = [f.result() for f in futures]
    # THEN they count as one GPU's: exactly the polls over the bound were refused
    codes = sorted(r.status_code for r in answers)
    assert codes == [204] * MAX_POLLS_PER_GPU + [429] * extra, codes


def test_jobs_taken_for_an_agent_that_hung_up_go_to_its_next_poll(stack):
    # GIVEN a pull GPU in rotation with a job placed on it, and a database slow to hand that job over
    token = add_pull(stack.engine, "g7", slots=1)
    d = stack.dispatcher(None)
    assert poll(d.url, "g7", token, {"max": 0, "wait_seconds": 0}).status_code == 204
    (task_id,) = push_jobs(stack.rds, stack.queues[0], 1)
    wait_for(lambda: _state(stack.engine, task_id) == "processing", timeout=30, what="the job placed on g7")
    slow = stack.engine.connect()
    held = slow.begin()
    slow.execute(text("SELECT task_id FROM tasks WHERE task_id = :t FOR UPDATE"), {"t": task_id})
    # WHEN the agent gives up on its poll before the answer comes
    with pytest.raises(httpx.ReadTimeout):
        poll(d.url, "g7", token, {"max": 1, "wait_seconds": 0}, timeout=1)
    held.rollback()
    slow.close()
    # THEN the job it never got is handed to its next poll, not left to the lease (that used an attempt)
    again = wait_for(
        lambda: (r := poll(d.url, "g7", token, {"max": 1, "wait_seconds": 0})).status_code == 200 and r,
        timeout=20,
        what="the job handed over again",
    )
    assert [j["task_id"] for j in again.json()["jobs"]] == [task_id]


def _state(engine, task_id: str) -> str | None:
    with engine.connect() as conn:
        return conn.execute(text("SELECT state FROM tasks WHERE task_id = :t"), {"t": task_id}).scalar()


def test_the_token_is_checked_before_the_body_is_read(stack):
    token = add_pull(stack.engine, "g7")
    d = stack.dispatcher(None)
    url = f"{d.url}/agents/g7/jobs"
    json_header = {"Content-Type": "application/json"}
    # a caller without a token learns nothing about its body, however broken or large
    for raw in (b"not json", b"[" * 100_000, b'{"max": -1}', b" " * 1_000_000):
        res = httpx.post(url, content=raw, headers=json_header, timeout=20)
        assert res.status_code == 401, (raw[:20], res.text)
    # with the token: a body nested past any parser's depth is a 422 naming the body, not a 400
    auth = {"Authorization": f"Bearer {token}", **json_header}
    res = httpx.post(url, content=b"[" * 100_000, headers=auth, timeout=20)
    assert res.status_code == 422 and "body" in res.json()["detail"], res.text
    # and no body at all takes the documented defaults (max 1, wait_seconds 0)
    assert httpx.post(url, headers={"Authorization": f"Bearer {token}"}, timeout=20).status_code == 204
