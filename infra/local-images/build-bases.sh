#!/usr/bin/env bash
# Build, on a machine that reaches Debian's packages but no image registry, the base images the compose stack
# needs: a Debian bookworm rootfs made by mmdebstrap (`docker import`), the Python base tagged with the name
# infra/Dockerfile uses (python:3.11-slim-bookworm: Debian's Python 3.11 with pip and venv, laid out like the
# official image), and Redis and MariaDB images built from Debian's packages. An image already present is
# reused while the files it was built from are unchanged (each image carries their hash in its label
# gpuq.local-images), so only the first run pays (a few minutes); GPUQ_REBUILD_BASES=1 rebuilds them all.
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
hash_of() { cat "$@" | sha256sum | cut -c1-16; }
have() { # tag, key: the image exists and was built from these very files
  [ -z "${GPUQ_REBUILD_BASES:-}" ] &&
    [ "$(docker image inspect -f '{{index .Config.Labels "gpuq.local-images"}}' "$1" 2>/dev/null)" = "$2" ]
}

# The host CA bundle goes into the image (below): a new one means a new base.
DEBIAN_KEY="$(hash_of build-bases.sh /etc/ssl/certs/ca-certificates.crt)"
if have "$DEBIAN_TAG" "$DEBIAN_KEY"; then
  say "$DEBIAN_TAG present"
else
  if ! command -v mmdebstrap >/dev/null; then
    say "installing mmdebstrap"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null
  fi
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
        --change "LABEL gpuq.local-images=$DEBIAN_KEY" \
        - "$DEBIAN_TAG" >/dev/null
fi

build() { # tag, dockerfile, files it copies...
  local tag=$1 dockerfile=$2 key
  key="$(hash_of "${@:2}" <(echo "$DEBIAN_KEY"))"
  if have "$tag" "$key"; then say "$tag present"; return; fi
  say "building $tag from $dockerfile"
  docker build -q -f "$dockerfile" --build-arg "BASE=$DEBIAN_TAG" --label "gpuq.local-images=$key" \
    -t "$tag" . >/dev/null
}
build "$PYTHON_TAG" python.Dockerfile
build "$REDIS_TAG" redis.Dockerfile
build "$MARIADB_TAG" mariadb.Dockerfile mariadb-entrypoint.sh mariadb-healthcheck.sh
