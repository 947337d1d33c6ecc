#!/bin/sh
# Stands in for the official image's healthcheck.sh: whatever checks are asked for (--connect,
# --innodb_initialized), healthy means the server answers over TCP, which it does only after the first-start
# setup (mariadb-entrypoint.sh runs that with networking off).
exec mariadb-admin --protocol=tcp -h127.0.0.1 -P3306 -uroot --password="${MARIADB_ROOT_PASSWORD:-}" ping >/dev/null 2>&1
