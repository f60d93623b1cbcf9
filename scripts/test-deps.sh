#!/usr/bin/env bash
# What the test suite needs beyond .venv: Debian's Chromium for the report's browser test.
# Idempotent (returns at once when it is there); installs it with apt-get when it can, otherwise
# stops with the command to run, so `make test` never passes by skipping that test.
set -euo pipefail
CHROMIUM=/usr/bin/chromium
[ -x "$CHROMIUM" ] && exit 0
install=(apt-get install -y -qq --no-install-recommends chromium)
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "test-deps: installing Debian's chromium for the report's browser test" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${install[@]}" >/dev/null
    exit 0
fi
echo "test-deps: $CHROMIUM is missing; the report test opens the HTML report in it. Install it with:" >&2
echo "  sudo apt-get update && sudo ${install[*]}" >&2
exit 1
