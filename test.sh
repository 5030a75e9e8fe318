#!/usr/bin/env bash
# Set up (first time) and run the test suite. Extra arguments go to pytest (e.g. ./test.sh -k ingest).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh --test
# The browser test drives Debian's Chromium; install it when we can (root + apt), else that test skips.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser test will be skipped" >&2
fi
# Two workers (pytest-xdist), each test file kept on one worker; `./test.sh -n 0` runs in this process.
exec .venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadgroup "$@"
