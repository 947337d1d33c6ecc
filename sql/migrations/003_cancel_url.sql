-- gpuq schema version 2 -> 3 (a GPU's own cancel URL, SPEC §4), MySQL 8 / MariaDB 10.6+.
-- Applied by the dispatcher itself at start (dispatcher/db/migrations.py); this file is for DBAs who upgrade
-- by hand or review the change. It only adds: NULL keeps the default, cancels go to <GPU url>/cancel.

ALTER TABLE gpus ADD COLUMN cancel_url VARCHAR(2048);
INSERT INTO gpuq_schema (version, applied_at) VALUES (3, UTC_TIMESTAMP(6));
