"""sql/: the named operator queries (parsed, and each run against MariaDB holding real rows) and schema.sql
(in step with dispatcher/db/schema.py, and a working schema when a DBA applies it by hand)."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, select, text

from dispatcher.cli.sql_queries import load, parse, sql_dir
from dispatcher.db.attempts import Backoff
from dispatcher.db.ddl import render
from dispatcher.db.dispatch import dispatch
from dispatcher.db.engine import init_schema, transaction, utcnow
from dispatcher.db.gpus import register_gpu, update_gpu
from dispatcher.db.schema import metadata, schema_version
from dispatcher.states import Outcome
from producer.job import Job
from tests.dispatcher.harness import ROOT
from tests.dispatcher.helpers import end_attempt
from tests.operators.test_cli import cells

SEED_LOAD_QUERY = (
    "SELECT gpu_id, COUNT(*) AS active_tasks FROM tasks WHERE state = 'processing' GROUP BY gpu_id"
)


def test_queries_file_parses_with_the_seed_query_first():
    queries = load()
    assert list(queries) == [
        "gpu_load",
        "gpu_slots",
        "running_by_age",
        "failures_last_hour",
        "gpu_utilisation",
        "slowest_tasks",
        "waiting_retries",
    ]
    assert queries["gpu_load"].sql == SEED_LOAD_QUERY
    assert queries["gpu_utilisation"].parameters == ["minutes"]
    assert queries["gpu_utilisation"].defaults == {"minutes": "60"}
    assert queries["gpu_utilisation"].ranges == {"minutes": (1, 5_256_000)}  # 10 years of minutes
    assert all(q.doc for q in queries.values())
    assert sql_dir() == ROOT / "sql"


def test_parser_blocks_descriptions_and_errors():
    queries = parse(
        "-- header, not a query\n\n-- name: a\n-- Says a.\n-- params: n=3, m = x\nSELECT :n, :m,\n"
        "-- an inner comment with :ignored\n  ':lit' FROM t;\n\n-- name: b\nSELECT 1;\n"
    )
    assert queries["a"].doc == "Says a."
    assert queries["a"].defaults == {"n": "3", "m": "x"}
    assert queries["a"].sql == "SELECT :n, :m,\n  ':lit' FROM t"
    assert queries["a"].parameters == [
        "n",
        "m",
        "lit",
    ]  # a literal ':lit' is the caller's problem, as in SQLAlchemy
    assert queries["b"].sql == "SELECT 1"
    with pytest.raises(ValueError, match="defined twice"):
        parse("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;")
    with pytest.raises(ValueError, match="has no SQL"):
        parse("-- name: a\n-- only words\n")


def test_a_parameter_range_is_read_with_its_default_and_a_default_outside_it_is_refused():
    (q,) = parse("-- name: a\n-- Says a.\n-- params: n=3 (1..10), m=x\nSELECT :n, :m;").values()
    assert (q.defaults, q.ranges) == ({"n": "3", "m": "x"}, {"n": (1, 10)})
    for params in ("n=0 (1..10)", "n=x (1..10)", "n=3 (5..1)"):
        with pytest.raises(ValueError, match="not within"):
            parse(f"-- name: a\n-- params: {params}\nSELECT :n;")


def test_gpu_utilisation_refuses_a_window_that_is_not_positive_or_past_ten_years(gpuq):
    """An outside trial: minutes=-5 printed negative busy seconds and 50 %/100 % utilisation, and
    minutes=99999999999999999999 no attempts at all; only "a whole number" was checked."""
    assert gpuq("db", "init").exit_code == 0
    for minutes in ("-5", "0", "5256001", "99999999999999999999", "9" * 5000):
        res = gpuq("sql", "gpu_utilisation", "-p", f"minutes={minutes}")
        assert res.exit_code == 2, (minutes[:30], res)
        assert "minutes" in res.stderr and "from 1 to 5256000" in res.stderr, res
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stdout + res.stderr
    for minutes in ("1", "5256000", " 60 "):
        res = gpuq("sql", "gpu_utilisation", "-p", f"minutes={minutes}")
        assert res.exit_code == 0 and "gpu_utilisation (0 rows)" in res.stdout, (minutes, res)
    assert "minutes=60 (1..5256000)" in gpuq("sql", "--list").stdout


def test_schema_sql_is_the_rendered_schema():
    on_disk = (ROOT / "sql" / "schema.sql").read_text(encoding="utf-8")
    assert on_disk == render(), "sql/schema.sql is out of date: run `make schema-sql`"


def statements(path: Path) -> list[str]:
    body = "\n".join(line for line in path.read_text().splitlines() if not line.startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]


def test_schema_sql_applied_by_hand_is_the_schema_the_dispatcher_expects(database_url):
    engine = create_engine(database_url)
    with engine.begin() as conn:
        for statement in statements(ROOT / "sql" / "schema.sql"):
            conn.exec_driver_sql(statement)
    insp = inspect(engine)
    assert set(insp.get_table_names()) == set(metadata.tables)
    for name, table in metadata.tables.items():
        assert [c["name"] for c in insp.get_columns(name)] == [c.name for c in table.columns], name
        assert insp.get_pk_constraint(name)["constrained_columns"] == [c.name for c in table.primary_key], (
            name
        )
        assert {i["name"] for i in insp.get_indexes(name)} >= {i.name for i in table.indexes}, name
    # a dispatcher starting on it finds nothing to create
    init_schema(engine)
    init_schema(engine)
    engine.dispose()


def test_dispatchers_starting_together_on_an_empty_database_all_start(database_url):
    """Found by the compose stack: two dispatchers starting at once both created the tables, and one died
    with "Table 'gpus' already exists"."""
    engines = [create_engine(database_url) for _ in range(4)]
    barrier = threading.Barrier(len(engines))
    errors: list[Exception] = []

    def start(engine) -> None:
        barrier.wait()
        try:
            init_schema(engine)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert set(inspect(engines[0]).get_table_names()) == set(metadata.tables)
    with engines[0].connect() as conn:
        assert len(conn.execute(select(schema_version)).all()) == 1
    for e in engines:
        e.dispose()


@pytest.fixture
def busy_history(database_url):
    """Two GPUs in two pools, with running, finished, failed and retrying tasks at known times."""
    engine = create_engine(database_url)
    init_schema(engine)
    now = utcnow()
    for gpu_id, pool, slots in (("g0", "default", 4), ("g1", "embed", 2)):
        transaction(
            engine,
            register_gpu,
            gpu_id=gpu_id,
            url=f"http://h:1/{gpu_id}",
            pool=pool,
            slot_count=slots,
            now=now,
        )

    def start(pool: str, ago: float, max_attempts: int = 1, lease: float = 3600) -> str:
        job = Job(task_id=str(uuid.uuid4()), type=f"t_{pool}", queue="q", data={})
        res = transaction(
            engine,
            dispatch,
            items=[(job, pool)],
            dispatcher_id="d",
            lease_seconds=lease,
            max_attempts=max_attempts,
            now=now - timedelta(seconds=ago),
        )
        assert len(res.placed) == 1
        return job.task_id

    def end(task_id: str, ago: float, outcome: Outcome, error: str | None = None) -> None:
        fin = end_attempt(
            engine,
            task_id,
            outcome=outcome,
            now=now - timedelta(seconds=ago),
            backoff=Backoff(3600, 3600),
            error=error,
        )
        assert fin.code == "applied"

    long_ago = start("embed", 7200)
    end(long_ago, 3000, Outcome.FINISHED)  # 4200 s, of which 600 s in the last hour
    a = start("default", 600)
    end(a, 300, Outcome.FINISHED)  # 300 s
    b = start("default", 120)
    end(b, 60, Outcome.FINISHED)  # 60 s
    for _ in range(2):
        f = start("embed", 100)
        end(f, 90, Outcome.FAILED, "GPU said 400: bad audio")  # 10 s each
    r = start("embed", 50, max_attempts=3, lease=5)  # a lease expiry applies only once the lease has run out
    end(r, 40, Outcome.EXPIRED, "no callback before the lease ran out")  # 10 s, then retrying
    running = [start("default", 30), start("default", 30), start("embed", 10)]
    yield engine, {"a": a, "b": b, "long_ago": long_ago, "retrying": r, "running": running}
    engine.dispose()


def run(engine, name: str, **params):
    with engine.connect() as conn:
        result = conn.execute(text(load()[name].sql), params)
        return [dict(row._mapping) for row in result]


@pytest.mark.slow  # 6 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_every_named_query_runs_on_mariadb_with_data(busy_history, gpuq):
    engine, ids = busy_history
    assert {r["gpu_id"]: r["active_tasks"] for r in run(engine, "gpu_load")} == {"g0": 2, "g1": 1}
    slots_view = {r["gpu_id"]: (r["busy"], int(r["cancel_pending"])) for r in run(engine, "gpu_slots")}
    assert {g: v for g, v in slots_view.items() if v[0]} == {"g0": (2, 0), "g1": (1, 0)}

    running = run(engine, "running_by_age")
    assert [r["task_id"] for r in running][-1] == ids["running"][2]  # the youngest last
    assert sorted(r["gpu_id"] for r in running) == ["g0", "g0", "g1"]
    assert all(r["running_seconds"] >= 10 for r in running)

    failures = {(r["outcome"], r["reason"]): r for r in run(engine, "failures_last_hour")}
    assert set(failures) == {
        ("failed", "GPU said 400: bad audio"),
        ("lease_expired", "no callback before the lease ran out"),
    }
    assert failures["failed", "GPU said 400: bad audio"]["attempts"] == 2

    util = {r["gpu_id"]: r for r in run(engine, "gpu_utilisation", minutes=60)}
    # g0: 300 + 60 ended, 2 x ~30 running; g1: 600 (clipped to the window) + 2 x 10 + 10 ended, ~10 running
    assert 420 <= float(util["g0"]["busy_seconds"]) <= 440
    assert 640 <= float(util["g1"]["busy_seconds"]) <= 660
    assert float(util["g0"]["utilisation_pct"]) == pytest.approx(100 * 420 / (4 * 3600), abs=0.2)
    assert (util["g0"]["attempts"], util["g1"]["attempts"]) == (2, 4)

    slowest = run(engine, "slowest_tasks")
    assert [r["task_id"] for r in slowest[:3]] == [ids["long_ago"], ids["a"], ids["b"]]
    assert float(slowest[0]["run_seconds"]) == pytest.approx(4200, abs=0.01)

    (waiting,) = run(engine, "waiting_retries")
    assert (waiting["task_id"], waiting["state"], waiting["attempt"], waiting["max_attempts"]) == (
        ids["retrying"],
        "retrying",
        1,
        3,
    )

    # and the same through the CLI
    for name in load():
        res = gpuq("sql", name)
        assert res.exit_code == 0, res
    lines = gpuq("sql", "gpu_load").stdout.splitlines()
    assert cells(next(line for line in lines if " g0 " in line)) == ["g0", "2"]
    assert "gpu_utilisation (2 rows)" in gpuq("sql", "gpu_utilisation", "-p", "minutes=5").stdout
    assert gpuq("sql", "nope").exit_code == 2
    assert gpuq("sql", "gpu_utilisation", "-p", "hours=1").exit_code == 2
    assert gpuq("sql", "gpu_utilisation", "-p", "minutes=abc").exit_code == 2  # not read as 0 by MySQL


def test_gpu_slots_reports_the_gpus_slot_count_after_a_shrink(busy_history):
    # GIVEN g0 (4 slots) running two jobs, shrunk to 1 slot while they run (`gpuq gpu set g0 --slots 1`):
    # the busy rows beyond the new count stay until their jobs end, and free ones left then stay too
    engine, _ = busy_history
    assert transaction(engine, update_gpu, gpu_id="g0", now=utcnow(), slot_count=1)
    # THEN gpu_slots says g0 has 1 slot, as placement does, with both jobs still busy (it counted the rows:
    # 2 or more; review of issue 16)
    view = {r["gpu_id"]: (int(r["busy"]), int(r["slots"])) for r in run(engine, "gpu_slots")}
    assert view["g0"] == (2, 1)
    assert view["g1"] == (1, 2)
