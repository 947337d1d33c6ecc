-- gpuq schema version 3 -> 4 (a slot's standby job, docs/standby.md), MySQL 8 / MariaDB 10.6+.
-- Applied by the dispatcher itself at start (dispatcher/db/migrations.py); this file is for DBAs who upgrade
-- by hand or review the change. It only adds: NULL everywhere means no standby, as before.

ALTER TABLE slots ADD COLUMN next_task_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
ALTER TABLE slots ADD COLUMN next_attempt INTEGER;
ALTER TABLE slots ADD COLUMN next_dispatcher_id VARCHAR(128);
CREATE UNIQUE INDEX idx_slots_next_task_id ON slots (next_task_id);
INSERT INTO gpuq_schema (version, applied_at) VALUES (4, UTC_TIMESTAMP(6));
