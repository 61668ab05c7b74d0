#!/usr/bin/env bash
# Install everything (Python packages, plugin venvs, Debian's prometheus and chromium), then lint and
# run the whole test suite (real plugins, real HTTP on loopback, a real Prometheus and browser).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/plugin-daemon install --plugins plugins
exec .venv/bin/python -m pytest "$@"
