#!/usr/bin/env bash
# Install everything, then run the daemon with the bundled example plugins on 127.0.0.1:5002.
# Each plugin's virtualenv is created on first start (the SDK plugins take ~20 s each).
# Extra arguments go to `plugin-daemon serve` (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/plugin-daemon serve --plugins plugins "$@"
