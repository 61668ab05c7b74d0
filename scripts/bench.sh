#!/usr/bin/env bash
# Install everything, then run the benchmarks: `bash scripts/bench.sh` is the full run behind
# bench/REPORT.md (~25 min on 2 cores), `bash scripts/bench.sh --ci` the short one CI runs (< 3 min).
# Extra arguments go to `python -m bench` (try --help). py-spy needs ptrace (root, or
# CAP_SYS_PTRACE, or kernel.yama.ptrace_scope=0).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/plugin-daemon install --plugins plugins
exec .venv/bin/python -m bench "$@"
