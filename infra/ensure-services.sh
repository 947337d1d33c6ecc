#!/usr/bin/env bash
# Make sure Redis (127.0.0.1:6379) and MariaDB/MySQL (127.0.0.1:3306) answer on loopback, so that the test
# suite talks to real servers. Running servers are used as they are; missing ones are installed with apt-get
# (Debian/Ubuntu) and started. Exits non-zero with one clear line when that is impossible.
set -euo pipefail

REDIS_PORT="${GPUQ_TEST_REDIS_PORT:-6379}"
MYSQL_PORT="${GPUQ_TEST_MYSQL_PORT:-3306}"

say() { printf 'ensure-services: %s\n' "$*" >&2; }
answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  say "need root to run: $*"; return 1; fi; }
wait_for() { # port, name
  for _ in $(seq 1 60); do answers "$1" && return 0; sleep 0.5; done
  say "$2 did not start answering on 127.0.0.1:$1 within 30 s"; return 1
}
APT_UPDATED=""
apt_install() {
  command -v apt-get >/dev/null || { say "$1 is not installed and apt-get is not available: install $1 by hand"; return 1; }
  if [ -z "$APT_UPDATED" ]; then as_root apt-get update -qq; APT_UPDATED=1; fi
  say "installing $*"
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

if answers "$REDIS_PORT"; then
  say "Redis answers on 127.0.0.1:$REDIS_PORT"
else
  command -v redis-server >/dev/null || apt_install redis-server
  say "starting redis-server on 127.0.0.1:$REDIS_PORT"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/gpuq-test.log
  wait_for "$REDIS_PORT" Redis
fi

if answers "$MYSQL_PORT"; then
  say "MySQL/MariaDB answers on 127.0.0.1:$MYSQL_PORT"
else
  command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || apt_install mariadb-server
  say "starting mariadbd on 127.0.0.1:$MYSQL_PORT"
  as_root mkdir -p /run/mysqld
  as_root chown mysql:mysql /run/mysqld 2>/dev/null || true
  as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- \
    --user=mysql --bind-address=127.0.0.1 --port="$MYSQL_PORT"
  wait_for "$MYSQL_PORT" MariaDB
  # A fresh Debian install lets root in through the unix socket only; the tests connect over TCP.
  if command -v mariadb >/dev/null && ! mariadb -h127.0.0.1 -P"$MYSQL_PORT" -uroot -e 'SELECT 1' >/dev/null 2>&1; then
    as_root mariadb -uroot -e "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
      GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION; FLUSH PRIVILEGES;"
  fi
fi

# libfaketime runs one dispatcher of tests/faults/test_clock_skew.py 30 s off; without it that test is skipped.
if ! command -v faketime >/dev/null && command -v apt-get >/dev/null; then
  apt_install faketime || say "could not install faketime: the clock-skew test will be skipped"
fi
