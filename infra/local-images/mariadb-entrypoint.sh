#!/bin/sh
# First start on an empty volume: create the system tables, then the database, the user and the root password
# from MARIADB_DATABASE / MARIADB_USER / MARIADB_PASSWORD / MARIADB_ROOT_PASSWORD, with networking off so the
# healthcheck (TCP) stays red until the server that clients will use is up.
set -eu
if [ "${1:-}" != mariadbd ]; then exec "$@"; fi
chown -R mysql:mysql /var/lib/mysql /run/mysqld
if [ ! -d /var/lib/mysql/mysql ]; then
  mariadb-install-db --user=mysql --datadir=/var/lib/mysql --auth-root-authentication-method=normal \
    --skip-test-db >/dev/null
  mariadbd --user=mysql --skip-networking --socket=/run/mysqld/init.sock &
  pid=$!
  i=0
  until mariadb-admin --socket=/run/mysqld/init.sock ping >/dev/null 2>&1; do
    i=$((i + 1)); [ "$i" -lt 300 ] || { echo "mariadb-entrypoint: init server did not start" >&2; exit 1; }
    sleep 0.1
  done
  # Single quotes in the values would break the SQL: refuse them rather than build a broken user.
  for v in "${MARIADB_DATABASE:-}" "${MARIADB_USER:-}" "${MARIADB_PASSWORD:-}" "${MARIADB_ROOT_PASSWORD:-}"; do
    case "$v" in *"'"*|*'\'*) echo "mariadb-entrypoint: quotes and backslashes are not allowed in MARIADB_*" >&2; exit 2;; esac
  done
  {
    echo "DELETE FROM mysql.global_priv WHERE User = '';"
    echo "ALTER USER 'root'@'localhost' IDENTIFIED BY '${MARIADB_ROOT_PASSWORD:-}';"
    echo "CREATE USER 'root'@'%' IDENTIFIED BY '${MARIADB_ROOT_PASSWORD:-}';"
    echo "GRANT ALL PRIVILEGES ON *.* TO 'root'@'%' WITH GRANT OPTION;"
    if [ -n "${MARIADB_DATABASE:-}" ]; then
      echo "CREATE DATABASE IF NOT EXISTS \`${MARIADB_DATABASE}\`;"
    fi
    if [ -n "${MARIADB_USER:-}" ]; then
      echo "CREATE USER '${MARIADB_USER}'@'%' IDENTIFIED BY '${MARIADB_PASSWORD:-}';"
      [ -z "${MARIADB_DATABASE:-}" ] || echo "GRANT ALL PRIVILEGES ON \`${MARIADB_DATABASE}\`.* TO '${MARIADB_USER}'@'%';"
    fi
    echo "FLUSH PRIVILEGES;"
  } | mariadb --socket=/run/mysqld/init.sock -uroot
  mariadb-admin --socket=/run/mysqld/init.sock -uroot --password="${MARIADB_ROOT_PASSWORD:-}" shutdown
  wait "$pid"
fi
shift
exec mariadbd --user=mysql --bind-address=0.0.0.0 --port=3306 "$@"
