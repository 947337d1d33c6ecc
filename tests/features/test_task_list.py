"""``GET /tasks`` and ``gpuq task list``: filters and keyset pages against the real stores."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, insert

from dispatcher.db.engine import init_schema, make_engine, transaction, utcnow
from dispatcher.db.listing import BadFilter, TaskFilter, list_tasks
from dispatcher.db.schema import tasks
from tests.dispatcher.conftest import Stack
from tests.dispatcher.harness import push_jobs, wait_final
from tests.operators.conftest import Gpuq

T0 = datetime(2030, 1, 2, 3, 4, 5, 123456)


def _rows(engine: Engine) -> list[dict[str, Any]]:
    """25 tasks: five share each created_at (ties are broken by task_id), two queues, three states."""
    rows = []
    for i in range(25):
        rows.append(
            {
                "task_id": f"t{i:02d}",
                "queue": "qa" if i % 2 else "qb",
                "state": ("finished", "failed", "queued")[i % 3],
                "type": "embed" if i < 10 else "transcribe",
                "gpu_id": "g1" if i % 5 == 0 else None,
                "data": "{}",
                "max_attempts": 3,
                "created_at": T0 + timedelta(seconds=i // 5),
                "updated_at": T0,
            }
        )
    with engine.begin() as conn:
        conn.execute(insert(tasks), rows)
    return rows


def _all_pages(engine: Engine, where: TaskFilter, limit: int) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        page = transaction(engine, list_tasks, where=where, limit=limit, cursor=cursor)
        pages.append([t["task_id"] for t in page["tasks"]])
        cursor = page["next_cursor"]
        if cursor is None:
            return pages


def test_pages_walk_every_match_once_newest_first(any_database_url: str) -> None:
    engine = make_engine(any_database_url, pool_size=1)
    try:
        init_schema(engine)
        rows = _rows(engine)
        newest_first = [r["task_id"] for r in sorted(rows, key=lambda r: (r["created_at"], r["task_id"]))][
            ::-1
        ]

        pages = _all_pages(engine, TaskFilter(), limit=7)
        assert [len(p) for p in pages] == [7, 7, 7, 4]
        assert [
            t for p in pages for t in p
        ] == newest_first  # ties on created_at split across pages: no repeat, no gap

        qa_failed = _all_pages(engine, TaskFilter(states=("failed", "queued"), queue="qa"), limit=3)
        expected = [r["task_id"] for r in rows if r["queue"] == "qa" and r["state"] in ("failed", "queued")]
        assert sorted([t for p in qa_failed for t in p]) == sorted(expected)

        on_g1 = _all_pages(engine, TaskFilter(gpu_id="g1", type="transcribe"), limit=50)
        assert on_g1 == [["t20", "t15", "t10"]]

        since = _all_pages(engine, TaskFilter(since=T0 + timedelta(seconds=4)), limit=50)
        assert since == [["t24", "t23", "t22", "t21", "t20"]]

        with pytest.raises(BadFilter, match="cursor"):
            transaction(engine, list_tasks, where=TaskFilter(), cursor="not-a-cursor")
    finally:
        engine.dispose()


@pytest.mark.slow  # 4 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_get_tasks_over_http_with_api_token(stack: Stack) -> None:
    fleet = stack.fleet(gpus=1, slots=4, service_time="fixed:0.01")
    d = stack.dispatcher(fleet, API_TOKEN="list-token-0123456")
    auth = {"Authorization": "Bearer list-token-0123456"}
    q1, q2 = stack.queues
    ids1 = push_jobs(stack.rds, q1, 6, task_type="embed")
    ids2 = push_jobs(stack.rds, q2, 3, task_type="transcribe")
    wait_final(stack.engine, ids1 + ids2)

    assert httpx.get(f"{d.url}/tasks", timeout=5).status_code == 401
    got, cursor = [], None
    while True:
        params: dict[str, Any] = {"queue": q1, "state": "finished", "limit": 4}
        if cursor:
            params["cursor"] = cursor
        page = httpx.get(f"{d.url}/tasks", params=params, headers=auth, timeout=5).json()
        got += page["tasks"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(t["task_id"] for t in got) == sorted(ids1)
    assert {(t["queue"], t["type"], t["gpu_id"], t["state"]) for t in got} == {
        (q1, "embed", "g0", "finished")
    }

    by_type = httpx.get(
        f"{d.url}/tasks", params={"type": "transcribe", "gpu_id": "g0"}, headers=auth, timeout=5
    )
    assert sorted(t["task_id"] for t in by_type.json()["tasks"]) == sorted(ids2)
    future = httpx.get(
        f"{d.url}/tasks", params={"since": "2999-01-01T00:00:00+02:00"}, headers=auth, timeout=5
    )
    assert future.json() == {"tasks": [], "next_cursor": None}
    bad = httpx.get(f"{d.url}/tasks", params={"state": "sleeping"}, headers=auth, timeout=5)
    assert bad.status_code == 422 and "sleeping" in bad.text
    assert httpx.get(f"{d.url}/tasks", params={"limit": 0}, headers=auth, timeout=5).status_code == 422


@pytest.mark.slow  # 3 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_gpuq_task_list(gpuq: Gpuq, gpuq_env: dict[str, str]) -> None:
    engine = make_engine(gpuq_env["DATABASE_URL"], pool_size=1)
    try:
        init_schema(engine)
        _rows(engine)
    finally:
        engine.dispose()
    res = gpuq("task", "list", "--state", "failed", "--queue", "qa", "--json")
    assert res.exit_code == 0, res
    page = json.loads(res.stdout)
    assert [t["task_id"] for t in page["tasks"]] == ["t19", "t13", "t07", "t01"]

    first = gpuq("task", "list", "--limit", "2", "--type", "embed")
    assert first.exit_code == 0, first
    assert "t09" in first.stdout and "t08" in first.stdout and "t07" not in first.stdout
    cursor = first.stderr.split("--cursor ")[1].strip()
    second = gpuq("task", "list", "--limit", "2", "--type", "embed", "--cursor", cursor, "--json")
    assert [t["task_id"] for t in json.loads(second.stdout)["tasks"]] == ["t07", "t06"]

    since = gpuq("task", "list", "--since", "2030-01-02T03:04:09", "--gpu", "g1", "--json")
    assert [t["task_id"] for t in json.loads(since.stdout)["tasks"]] == ["t20"]
    bad = gpuq("task", "list", "--state", "nope")
    assert bad.exit_code == 2 and "nope" in bad.stderr
    assert gpuq("task", "list", "--cursor", "zzz").exit_code == 2


def test_task_list_since_takes_every_form_task_retry_takes(gpuq: Gpuq, gpuq_env: dict[str, str]) -> None:
    """An outside trial: ``task list --since`` took only two strptime formats, though ``task retry --since``
    took ``2h``, ``Z``, offsets and a space, and the README says the CLI takes the API's filters."""
    engine = make_engine(gpuq_env["DATABASE_URL"], pool_size=1)
    try:
        init_schema(engine)
        _rows(engine)
        with engine.begin() as conn:  # three hours old: inside 4h, outside 2h
            old = {"task_id": "old", "state": "failed", "type": "embed", "queue": "qa", "gpu_id": "g1"}
            at = utcnow() - timedelta(hours=3)
            conn.execute(
                insert(tasks), [{**old, "data": "{}", "max_attempts": 1, "created_at": at, "updated_at": at}]
            )
    finally:
        engine.dispose()

    def since(value: str) -> list[str]:
        res = gpuq("task", "list", "--gpu", "g1", "--since", value, "--json")
        assert res.exit_code == 0, (value, res)
        return [t["task_id"] for t in json.loads(res.stdout)["tasks"]]

    all_g1 = ["t20", "t15", "t10", "t05", "t00"]
    for value in (
        "2030-01-02T03:04:08",
        "2030-01-02T03:04:08Z",
        "2030-01-02T05:04:08+02:00",
        "2030-01-02 03:04:08",
    ):
        assert since(value) == ["t20", "t15"], value
    assert since("2030-01-02") == all_g1
    assert since("2h") == all_g1
    assert since("240m") == since("1d") == since("99999999999999999999d") == [*all_g1, "old"]

    for bad in ("yesterday", "2 h", "-2h", "²h", ""):
        res = gpuq("task", "list", "--since", bad)
        assert res.exit_code == 2, (bad, res)
        assert "--since" in res.stderr and "2h" in res.stderr and "2030-01-02T03:04:05" in res.stderr, res
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stdout + res.stderr, res
