#!/usr/bin/env bash
# Create .venv/ at the project root and install couplet into it (editable), once per pyproject change.
# Usage: scripts/setup.sh [--test]   (--test also installs the test extras)
# The stamp of an install names its extras: .venv/.installed (plain) or .venv/.installedtest (with the test
# extras). The test install is a superset, so its stamp also serves a plain set-up (./run.sh after ./test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
stamp=".venv/.installed$(echo "$extras" | tr -d '[]')"
serving=("$stamp")  # the stamps that show this set-up is done
[ -z "$extras" ] && serving+=(".venv/.installedtest")
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
for done_stamp in "${serving[@]}"; do
  [ "$(cat "$done_stamp" 2>/dev/null)" = "$want" ] && exit 0
done
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: 2.13.0 is the CPU wheel on these machines; anything looser pulls CUDA.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".${extras}"
echo "$want" > "$stamp"
