#!/usr/bin/env bash
# Build, on a machine that reaches Debian's packages but no image registry, the base images the compose stack
# needs: a Debian bookworm rootfs made by mmdebstrap (`docker import`), the Python base tagged with the name
# infra/Dockerfile uses (python:3.11-slim-bookworm: Debian's Python 3.11 with pip and venv, laid out like the
# official image), and Redis and MariaDB images built from Debian's packages. An image already present is
# reused, so only the first run pays (about a minute); GPUQ_REBUILD_BASES=1 rebuilds them all.
# Users who can pull from Docker Hub need none of this: compose.yaml names the official images.
set -euo pipefail
cd "$(dirname "$0")"

DEBIAN_TAG=gpuq-local/debian:bookworm
PYTHON_TAG=python:3.11-slim-bookworm
REDIS_TAG=gpuq-local/redis:bookworm
MARIADB_TAG=gpuq-local/mariadb:bookworm
MIRROR=${GPUQ_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${GPUQ_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}

say() { printf 'build-bases: %s\n' "$*" >&2; }
have() { [ -z "${GPUQ_REBUILD_BASES:-}" ] && docker image inspect "$1" >/dev/null 2>&1; }

if have "$DEBIAN_TAG"; then
  say "$DEBIAN_TAG present"
else
  say "building $DEBIAN_TAG with mmdebstrap"
  # The build host's CA bundle goes in beside Debian's own: where TLS to PyPI passes through a proxy with its
  # own CA, pip inside the builds must trust what the host trusts. Debian's bundle stays as it is.
  # Docs, man pages and locales are left out (as in Debian's slim images).
  mmdebstrap --variant=minbase --quiet \
    --include=ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --customize-hook='mkdir -p "$1/usr/local/share/gpuq-build-host" && cp /etc/ssl/certs/ca-certificates.crt "$1/usr/local/share/gpuq-build-host/ca-certificates.crt"' \
    bookworm - \
    "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" "deb $SECURITY bookworm-security main" \
    | docker import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV SSL_CERT_FILE=/usr/local/share/gpuq-build-host/ca-certificates.crt' \
        --change 'ENV PIP_CERT=/usr/local/share/gpuq-build-host/ca-certificates.crt' \
        --change 'CMD ["bash"]' \
        - "$DEBIAN_TAG" >/dev/null
fi

build() { # tag, dockerfile
  if have "$1"; then say "$1 present"; return; fi
  say "building $1 from $2"
  docker build -q -f "$2" --build-arg "BASE=$DEBIAN_TAG" -t "$1" . >/dev/null
}
build "$PYTHON_TAG" python.Dockerfile
build "$REDIS_TAG" redis.Dockerfile
build "$MARIADB_TAG" mariadb.Dockerfile
