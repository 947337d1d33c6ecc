#!/usr/bin/env bash
# The dashboard test drives a real headless Chromium (Debian's `chromium` package). Install it when it is
# missing; when that is impossible say why and carry on: that one test then skips, naming the reason.
set -uo pipefail

say() { printf 'ensure-chromium: %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else
  say "need root to run: $*"; return 1; fi; }

for exe in chromium chromium-browser google-chrome; do
  if command -v "$exe" >/dev/null; then say "$exe found"; exit 0; fi
done
if ! command -v apt-get >/dev/null; then
  say "chromium is missing and apt-get is not available: the dashboard browser test will be skipped"
  exit 0
fi
say "installing chromium (for the dashboard browser test)"
if as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq chromium >/dev/null; then
  say "chromium installed"
else
  say "could not install chromium: the dashboard browser test will be skipped"
fi
exit 0
