#!/usr/bin/env bash
# Set up (first time) and run the whole pipeline: ingest -> validate -> build -> train -> evaluate -> promote.
#   ./run.sh                                   # the public dataset (github.com/wb14123/couplet-dataset)
#   SOURCE=path/or/url.tar.gz ./run.sh         # another source: URL, .tar.gz or directory
#   ./run.sh --set train.max_steps=300         # extra flags go to `couplet run`
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
args=(--until "${UNTIL:-evaluate}")
[ -n "${SOURCE:-}" ] && args+=(--source "$SOURCE")
exec .venv/bin/couplet run "${args[@]}" "$@"
