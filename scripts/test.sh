#!/usr/bin/env bash
# Install everything (Python packages, plugin venvs, Debian's prometheus and chromium), then lint and
# run the whole test suite (real plugins, real HTTP on loopback, a real Prometheus and browser).
# Extra arguments go to pytest (and skip the second pass on the stdlib event loop).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/plugin-daemon install --plugins plugins
.venv/bin/python -m pytest "$@"
# The runtime tests and failure drills again on the standard library's event loop (the daemon
# runs on uvloop by default; EVENT_LOOP=asyncio is supported and must behave the same).
if [ "$#" -eq 0 ]; then
    EVENT_LOOP=asyncio .venv/bin/python -m pytest -q tests/test_runtime.py tests/test_runtime_drills.py
fi
