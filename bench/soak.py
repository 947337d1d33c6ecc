"""``make soak``: many jobs through two real dispatchers while faults are injected every few seconds, then an
audit. ``python -m bench.soak --jobs 100000`` (defaults: 100,000 jobs, a fault every 5 s); tests/faults/
test_soak.py runs ~1,000 of them in the suite.

Faults, in turn: a GPU answers 500 to half its jobs; every GPU loses 5% of its callbacks; the "victim"
dispatcher is killed with SIGKILL and restarted; a GPU goes down (503) and comes back. Each lasts until the
next. The "steady" dispatcher is never killed: its RSS is sampled to show growth over the run.

Reported: lost (a job with no final state), duplicates (a task the GPUs received more often than the
attempts the database gave it), slot drift (sampled every second and at the end), dead letters, RSS growth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pymysql
import redis
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from bench.soak_audit import describe_tasks, overlap_report, problems
from dispatcher.db.attempts import slot_drift
from dispatcher.db.engine import make_engine
from dispatcher.testing import DispatcherProcess
from producer.job import Job
from producer.keys import Keys
from simgpu.fleet import SimFleet

ROOT = Path(__file__).resolve().parents[1]
FAULTS = ("gpu_500", "lost_callbacks", "kill_dispatcher", "gpu_down")
BEARER = "soak-bearer"


@dataclass
class SoakConfig:
    jobs: int = 100_000
    rate: float = 500.0  # jobs pushed per second at most
    fault_every: float = 5.0
    gpus: int = 8
    service_time: str = "exp:0.02"
    redis_url: str = os.environ.get("SOAK_REDIS_URL", "redis://127.0.0.1:6379/0")
    mysql_url: str = os.environ.get("SOAK_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306")
    database_url: str | None = None  # a fresh database on mysql_url when None
    timeout: float = 3600.0
    stall: float = 120.0  # all jobs in, none finishing for this long: stop and audit (a stuck task is lost)
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gpuq-soak-")))


class Dispatcher(DispatcherProcess):
    """A soak dispatcher (dispatcher/testing.py) whose resident memory is sampled as the run goes."""

    def rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0


def _fresh_database(mysql_url: str) -> tuple[str, str]:
    url = make_url(mysql_url)
    name = f"gpuq_soak_{uuid.uuid4().hex[:8]}"
    conn = pymysql.connect(
        host=url.host, port=url.port or 3306, user=url.username, password=url.password or ""
    )
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    conn.close()
    return name, f"{mysql_url.rstrip('/')}/{name}"


def _drop_database(mysql_url: str, name: str) -> None:
    url = make_url(mysql_url)
    conn = pymysql.connect(
        host=url.host, port=url.port or 3306, user=url.username, password=url.password or ""
    )
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


class Faults:
    """One fault at a time, each undone when the next begins."""

    def __init__(self, fleet: SimFleet, victim: Dispatcher) -> None:
        self.fleet, self.victim = fleet, victim
        self.count: Counter[str] = Counter()
        self._turn = 0

    def next(self) -> str:
        self.fleet.configure(faults=[])
        kind = FAULTS[self._turn % len(FAULTS)]
        self._turn += 1
        if kind == "gpu_500":
            self.fleet.configure(gpu="g0", faults=["http_500@0.5"])
        elif kind == "lost_callbacks":
            self.fleet.configure(faults=["lost_callback@0.05"])
        elif kind == "kill_dispatcher":
            self.victim.kill()
            self.victim.start()
        elif kind == "gpu_down":
            self.fleet.configure(gpu="g1", faults=["down"])
        self.count[kind] += 1
        return kind


def _states(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(dict(conn.execute(text("SELECT state, COUNT(*) FROM tasks GROUP BY state")).all()))


def _redis_leftovers(rds: redis.Redis, prefix: str, queue: str) -> int:
    """Jobs still in the queue, a processing list or a parked list."""
    total = sum(int(rds.llen(q)) for q in (queue, f"{{{queue}}}:high", f"{{{queue}}}:low"))
    for pattern in (f"{prefix}*:proc:*", f"{prefix}*:parked:*"):
        total += sum(int(rds.llen(k)) for k in rds.scan_iter(pattern))
    return total


def run_soak(cfg: SoakConfig, progress: bool = True) -> dict[str, Any]:
    started_at = datetime.now(UTC)
    db_name = None
    database_url = cfg.database_url
    if database_url is None:
        db_name, database_url = _fresh_database(cfg.mysql_url)
    prefix = f"gpuq-soak-{uuid.uuid4().hex[:6]}:"
    queue = f"soak-{uuid.uuid4().hex[:6]}"
    rds = redis.Redis.from_url(cfg.redis_url)
    fleet = SimFleet(gpus=cfg.gpus, service_time=cfg.service_time, token=BEARER, seed=11).start()
    common = {
        "DATABASE_URL": database_url,
        "REDIS_URL": cfg.redis_url,
        "REDIS_KEY_PREFIX": prefix,
        "TASK_QUEUES": queue,
        "GPU_ENDPOINTS": fleet.gpu_endpoints(),
        # The audit counts a request over simgpu's slots: the dispatchers must be given that many, not what a
        # .env or the shell says (more would be reported as oversubscription, fewer would hide a real one).
        "SLOTS_PER_GPU": str(fleet.config.behaviour.slots),
        "CALLBACK_SECRET": "soak-callback-secret-0123456789",
        "BEARER_TOKEN": BEARER,
        "CALLBACK_HOST": "127.0.0.1",
        "TASK_TIMEOUT_SECONDS": "2",
        "MAX_ATTEMPTS": "20",
        "RETRY_BACKOFF_SECONDS": "0.05",
        "RETRY_BACKOFF_MAX_SECONDS": "1",
        "GPU_FAILURE_THRESHOLD": "3",
        "GPU_PROBE_SECONDS": "0.5",
        "LOG_LEVEL": "WARNING",
    }
    steady = Dispatcher(common, name="steady", workdir=cfg.log_dir)
    victim = Dispatcher(common, name="victim", workdir=cfg.log_dir)
    engine = make_engine(database_url, pool_size=2)
    ids: list[str] = []
    rss: list[tuple[int, float]] = []
    drift_samples = 0
    faults = Faults(fleet, victim)
    try:
        steady.start()
        victim.start()
        t0 = time.monotonic()
        next_fault = t0 + cfg.fault_every
        pushed_until = t0
        deadline = t0 + cfg.timeout
        last_done, progress_at = -1, t0
        while True:
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"soak not done after {cfg.timeout} s: {dict(_states(engine))}")
            # arrivals at `rate`, in batches, until all jobs are in
            if len(ids) < cfg.jobs:
                due = min(cfg.jobs, int((now - t0) * cfg.rate) + 1) - len(ids)
                if due > 0:
                    pipe = rds.pipeline(transaction=False)
                    for _ in range(due):
                        job = Job(task_id=str(uuid.uuid4()), type="soak", queue=queue, data={"n": len(ids)})
                        ids.append(job.task_id)
                        pipe.rpush(queue, job.to_redis())
                    pipe.execute()
                    pushed_until = now
            states = _states(engine)
            done = states["finished"] + states["failed"]
            if len(ids) >= cfg.jobs and done >= cfg.jobs:
                break
            if done != last_done:
                last_done, progress_at = done, now
            elif len(ids) >= cfg.jobs and now - progress_at > cfg.stall:
                break  # stuck: the audit names what is not done
            if now >= next_fault:
                kind = faults.next()
                next_fault = time.monotonic() + cfg.fault_every
                if progress:
                    print(f"[{now - t0:7.1f}s] {done:>7}/{cfg.jobs} done, fault: {kind}", flush=True)
            with engine.connect() as conn:
                drift_samples += bool(slot_drift(conn))
            rss.append((done, steady.rss_mb()))
            time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
        fleet.configure(faults=[])
        elapsed = time.monotonic() - t0
        # after the last kill, the dead process's processing list is swept once its heartbeat expires
        settle_until = time.monotonic() + 60
        while _redis_leftovers(rds, prefix, queue) and time.monotonic() < settle_until:
            time.sleep(0.5)
        report = _audit(
            engine,
            rds=rds,
            prefix=prefix,
            queue=queue,
            ids=ids,
            fleet=fleet,
            rss=rss,
            drift_samples=drift_samples,
            faults=faults,
            elapsed=elapsed,
            cfg=cfg,
        )
        report["started_at"] = started_at.isoformat(timespec="seconds")
        report["pushed_for_seconds"] = round(pushed_until - t0, 1)
        return report
    finally:
        steady.stop()
        victim.stop()
        fleet.stop()
        engine.dispose()
        for k in rds.scan_iter(f"{prefix}*"):
            rds.delete(k)
        rds.delete(queue, f"{{{queue}}}:high", f"{{{queue}}}:low")
        rds.close()
        if db_name is not None:
            _drop_database(cfg.mysql_url, db_name)


def _audit(
    engine: Engine,
    *,
    rds: redis.Redis,
    prefix: str,
    queue: str,
    ids: list[str],
    fleet: SimFleet,
    rss: list[tuple[int, float]],
    drift_samples: int,
    faults: Faults,
    elapsed: float,
    cfg: SoakConfig,
) -> dict[str, Any]:
    with engine.connect() as conn:
        rows: dict[str, str] = {r[0]: r[1] for r in conn.execute(text("SELECT task_id, state FROM tasks"))}
        attempts: dict[str, int] = {
            r[0]: int(r[1]) for r in conn.execute(text("SELECT task_id, attempt FROM tasks"))
        }
        outcomes: dict[str, int] = {
            r[0]: int(r[1])
            for r in conn.execute(text("SELECT outcome, COUNT(*) FROM attempts GROUP BY outcome"))
        }
        drift_end = len(slot_drift(conn))
        busy = conn.execute(text("SELECT COUNT(*) FROM slots WHERE task_id IS NOT NULL")).scalar_one()
        stats = fleet.stats()
        overlaps = overlap_report(conn, stats)
    received = Counter(j["task_id"] for j in stats["jobs"])
    pairs = Counter((j["task_id"], j["attempt"]) for j in stats["jobs"])
    lost = [t for t in ids if rows.get(t) not in ("finished", "failed")]
    warm = next((mb for done, mb in rss if done >= len(ids) // 10), rss[0][1] if rss else 0.0)
    return {
        "jobs": len(ids),
        "seconds": round(elapsed, 1),
        "jobs_per_second": round(len(ids) / elapsed, 1),
        "faults": dict(faults.count),
        "states": dict(Counter(rows.get(t, "missing") for t in ids)),
        "attempt_outcomes": {str(k): int(v) for k, v in outcomes.items()},
        "lost": len(lost),
        "lost_tasks": describe_tasks(engine, lost[:20]),
        "duplicates_beyond_attempts": sum(1 for t, n in received.items() if n > attempts.get(t, 0)),
        "same_attempt_delivered_twice": sum(1 for n in pairs.values() if n > 1),
        "slot_drift_end": drift_end,
        "slot_drift_samples": drift_samples,
        "busy_slots_end": int(busy),
        "dead_letters": int(rds.llen(Keys(prefix).dead)),
        "left_in_redis": _redis_leftovers(rds, prefix, queue),
        **overlaps,
        "rss_mb_after_warmup": round(warm, 1),
        "rss_mb_end": round(rss[-1][1], 1) if rss else 0.0,
        "rss_growth_mb": round((rss[-1][1] - warm) if rss else 0.0, 1),
        "log_dir": str(cfg.log_dir),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "config": {
            "rate": cfg.rate,
            "fault_every": cfg.fault_every,
            "gpus": cfg.gpus,
            "service": cfg.service_time,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=500.0, help="jobs pushed per second at most")
    parser.add_argument("--fault-every", type=float, default=5.0, help="seconds between faults")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    report = run_soak(
        SoakConfig(jobs=args.jobs, rate=args.rate, fault_every=args.fault_every, gpus=args.gpus)
    )
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    bad = problems(report)
    for line in bad:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
