-- gpuq schema version 5, MySQL 8 / MariaDB 10.6+ (InnoDB). Generated from
-- dispatcher/db/schema.py by `make schema-sql`: edit that file, not this one.
--
-- tasks.state: processing, finished, failed, cancelled, retrying, scheduled, queued, standby.
--   processing = holds a slot (gpu_id, slot_index); finished / failed / cancelled are final;
--   retrying = waits for its backoff (run_after); scheduled = waits for its start time (run_after);
--   queued = back in Redis after a retry or schedule.
-- attempts.outcome: finished, failed, failed_retry, lease_expired, cancelled, gpu_refused, not_sent, never_sent.
-- slots.task_id is UNIQUE and set exactly while a task runs there; the (gpu_id, slot_index) key caps a GPU's
-- running jobs at its slot rows.

CREATE TABLE attempts (
    task_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    attempt INTEGER NOT NULL,
    gpu_id VARCHAR(64),
    slot_index INTEGER,
    started_at DATETIME(6),
    ended_at DATETIME(6) NOT NULL,
    outcome VARCHAR(16) NOT NULL,
    error TEXT,
    PRIMARY KEY (task_id, attempt)
)ENGINE=InnoDB CHARSET=utf8mb4;

CREATE INDEX idx_attempts_ended_at ON attempts (ended_at, outcome);

CREATE INDEX idx_attempts_gpu_ended ON attempts (gpu_id, ended_at);

CREATE TABLE gpuq_schema (
    version INTEGER NOT NULL,
    applied_at DATETIME(6) NOT NULL,
    PRIMARY KEY (version)
);

CREATE TABLE gpus (
    gpu_id VARCHAR(64) NOT NULL,
    url VARCHAR(2048) NOT NULL,
    pool VARCHAR(64) NOT NULL DEFAULT 'default',
    slots INTEGER NOT NULL,
    state VARCHAR(16) NOT NULL DEFAULT 'active',
    healthy BOOL NOT NULL DEFAULT '1',
    consecutive_failures INTEGER NOT NULL DEFAULT '0',
    down_until DATETIME(6),
    last_error TEXT,
    created_at DATETIME(6) NOT NULL,
    updated_at DATETIME(6) NOT NULL,
    agent_token_hash VARCHAR(64),
    agent_seen_until DATETIME(6),
    cancel_url VARCHAR(2048),
    PRIMARY KEY (gpu_id)
)ENGINE=InnoDB CHARSET=utf8mb4;

CREATE UNIQUE INDEX idx_gpus_agent_token ON gpus (agent_token_hash);

CREATE TABLE tasks (
    task_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    queue VARCHAR(100) NOT NULL,
    state VARCHAR(20) NOT NULL,
    type VARCHAR(50) NOT NULL,
    gpu_id VARCHAR(64),
    slot_index INTEGER,
    pool VARCHAR(64) NOT NULL DEFAULT 'default',
    priority VARCHAR(8) NOT NULL DEFAULT 'normal',
    data LONGTEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT '0',
    max_attempts INTEGER NOT NULL,
    run_after DATETIME(6),
    last_callback VARCHAR(16),
    dispatcher_id VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin,
    error TEXT,
    result LONGTEXT,
    enqueued_at DATETIME(6),
    created_at DATETIME(6) NOT NULL,
    started_at DATETIME(6),
    finished_at DATETIME(6),
    updated_at DATETIME(6) NOT NULL,
    fetched_attempt INTEGER,
    PRIMARY KEY (task_id)
)ENGINE=InnoDB CHARSET=utf8mb4;

CREATE INDEX idx_tasks_created_at ON tasks (created_at, task_id);

CREATE INDEX idx_tasks_gpu_id ON tasks (gpu_id);

CREATE INDEX idx_tasks_state ON tasks (state);

CREATE INDEX idx_tasks_state_run_after ON tasks (state, run_after);

CREATE INDEX idx_tasks_type ON tasks (type);

CREATE TABLE slots (
    gpu_id VARCHAR(64) NOT NULL,
    slot_index INTEGER NOT NULL,
    task_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin,
    attempt INTEGER,
    claimed_at DATETIME(6),
    lease_expires_at DATETIME(6),
    dispatcher_id VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin,
    next_task_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin,
    next_attempt INTEGER,
    next_dispatcher_id VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin,
    PRIMARY KEY (gpu_id, slot_index),
    FOREIGN KEY(gpu_id) REFERENCES gpus (gpu_id) ON DELETE CASCADE,
    UNIQUE (task_id)
)ENGINE=InnoDB CHARSET=utf8mb4;

CREATE INDEX idx_slots_lease ON slots (lease_expires_at);

CREATE UNIQUE INDEX idx_slots_next_task_id ON slots (next_task_id);
