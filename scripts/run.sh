#!/usr/bin/env bash
# Set up (if needed) and run the whole pipeline on the lab world: `rlhflab run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/rlhflab run "$@"
