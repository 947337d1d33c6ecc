"""Tables, in SQLAlchemy Core so the same definitions serve MariaDB/MySQL and the embedded SQLite mode.

``sql/schema.sql`` is this file rendered as MySQL DDL (a test keeps the two in step).

- ``gpus``: one row per GPU service: its URL, pool, slot count, and health.
- ``slots``: one row per slot. A slot is taken while ``task_id`` is set; ``task_id`` is UNIQUE, so a task
  holds at most one slot, and the (gpu_id, slot_index) primary key means a GPU never has more running jobs
  than it has slot rows. Claims are conditional UPDATEs (``… WHERE task_id IS NULL``), so two dispatchers
  can never book one slot: the database, not a process, decides.
- ``tasks``: the seed's columns (task_id, queue, state, type, gpu_id, slot_index) and what retries, leases
  and the HTTP API need. ``state = 'processing'`` exactly while the task holds a slot.
- ``attempts``: one row per ended attempt, for operators (where, how long, how it ended).

Pull GPUs (``gpus/pull.py``, version 2): ``gpus.agent_token_hash`` (UNIQUE: a token names one GPU) and
``gpus.agent_seen_until`` (its agent was polling until then); ``tasks.fetched_attempt`` is the attempt an
agent has taken (a job placed on a pull GPU and not yet fetched has ``fetched_attempt <> attempt``).
Version 3: ``gpus.cancel_url``, where cancels go when the GPU's service takes them elsewhere than
``<url>/cancel`` (``gpuq gpu set NAME --cancel-url URL``; NULL: ``<url>/cancel``).
Version 4: a slot's standby job (``db/standby.py``): ``slots.next_task_id`` (UNIQUE), ``next_attempt`` and
``next_dispatcher_id`` name the job recorded (``tasks.state = 'standby'``) to take the slot the moment its
holder ends; every statement that frees a slot gives it to its standby instead. Never set on a free slot.
Upgrades from earlier versions: ``dispatcher/db/migrations.py`` and ``sql/migrations/``.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects import mysql

SCHEMA_VERSION = 5

metadata = MetaData()

# DATETIME(6) on MySQL: microseconds matter for latency figures; all times are naive UTC.
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
LongText = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
# Task ids compare byte for byte, as in Redis, the producer's idempotency keys and SQLite. MySQL's default
# collations are case- and accent-insensitive: "Job-1" and "job-1" would be one primary key there, the
# second dropped as a copy of the first, or (both in one batch) a duplicate-key error on slots.task_id.
TaskId = String(255).with_variant(
    mysql.VARCHAR(255, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb"
)
#: A dispatcher's id, compared byte for byte as Redis compares its keys: under the server's default collation
#: MariaDB took ``GPU-BOX-x`` for ``gpu-box-x``, so a recovery standing in for a dead id gave back what a
#: live one of the other case held and had sent (an outside review; schema version 5).
DispatcherId = String(128).with_variant(
    mysql.VARCHAR(128, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb"
)

schema_version = Table(
    "gpuq_schema",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("applied_at", Timestamp, nullable=False),
)

gpus = Table(
    "gpus",
    metadata,
    Column("gpu_id", String(64), primary_key=True),
    Column("url", String(2048), nullable=False),
    Column("pool", String(64), nullable=False, server_default="default"),
    Column("slots", Integer, nullable=False),
    Column("state", String(16), nullable=False, server_default="active"),
    Column("healthy", Boolean, nullable=False, server_default="1"),
    Column("consecutive_failures", Integer, nullable=False, server_default="0"),
    Column("down_until", Timestamp, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    Column("agent_token_hash", String(64), nullable=True),
    Column("agent_seen_until", Timestamp, nullable=True),
    Column("cancel_url", String(2048), nullable=True),
    Index("idx_gpus_agent_token", "agent_token_hash", unique=True),
    mysql_engine="InnoDB",
    mysql_charset="utf8mb4",  # not the server's default: latin1 on older servers refuses most text
)

slots = Table(
    "slots",
    metadata,
    Column("gpu_id", String(64), ForeignKey("gpus.gpu_id", ondelete="CASCADE"), primary_key=True),
    Column("slot_index", Integer, primary_key=True, autoincrement=False),
    Column("task_id", TaskId, nullable=True, unique=True),
    Column("attempt", Integer, nullable=True),
    Column("claimed_at", Timestamp, nullable=True),
    Column("lease_expires_at", Timestamp, nullable=True),
    Column("dispatcher_id", DispatcherId, nullable=True),
    Column("next_task_id", TaskId, nullable=True),
    Column("next_attempt", Integer, nullable=True),
    Column("next_dispatcher_id", DispatcherId, nullable=True),
    Index("idx_slots_lease", "lease_expires_at"),
    Index("idx_slots_next_task_id", "next_task_id", unique=True),
    mysql_engine="InnoDB",
    mysql_charset="utf8mb4",  # not the server's default: latin1 on older servers refuses most text
)

tasks = Table(
    "tasks",
    metadata,
    Column("task_id", TaskId, primary_key=True),
    Column("queue", String(100), nullable=False),
    Column("state", String(20), nullable=False),
    Column("type", String(50), nullable=False),
    Column("gpu_id", String(64), nullable=True),
    Column("slot_index", Integer, nullable=True),
    Column("pool", String(64), nullable=False, server_default="default"),
    Column("priority", String(8), nullable=False, server_default="normal"),
    Column("data", LongText, nullable=False),
    Column("attempt", Integer, nullable=False, server_default="0"),
    Column("max_attempts", Integer, nullable=False),
    Column("run_after", Timestamp, nullable=True),
    Column("last_callback", String(16), nullable=True),
    Column("dispatcher_id", DispatcherId, nullable=True),
    Column("error", Text, nullable=True),
    Column("result", LongText, nullable=True),
    Column("enqueued_at", Timestamp, nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("started_at", Timestamp, nullable=True),
    Column("finished_at", Timestamp, nullable=True),
    Column("updated_at", Timestamp, nullable=False),
    Column("fetched_attempt", Integer, nullable=True),
    Index("idx_tasks_state", "state"),
    Index("idx_tasks_gpu_id", "gpu_id"),
    Index("idx_tasks_type", "type"),
    Index("idx_tasks_state_run_after", "state", "run_after"),
    # (created_at, task_id) is the keyset of GET /tasks pages (dispatcher/db/listing.py)
    Index("idx_tasks_created_at", "created_at", "task_id"),
    mysql_engine="InnoDB",
    mysql_charset="utf8mb4",  # not the server's default: latin1 on older servers refuses most text
)

attempts = Table(
    "attempts",
    metadata,
    Column("task_id", TaskId, primary_key=True),
    Column("attempt", Integer, primary_key=True, autoincrement=False),
    Column("gpu_id", String(64), nullable=True),
    Column("slot_index", Integer, nullable=True),
    Column("started_at", Timestamp, nullable=True),
    Column("ended_at", Timestamp, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("error", Text, nullable=True),
    # (ended_at, outcome) covers the operators' windows: throughput by outcome, recent failures
    Index("idx_attempts_ended_at", "ended_at", "outcome"),
    Index("idx_attempts_gpu_ended", "gpu_id", "ended_at"),
    mysql_engine="InnoDB",
    mysql_charset="utf8mb4",  # not the server's default: latin1 on older servers refuses most text
)
