#!/usr/bin/env bash
# Set up (if needed), check lint and formatting, and run the test suite (pytest arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check rlhflab tests
.venv/bin/ruff format --check rlhflab tests
exec .venv/bin/python -m pytest "$@"
