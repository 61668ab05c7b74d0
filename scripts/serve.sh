#!/usr/bin/env bash
# Install what serving needs (the daemon, no test or benchmark tools), then run the daemon with the
# bundled example plugins on 127.0.0.1:5002. Each plugin's virtualenv is created on first start.
# Extra arguments go to `plugin-daemon serve` (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh serve
exec .venv/bin/plugin-daemon serve --plugins plugins "$@"
