#!/usr/bin/env bash
# Set up (if needed), check lint and formatting, and run the test suite (pytest arguments pass through;
# `-n 0` runs it in one process). Two pytest-xdist workers, each test file on one of them (its
# module fixtures made once) and one torch thread each (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check rlhflab tests
.venv/bin/ruff format --check rlhflab tests
exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@"
