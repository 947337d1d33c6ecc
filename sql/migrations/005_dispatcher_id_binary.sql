-- gpuq schema version 4 -> 5 (dispatcher ids compared byte for byte, as Redis compares its keys), MySQL 8 /
-- MariaDB 10.6+. Applied by the dispatcher itself at start (dispatcher/db/migrations.py, adopt_columns); this
-- file is for DBAs who upgrade by hand or review the change. Under the server's default collation two ids
-- differing only in case were one: a dispatcher recovering a dead id's unsent jobs could give back what a live
-- dispatcher of the other case held.

ALTER TABLE slots
    MODIFY dispatcher_id VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    MODIFY next_dispatcher_id VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL;
ALTER TABLE tasks MODIFY dispatcher_id VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL;
INSERT INTO gpuq_schema (version, applied_at) VALUES (5, UTC_TIMESTAMP(6));
