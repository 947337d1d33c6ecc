-- gpuq schema version 1 -> 2 (pull GPUs, SPEC §9), MySQL 8 / MariaDB 10.6+.
-- The dispatcher applies this itself at start (dispatcher/db/migrations.py adds whatever column or index
-- of dispatcher/db/schema.py a database lacks, on MySQL and SQLite alike); this file is for DBAs who
-- upgrade by hand or review the change. Every statement only adds: no data is rewritten.

ALTER TABLE gpus ADD COLUMN agent_token_hash VARCHAR(64);
ALTER TABLE gpus ADD COLUMN agent_seen_until DATETIME(6);
CREATE UNIQUE INDEX idx_gpus_agent_token ON gpus (agent_token_hash);
ALTER TABLE tasks ADD COLUMN fetched_attempt INTEGER;
INSERT INTO gpuq_schema (version, applied_at) VALUES (2, UTC_TIMESTAMP(6));
