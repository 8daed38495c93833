#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with rlhflab and its test extras,
# and Debian's chromium for the browser tests. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch is pinned in pyproject (>=2.6,<2.14) so pip takes the local CPU wheel.
.venv/bin/pip install -q -e '.[test]'
