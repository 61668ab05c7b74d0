#!/usr/bin/env bash
# Make ./.venv (Python >= 3.11) with the daemon, its test and load-test tools installed. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
  local candidate
  for candidate in python3 python3.13 python3.12 python3.11 \
      "$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[1-9].*/bin/python3 2>/dev/null | sort -V | tail -n 1)"; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "bootstrap: no Python >= 3.11 found" >&2
  return 1
}

stamp=.venv/.bootstrap-stamp
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python="$(pick_python)"
  echo "bootstrap: creating .venv with $python ($("$python" --version))"
  rm -rf .venv
  "$python" -m venv .venv
  .venv/bin/pip install --disable-pip-version-check -q --upgrade pip
  .venv/bin/pip install --disable-pip-version-check -q -e '.[test,bench,load]'
  echo "$want" > "$stamp"
fi
