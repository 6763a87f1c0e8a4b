#!/usr/bin/env bash
# One entry point for people and CI.
#   bash dev.sh demo     set up, then serve the dashboard (Voila) on the reference model; prints the URL
#   bash dev.sh test     set up (chromium included, for the browser tests), then run the whole test suite
#   bash dev.sh run      set up, then one `workbench run` on the reference model, printed as a table
#   bash dev.sh setup    only set up (.venv with torch, the package and its extras; chromium)
# Re-running is fast: the install is skipped while pyproject.toml and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# CPU build by default; for CUDA use e.g. TORCH_SPEC="torch==2.13.0" PIP_INDEX_URL=https://download.pytorch.org/whl/cu128
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.workbench-setup" want
  want=$(cat pyproject.toml dev.sh | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  # torch first and pinned: a range left to pip would pull a multi-GB CUDA build.
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "installing $TORCH_SPEC" >&2
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
  fi
  echo "installing the workbench and its extras" >&2
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
}

# Debian's chromium drives the browser tests (Playwright never downloads a browser here).
ensure_chromium() {
  if command -v chromium >/dev/null 2>&1; then
    return 0
  fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      echo "chromium is not installed and this user cannot install it: browser tests will be skipped" >&2
      return 0
    fi
  fi
  echo "installing Debian's chromium (browser tests)" >&2
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
}

case "${1:-demo}" in
  setup) setup; ensure_chromium ;;
  demo)
    setup
    shift || true
    "$VENV/bin/workbench" dashboard "$@"
    ;;
  run)
    setup
    shift || true
    "$VENV/bin/workbench" run --model tiny "$@"
    ;;
  test)
    setup
    ensure_chromium
    shift || true
    "$VENV/bin/python" -m pytest "$@"
    ;;
  *) echo "usage: bash dev.sh [demo|test|run|setup] [extra args]" >&2; exit 2 ;;
esac
