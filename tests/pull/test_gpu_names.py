"""GPU names an agent's URL cannot hold (an outside trial): ``gpuq gpu add a/b --pull`` printed a token, but
``/agents/a/b/jobs`` and ``/agents/a%2Fb/jobs`` were both 404, so that GPU could never poll; for ``g?x``,
``g#x`` and ``g%41`` only an escaped path worked, and the shipped agents did not escape (the reference agent
exited 2). New GPUs may no longer have ``/ ? # %`` in their names; GPUs registered with them before still
start, with a warning; the shipped agents escape the name."""

from __future__ import annotations

import httpx
import pytest

from dispatcher.db.agents import register_pull
from dispatcher.db.engine import init_schema, transaction, utcnow
from dispatcher.db.gpus import register_gpu
from dispatcher.testing import ProcessFailed
from reference.agent import PullAgent
from tests.dispatcher.helpers import wait_for


@pytest.mark.parametrize(
    ("name", "shown", "pull"),
    [("a/b", "'/'", True), ("g?x", "'?'", True), ("g#x", "'#'", False), ("g%41", "'%'", False)],
)
def test_gpu_add_refuses_a_name_no_agent_url_can_hold(gpuq, name, shown, pull):
    assert gpuq("db", "init").exit_code == 0
    args = (
        ("gpu", "add", name, "--pull", "--pool", "pp")
        if pull
        else ("gpu", "add", name, "http://127.0.0.1:9/x")
    )
    res = gpuq(*args) if pull else gpuq(*args, "--no-probe")
    assert res.exit_code == 2, res
    assert f"GPU name {name!r}: not a name ({shown}); use letters, digits and . _ - @ +" in res.stderr, res
    assert "/agents/NAME/jobs" in res.stderr and "gpuq_agent_" not in res.stdout, res
    assert gpuq("gpu", "list", "--json").stdout.strip() == "[]"


def test_pools_keep_their_characters(gpuq):
    # a pool is in no URL: a slash there was allowed and stays so
    assert gpuq("db", "init").exit_code == 0
    assert gpuq("gpu", "add", "g0", "http://127.0.0.1:9/x", "--pool", "team/a", "--no-probe").exit_code == 0


def test_a_new_gpu_of_gpu_endpoints_with_such_a_name_stops_the_start(stack):
    with pytest.raises(ProcessFailed, match=r"GPU_ENDPOINTS: GPU name 'a/b': not a name \('/'\)"):
        stack.dispatcher(None, GPU_ENDPOINTS="pp:pull:a/b")


def test_gpus_registered_with_such_names_before_still_start_and_an_agent_polls_escaped(stack):
    # GIVEN GPUs registered as an older gpuq let them be: a pushed rack/g0 and a pull g?x
    init_schema(stack.engine)
    now = utcnow()
    transaction(
        stack.engine,
        register_gpu,
        gpu_id="rack/g0",
        url="http://127.0.0.1:9/r",
        pool="default",
        slot_count=2,
        now=now,
    )
    token = transaction(stack.engine, register_pull, gpu_id="g?x", pool="default", slot_count=2, now=now)
    # WHEN a dispatcher starts with both in GPU_ENDPOINTS: it starts, and warns about each
    d = stack.dispatcher(None, GPU_ENDPOINTS="rack/g0=http://127.0.0.1:9/r,pull:g?x")
    logs = d.logs()
    assert "GPU 'rack/g0' is registered under a name new GPUs may not have ('/')" in logs, logs
    assert "GPU 'g?x' is registered under a name new GPUs may not have ('?')" in logs, logs
    # AND the simulated GPU's agent, escaping its name in the URL, polls it into rotation
    agent = stack.fleet(pull=d.url, agents={"g?x": token}, service_time="fixed:0.01")

    def in_rotation() -> bool:
        return any(
            g["gpu_id"] == "g?x" and g["healthy"] for g in httpx.get(f"{d.url}/gpus", timeout=10).json()
        )

    wait_for(in_rotation, 30, 0.1, what="g?x polling")
    assert agent.server.agents is not None and not agent.server.agents.refused


@pytest.mark.parametrize(
    ("name", "path"), [("g?x", "g%3Fx"), ("g#x", "g%23x"), ("g%41", "g%2541"), ("g7", "g7")]
)
def test_the_reference_agent_escapes_its_gpu_id(name, path):
    agent = PullAgent(None, "http://d:8000/", name, "t")  # type: ignore[arg-type] - the service is not used
    assert agent.url == f"http://d:8000/agents/{path}/jobs"
