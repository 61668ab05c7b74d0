#!/usr/bin/env bash
# Make ./.venv with the daemon installed, using uv. Idempotent.
#   bash scripts/bootstrap.sh          the daemon and every extra (tests, benchmarks, load tests)
#   bash scripts/bootstrap.sh serve    only what serving needs (what scripts/serve.sh runs)
# The venv gets the newest CPython >= 3.11 on the machine (PATH, then pyenv's versions): newer
# releases run the daemon's hot path faster. PYTHON=/path/to/python picks one instead.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-all}"
case "$profile" in
  serve) extras="" ;;
  all) extras="[test,bench,load]" ;;
  *) echo "bootstrap: unknown profile '$profile' (use serve or all)" >&2; exit 2 ;;
esac

runs_311_or_newer() {
  "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

pick_python() {
  if [ -n "${PYTHON:-}" ]; then
    runs_311_or_newer "$PYTHON" && { echo "$PYTHON"; return 0; }
    echo "bootstrap: PYTHON=$PYTHON is not a Python >= 3.11" >&2
    return 1
  fi
  local candidate
  # pyenv's shims refuse an interpreter that is not selected, so its real binaries are listed too.
  for candidate in python3.14 python3.13 python3.12 \
      $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9].*/bin/python3 2>/dev/null | sort -rV) \
      python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && runs_311_or_newer "$candidate"; then
      command -v "$candidate"
      return 0
    fi
  done
  echo "bootstrap: no Python >= 3.11 found (install one, or set PYTHON=/path/to/python)" >&2
  return 1
}

# uv: the one on PATH, else a copy installed once into .tools/uv with the chosen Python's pip.
find_uv() {
  local python="$1"
  if command -v uv >/dev/null 2>&1; then
    command -v uv
    return 0
  fi
  if [ ! -x .tools/uv/bin/uv ]; then
    echo "bootstrap: installing uv into .tools/uv" >&2
    rm -rf .tools/uv
    if "$python" -m pip --version >/dev/null 2>&1; then
      PIP_ROOT_USER_ACTION=ignore "$python" -m pip install --disable-pip-version-check -q --target .tools/uv uv >&2
    else  # no pip next to this Python (Debian without python3-pip): a throw-away venv has one
      "$python" -m venv .tools/pip-venv >&2
      PIP_ROOT_USER_ACTION=ignore .tools/pip-venv/bin/pip install --disable-pip-version-check -q --target .tools/uv uv >&2
      rm -rf .tools/pip-venv
    fi
  fi
  echo .tools/uv/bin/uv
}

stamp=.venv/.bootstrap-stamp
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
# A venv with every extra also serves; a serve-only venv gets the extras added when asked.
if [ -x .venv/bin/python ] && { [ "$have" = "$want all" ] || [ "$have" = "$want $profile" ]; }; then
  exit 0
fi
python="$(pick_python)"
uv="$(find_uv "$python")"
if [ ! -x .venv/bin/python ] || [ "${have%% *}" != "$want" ]; then
  echo "bootstrap: creating .venv with $python ($("$python" --version))"
  rm -rf .venv
  "$uv" venv -q --python "$python" .venv
fi
echo "bootstrap: installing the daemon${extras:+ with $extras}"
"$uv" pip install -q --python .venv/bin/python -e ".$extras"
echo "$want $profile" > "$stamp"
