#!/usr/bin/env bash
# `make sam-check`: `sam validate --lint` and `sam build` of template.yaml, then the built handler imported and
# invoked from the build folder alone (tests/check_sam_build.py). Usage: sam-check.sh SAM PYTHON SAM_VERSION.
#
# A validated build is kept under ~/.cache/gpuq/sam-build/<key>, the key a hash of everything the build is
# made of (the SAM version, template.yaml, every file of producer/ including its requirements.txt and
# Makefile), so a run whose inputs are unchanged reuses it instead of linting and building again (~1-2 min on
# a loaded machine, most of it pip). The import check runs on every run all the same. A build is cached only
# once that check passed, so a failure is never remembered.
set -euo pipefail
SAM="$1" PY="$2" SAM_VERSION="$3"
cd "$(dirname "$0")/.."

key=$( (echo "sam $SAM_VERSION"; cat template.yaml
        find producer -maxdepth 1 -type f ! -name '*.pyc' | LC_ALL=C sort | while read -r f; do echo "== $f"; cat "$f"; done
       ) | sha256sum | cut -c1-16)
cache="${GPUQ_SAM_CACHE:-$HOME/.cache/gpuq/sam-build}"
build="$cache/$key"

if [ -f "$build/.checked" ]; then
  echo "sam-check: template.yaml and producer/ as in a build already validated and checked ($build): reusing it"
  "$PY" tests/check_sam_build.py "$build"
  exit 0
fi

"$SAM" validate --lint --region us-east-1
rm -rf .aws-sam
"$SAM" build --region us-east-1 >/dev/null
"$PY" tests/check_sam_build.py .aws-sam/build
mkdir -p "$cache"
tmp=$(mktemp -d "$cache/.tmp-$key-XXXXXX")
cp -a .aws-sam/build/. "$tmp/"
touch "$tmp/.checked"
# another run may have stored the same key meanwhile: then keep theirs
mv -T "$tmp" "$build" 2>/dev/null || rm -rf "$tmp"
# ~22 MB each: keep the five newest builds (each edit of producer/ makes one)
find "$cache" -mindepth 1 -maxdepth 1 -type d ! -name '.tmp-*' -printf '%T@ %p\n' | sort -rn | tail -n +6 | cut -d' ' -f2- \
  | while read -r old; do rm -rf "$old"; done
