"""Hypothesis against a running dispatcher's ``POST /callback``: arbitrary JSON, wrong types, huge strings,
unicode (lone surrogates included), deep nesting, garbage bytes, with no token, a wrong one, or a valid one
for the body's task or for a task really running. Whatever comes, the answer is one of the contract's
(SPEC §4: 200/401/404/409/413/422) with a JSON body, never a 500, and the process stays up.
Producer events are fuzzed in tests/producer/test_fuzz.py."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.db.attempts import slot_drift
from dispatcher.gpus.tokens import make_token
from tests.conftest import scaled
from tests.dispatcher.harness import SECRET, push_jobs, states
from tests.dispatcher.helpers import wait_for

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]  # slow: thousands of fuzzed callbacks

ALLOWED = {200, 401, 404, 409, 413, 422}
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.text(st.characters(codec="utf-8"), min_size=200, max_size=400)
)
JSON = st.recursive(
    SCALARS,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=15,
)
STATUS = st.sampled_from(["finished", "failed", "running", "FINISHED", "done", ""]) | JSON


def _bodies(real_ids: list[str]) -> st.SearchStrategy[Any]:
    task_id = (
        st.sampled_from(real_ids)
        | st.text(min_size=1, max_size=300)
        | st.text(st.characters(categories=["Cs", "Co", "Cc", "Zs", "Mn"]), min_size=1, max_size=10)
    )
    status = st.sampled_from(["finished", "failed", "running"])
    optional = {
        "result": JSON,
        "error": st.text(max_size=70_000) | JSON,
        "retry": st.booleans() | JSON,
        "progress": JSON,
        "extra": JSON,
    }
    close_to_valid = st.fixed_dictionaries({"task_id": task_id, "status": status}, optional=optional)
    wrong_types = st.fixed_dictionaries(
        {"task_id": task_id | JSON, "status": status | JSON}, optional=optional
    )
    return close_to_valid | wrong_types | JSON


def _encode(draw: st.DrawFn, body: Any) -> bytes:
    how = draw(st.sampled_from(["json", "ascii", "raw", "deep", "surrogate"]))
    if how == "raw":
        return draw(st.binary(max_size=200))
    if how == "deep":
        depth = draw(st.integers(100, 20_000))
        return (
            '{"task_id": "x", "status": "finished", "result": ' + "[" * depth + "]" * depth + "}"
        ).encode()
    if how == "surrogate":  # a lone surrogate escape is valid JSON text but not a valid string
        return b'{"task_id": "a\\ud800b", "status": "finished"}'
    text = json.dumps(body, ensure_ascii=how == "ascii")
    return text.encode("utf-8", "surrogatepass")


@st.composite
def requests(draw: st.DrawFn, real_ids: list[str]) -> tuple[bytes, dict[str, str]]:
    body = draw(_bodies(real_ids))
    raw = _encode(draw, body)
    given_id = body.get("task_id") if isinstance(body, dict) else None
    token_of = given_id if isinstance(given_id, str) else draw(st.sampled_from(real_ids))
    kind = draw(st.sampled_from(["none", "valid", "valid-other-attempt", "garbage", "real-task"]))
    headers = {"Content-Type": draw(st.sampled_from(["application/json", "text/plain", ""]))}
    try:
        if kind == "valid":
            headers["Authorization"] = f"Bearer {make_token(SECRET.encode(), token_of, 1)}"
        elif kind == "valid-other-attempt":
            attempt = draw(st.integers(0, 10**9))
            headers["Authorization"] = f"Bearer {make_token(SECRET.encode(), token_of, attempt)}"
        elif kind == "real-task":
            real = draw(st.sampled_from(real_ids))
            headers["Authorization"] = f"Bearer {make_token(SECRET.encode(), real, 1)}"
        elif kind == "garbage":
            headers["Authorization"] = draw(st.from_regex(r"\A[!-~]([ -~]{0,58}[!-~])?\Z"))
    except UnicodeEncodeError:  # a surrogate in the id: no token can be made for it
        pass
    return raw, headers


def test_callback_bodies_never_get_a_500(stack):
    # GIVEN a dispatcher with four tasks running on a GPU that never calls back (the fuzzer is the GPU)
    fleet = stack.fleet(gpus=1, service_time="0", faults=["lost_callback"])
    d = stack.dispatcher(fleet, TASK_TIMEOUT_SECONDS="600", MAX_ATTEMPTS="3")
    real_ids = push_jobs(stack.rds, stack.queues[0], 4)
    wait_for(lambda: states(stack.engine, real_ids)["processing"] == 4, 20, what="four running")
    seen: set[int] = set()

    with httpx.Client(base_url=d.url, timeout=30) as client:

        @settings(
            max_examples=scaled(300),
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(req=requests(real_ids))
        def fuzz(req: tuple[bytes, dict[str, str]]) -> None:
            raw, headers = req
            res = client.post("/callback", content=raw, headers={k: v for k, v in headers.items() if v})
            assert res.status_code in ALLOWED, (res.status_code, res.text[:500], raw[:300])
            assert res.headers["content-type"].startswith("application/json")
            assert isinstance(res.json(), dict)
            seen.add(res.status_code)

        fuzz()
    # THEN the process is up and consistent, and the answers covered the contract
    assert d.alive()
    assert httpx.get(f"{d.url}/healthz").status_code == 200
    with stack.engine.connect() as conn:
        assert slot_drift(conn) == []
    assert {401, 404, 422} <= seen, seen
