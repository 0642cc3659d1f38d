#!/usr/bin/env bash
# Creates .venv (if missing), installs fpn_tf with its test extras, runs ruff and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -e '.[test]'
.venv/bin/ruff check fpn_tf scripts tests bench
exec .venv/bin/python -m pytest -q tests "$@"
