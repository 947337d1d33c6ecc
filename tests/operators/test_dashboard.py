"""The dashboard at ``GET /``: served self-contained, fed by ``/api/overview`` (behind API_TOKEN), and, in a real
headless Chromium, showing the busy slots the database reports. Saves a screenshot to build/artifacts/ (and to the README's docs/dashboard.png with GPUQ_UPDATE_DOCS=1)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import httpx
import pytest

from dispatcher.http.dashboard import _PAGE
from producer.keys import Keys
from tests.dispatcher.harness import ROOT, push_jobs, states, wait_final
from tests.dispatcher.helpers import wait_for

# as `openssl rand -base64` makes them: "+" read as a space by URLSearchParams locked the page out (a trial)
TOKEN = "dash+Token/0123456=="
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# The screenshot is a test artefact (build/artifacts/); GPUQ_UPDATE_DOCS=1 also refreshes the README's copy.
ARTIFACT = ROOT / "build" / "artifacts" / "dashboard.png"
SCREENSHOT = ROOT / "docs" / "dashboard.png"


def chromium(url: str, *mode: str) -> str:
    """Load ``url`` in a fresh headless Chromium, let its timers run 3 s, and return what it printed."""
    with tempfile.TemporaryDirectory(prefix="gpuq-chromium-") as profile:
        out = subprocess.run(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--window-size=1280,800",
                "--virtual-time-budget=3000",
                *mode,
                url,
            ],
            capture_output=True,
            timeout=90,
            check=False,
        )
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-3000:]
    return out.stdout.decode()


def db_busy(engine) -> Counter[str]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT gpu_id FROM slots WHERE task_id IS NOT NULL").all()
    return Counter(r[0] for r in rows)


def test_page_is_self_contained():
    # nothing is fetched from another origin: no CDN, no web font, no absolute URL at all
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", _PAGE)
    assert "@import" not in _PAGE
    assert not re.search(r"""fetch\(\s*["'`]https?:""", _PAGE)
    assert "<script>" in _PAGE
    assert "<style>" in _PAGE


@pytest.mark.slow  # 5 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_overview_api_needs_the_token_and_serves_the_fleet(stack):
    fleet = stack.fleet(gpus=2, service_time="0", faults=["lost_callback"])
    d = stack.dispatcher(fleet, API_TOKEN=TOKEN, TASK_TIMEOUT_SECONDS="60")
    push_jobs(stack.rds, stack.queues[0], 3)
    wait_for(lambda: states(stack.engine)["processing"] == 3, 20, what="three running")

    page = httpx.get(f"{d.url}/", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert httpx.get(f"{d.url}/api/overview", timeout=10).status_code == 401
    body = httpx.get(f"{d.url}/api/overview", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()

    assert sum(g["busy"] for g in body["gpus"]) == 3
    assert sum(len([s for s in g["slot_list"] if s["task_id"]]) for g in body["gpus"]) == 3
    assert body["tasks"]["processing"] == 3
    assert {q["queue"] for q in body["queues"]} == set(stack.queues)
    assert {q["priority"] for q in body["queues"]} == {"high", "normal", "low"}
    assert body["dead"] == 0
    assert len(body["throughput"]["series"]["finished"]) == 30


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (make test installs it: infra/ensure-chromium.sh)"
)
def test_chromium_shows_the_busy_slots_the_database_reports(stack):
    # GIVEN a history of finished and failed jobs on 4 GPUs ...
    fleet = stack.fleet(gpus=4, service_time="uniform:0.01,0.05", gpu_faults={"g3": ["fail@0.4"]})
    d = stack.dispatcher(fleet, API_TOKEN=TOKEN, TASK_TIMEOUT_SECONDS="120", MAX_ATTEMPTS="1")
    wait_final(stack.engine, push_jobs(stack.rds, stack.queues[0], 150), 60, final=("finished", "failed"))
    # ... then GPUs that never call back (their slots stay busy), one GPU drained, a backlog and a dead letter
    fleet.configure(faults=["lost_callback"])
    with stack.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE gpus SET state = 'draining' WHERE gpu_id = 'g3'")
    # the bad job goes first in its queue: it is taken (and dead-lettered) at the first visit of that queue,
    # whatever the size of the passes that fill the 12 free slots
    stack.rds.rpush(stack.queues[1], b"{not json")
    push_jobs(stack.rds, stack.queues[0], 18)
    push_jobs(stack.rds, stack.queues[1], 5)
    wait_for(lambda: sum(db_busy(stack.engine).values()) == 12, 30, what="12 slots busy")
    wait_for(lambda: stack.rds.llen(Keys(stack.prefix).dead) == 1, 10, what="the dead letter")
    busy = db_busy(stack.engine)

    # WHEN a real browser loads the page and lets it poll for 3 s
    dom = chromium(f"{d.url}/?token={TOKEN}", "--dump-dom")

    # THEN it shows what the database says: 12 busy slots of 16, per GPU, and the backlog
    assert re.search(r'id="busy-total">12<', dom), dom[:3000]
    assert re.search(r'id="slots-total">16<', dom)
    assert dom.count('class="slot busy"') == 12
    assert dom.count('class="slot"') == 4  # g3's, drained and idle
    shown = dict(re.findall(r'data-gpu="(g\d)" data-busy="(\d+)"', dom))
    assert {gpu: int(n) for gpu, n in shown.items()} == {f"g{i}": busy.get(f"g{i}", 0) for i in range(4)}
    assert re.search(r'id="waiting">11<', dom)  # 18 + 5 waiting jobs, 12 of them running
    assert re.search(r'id="oldest">\d+(\.\d)?s<', dom)  # and how long the oldest has waited
    # each GPU's count is its boxes' own (a screenshot once showed "3/4" beside four busy boxes)
    rows = re.findall(r'data-gpu="(g\d)" data-busy="(\d+)"(.*?)class="note busy-count">(\d+)/', dom)
    assert len(rows) == 4 and all(r[2].count('class="slot busy"') == int(r[1]) == int(r[3]) for r in rows)
    # the throughput chart has a scale: a round maximum and its half on the y axis, minutes on the x axis
    assert re.search(r'id="y-max">(1|2|5)0*<', dom) and "5m</span>" in dom and ">now<" in dom
    assert re.search(r'id="dead">1<', dom)
    assert "draining" in dom
    assert "<td>g3</td><td>failed</td>" in dom  # g3's failures are listed

    # and the screenshot for the README
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "dashboard.png"
        chromium(f"{d.url}/?token={TOKEN}", f"--screenshot={shot}")
        data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTIFACT.write_bytes(data)
    if os.environ.get("GPUQ_UPDATE_DOCS") == "1":
        SCREENSHOT.write_bytes(data)


def test_the_page_says_when_the_token_is_missing(stack):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (make test installs it: infra/ensure-chromium.sh)")
    fleet = stack.fleet(gpus=1, service_time="0")
    d = stack.dispatcher(fleet, API_TOKEN=TOKEN)
    dom = chromium(f"{d.url}/", "--dump-dom")
    assert "needs its API token" in dom
