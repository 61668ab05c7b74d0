#!/usr/bin/env bash
# Install everything, then lint and run the whole test suite (real plugins, real HTTP on loopback).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/plugin-daemon install --plugins plugins
exec .venv/bin/python -m pytest "$@"
