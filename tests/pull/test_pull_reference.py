"""The reference MiniLM service as a pull agent (``python -m reference --pull URL --gpu-id g7``): it listens
on no port, and the official ``openai`` client gets embeddings through gpuq's ``/v1/embeddings``."""

from __future__ import annotations

import importlib.util
import os
import signal
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import text

from tests.dispatcher.harness import push_jobs
from tests.dispatcher.helpers import wait_for
from tests.features.test_openai_embeddings import SENTENCES, TOKEN, check, client
from tests.pull.conftest import add_pull
from tests.reference.conftest import MODEL_PACKAGES, start_reference
from tests.reference.test_embed_service import cosine


def listening_ports(pid: int) -> list[int]:
    """TCP ports the process listens on (IPv4 and IPv6), from /proc: its sockets' inodes in LISTEN state."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:  # 0A: LISTEN
                ports.append(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def _free(engine) -> bool:
    with engine.connect() as conn:
        return conn.execute(text("SELECT COUNT(*) FROM slots WHERE task_id IS NOT NULL")).scalar_one() == 0


@pytest.mark.slow
def test_reference_agent_listens_on_nothing_and_serves_the_openai_client(stack):
    missing = [name for name in MODEL_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"the reference service's model stack is not installed ({', '.join(missing)})")
    # GIVEN a pull GPU in pool embedpool and a dispatcher routing embed there
    token = add_pull(stack.engine, "g7", pool="embedpool")
    d = stack.process(None, API_TOKEN=TOKEN, TASK_ROUTES="embed=embedpool")
    # AND the reference service started as its agent, with the token from the environment
    # (it takes no requests: no bearer token needed)
    agent, log_path = start_reference(
        ["--pull", d.url, "--gpu-id", "g7", "--heartbeat-seconds", "0.25", "--max-hold-seconds", "60"],
        {"GPUQ_AGENT_TOKEN": token, "BEARER_TOKEN": None},
        "agent.log",
    )
    try:

        def polling() -> bool:
            if agent.poll() is not None:
                raise AssertionError(f"agent exited with {agent.returncode}:\n{log_path.read_text()[-4000:]}")
            return any(
                g["healthy"]
                for g in httpx.get(
                    f"{d.url}/gpus", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
                ).json()
            )

        # ends when the model is loaded and the first poll came: seconds idle, much more on a loaded box
        wait_for(polling, 240, 0.2, what="the reference agent polling")
        # THEN it listens on no port at all
        assert listening_ports(agent.pid) == []
        # WHEN the official openai client asks gpuq for embeddings
        with client(d.url) as c:
            res = c.embeddings.create(model="embed", input=SENTENCES)
            # THEN they come from MiniLM on the pull GPU
            vectors = [e.embedding for e in res.data]
            check(vectors, 3)
            assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3
            raw = c.embeddings.with_raw_response.create(model="embed", input=SENTENCES[0])
            task = httpx.get(
                f"{d.url}/tasks/{raw.headers['x-gpuq-task-id']}",
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=10,
            ).json()
            assert (task["gpu_id"], task["state"]) == ("g7", "finished")
            # AND a bad input is the agent's 400 as a failed task, not a hang
            with pytest.raises(openai.APIStatusError) as bad:
                c.embeddings.create(model="embed", input=[""])
            assert bad.value.status_code in (400, 422), bad.value
        assert listening_ports(agent.pid) == []
        # WHEN a long job (it holds its slot 60 s, heartbeating) is cancelled while the agent runs it
        (victim,) = push_jobs(stack.rds, "embedpool", 1, task_type="embed", input="hold on", hold_seconds=60)

        def fetched() -> bool:
            with stack.engine.connect() as conn:
                return (
                    conn.execute(
                        text("SELECT COUNT(*) FROM tasks WHERE task_id = :t AND fetched_attempt = attempt"),
                        {"t": victim},
                    ).scalar_one()
                    == 1
                )

        wait_for(fetched, 60, 0.05, what="the long job fetched by the agent")
        res = httpx.post(
            f"{d.url}/tasks/{victim}/cancel", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
        )
        assert res.status_code == 200 and res.json()["slot_held"] is True, res.text
        # THEN its next heartbeat is answered 409, the agent stops it and confirms: the slot is freed long
        # before the 60 s hold would have ended it
        wait_for(lambda: _free(stack.engine), 30, 0.1, what="the cancelled job's slot freed")
        assert "cancelled" in log_path.read_text()
        # (freed by the agent's confirmation, not by the lease: the dispatcher logs which)
        wait_for(lambda: "cancel_confirmed" in d.log_path.read_text(), 10, 0.1, what="cancel confirmed")
        # AND SIGTERM stops it cleanly
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(60) == 0, log_path.read_text()[-4000:]
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
