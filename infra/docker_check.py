"""The compose stack's end-to-end check, run inside a dispatcher container by infra/test-docker.sh:

    docker compose exec -T dispatcher python - JOBS [--alone] < infra/docker_check.py

It pushes JOBS jobs through the Lambda handler (``producer.handler.lambda_handler``, as AWS would call it:
API Gateway v2 batches, SQS records, direct invocations) onto the stack's Redis, then polls the stack's
MariaDB until every task has ended, and fails unless each one finished exactly once: one attempt, recorded
once, and the simulated GPUs received exactly one request per task of every run so far, with no slot ever
oversubscribed. With ``--alone`` the other dispatcher is stopped, and every job of this run must have been
placed by the dispatcher in this container. (Which dispatcher places a job while both run is not fixed: the
one that took the free slots first keeps them busy by handing each freed slot to its next job, so "both
placed some" is a race, not a property; test-docker.sh runs each dispatcher alone once instead.) Prints one
JSON line of what it saw; exit 1 with the reason on stderr otherwise. Only the image's own packages are used,
so nothing is installed for it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.request
import uuid
from typing import Any, NoReturn

import sqlalchemy as sa

# The handler logs a line per enqueue (as it should in Lambda); here that would bury the check's own line.
os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "WARNING")
from producer.handler import lambda_handler  # after the log level is set

DEADLINE_SECONDS = 240.0
SIMGPU_STATS = "http://simgpu:9100/_stats?jobs=0"


def fail(reason: str) -> NoReturn:
    print(f"docker-check: FAILED: {reason}", file=sys.stderr)
    sys.exit(1)


def task(i: int) -> dict[str, Any]:
    return {"type": "start_transcribe", "data": {"s3_key": f"docker-check/{i}.wav"}}


def push(jobs: int) -> list[str]:
    """A third of the jobs each way: API Gateway v2 batches of 25, SQS records of one, direct batches."""
    ids: list[str] = []
    third = jobs // 3
    batch = [task(i) for i in range(third)]
    for start in range(0, len(batch), 25):
        answer = lambda_handler(
            {
                "version": "2.0",
                "routeKey": "POST /tasks",
                "rawPath": "/tasks",
                "headers": {"content-type": "application/json"},
                "requestContext": {"http": {"method": "POST", "path": "/tasks"}, "requestId": "docker-check"},
                "body": json.dumps({"tasks": batch[start : start + 25]}),
                "isBase64Encoded": False,
            },
            None,
        )
        if answer.get("statusCode") != 202:
            fail(f"API Gateway answered {answer}")
        ids += json.loads(answer["body"])["task_ids"]
    records = [
        {
            "messageId": str(uuid.uuid4()),
            "receiptHandle": "docker-check",
            "body": json.dumps(task(i)),
            "attributes": {"ApproximateReceiveCount": "1"},
            "messageAttributes": {},
            "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:gpuq-tasks",
            "awsRegion": "us-east-1",
        }
        for i in range(third, 2 * third)
    ]
    answer = lambda_handler({"Records": records}, None)
    if answer.get("batchItemFailures"):
        fail(f"SQS records not enqueued: {answer}")
    # The SQS answer names no ids: each record's task id is derived from its messageId, so read them back
    # from the database below by count; the direct route returns ids again.
    direct = lambda_handler({"tasks": [task(i) for i in range(2 * third, jobs)]}, None)
    if "task_ids" not in direct:
        fail(f"direct invocation answered {direct}")
    return ids + [str(t) for t in direct["task_ids"]]


def db_engine() -> sa.Engine:
    env = os.environ
    url = sa.URL.create(
        "mysql+pymysql",
        username=env["DB_USER"],
        password=env["DB_PASSWORD"],
        host=env["DB_HOST"],
        port=int(env.get("DB_PORT", "3306")),
        database=env["DB_NAME"],
    )
    return sa.create_engine(url, pool_pre_ping=True)


def task_ids(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return {str(r.task_id) for r in conn.execute(sa.text("SELECT task_id FROM tasks"))}


def wait_done(engine: sa.Engine, jobs: int) -> list[Any]:
    """Every task row, once ``jobs`` rows exist and none is still waiting or running."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    rows: list[Any] = []
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            rows = list(
                conn.execute(
                    sa.text(
                        "SELECT t.task_id, t.state, t.attempt, t.dispatcher_id,"
                        " (SELECT COUNT(*) FROM attempts a WHERE a.task_id = t.task_id) AS recorded"
                        " FROM tasks t"
                    )
                )
            )
        ended = [r for r in rows if r.state in ("finished", "failed", "cancelled")]
        if len(rows) >= jobs and len(ended) == len(rows):
            return rows
        time.sleep(0.5)
    states: dict[str, int] = {}
    for r in rows:
        states[r.state] = states.get(r.state, 0) + 1
    fail(f"not all {jobs} tasks ended within {DEADLINE_SECONDS:.0f} s: {len(rows)} rows, states {states}")


def main() -> None:
    args = sys.argv[1:]
    alone = "--alone" in args
    numbers = [a for a in args if a != "--alone"]
    jobs = int(numbers[0]) if numbers else 300
    started = time.monotonic()
    engine = db_engine()
    before = task_ids(engine)
    known = push(jobs)
    rows = wait_done(engine, len(before) + jobs)
    by_id = {r.task_id: r for r in rows}
    if len(rows) != len(before) + jobs:
        fail(f"{len(rows) - len(before)} new task rows for {jobs} jobs pushed")
    missing = [t for t in known if t not in by_id]
    if missing:
        fail(f"{len(missing)} acknowledged task ids have no row, e.g. {missing[:3]}")
    not_once = [r for r in rows if r.state != "finished" or r.attempt != 1 or r.recorded != 1]
    if not_once:
        sample = [tuple(r) for r in not_once[:3]]
        fail(f"{len(not_once)} not finished exactly once (id, state, attempt, by, recorded): {sample}")
    placers = {r.dispatcher_id for r in rows if r.task_id not in before}
    # A dispatcher's id starts with its host name, which in a container is the container's short id.
    me = socket.gethostname()
    if alone and any(not str(p).startswith(f"{me}-") for p in placers):
        fail(f"the other dispatcher is stopped, yet {sorted(placers)} placed jobs (this one is {me})")
    with urllib.request.urlopen(SIMGPU_STATS, timeout=5) as answer:
        totals = json.load(answer)["totals"]
    if totals["received"] != len(rows) or totals["oversubscriptions"] != 0:
        fail(
            f"the GPUs received {totals['received']} requests for {len(rows)} tasks in all, "
            f"oversubscribed {totals['oversubscriptions']} times"
        )
    print(
        json.dumps(
            {
                "jobs": jobs,
                "tasks_in_all": len(rows),
                "finished_once": len(rows),
                "placed_by": sorted(str(p) for p in placers),
                "gpu_requests": totals["received"],
                "seconds": round(time.monotonic() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
