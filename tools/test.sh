#!/usr/bin/env bash
# The whole test suite: static checks, then pytest (unit, functional, integration).
# Called by `make test` and by .ci/run. Installs missing system pieces itself.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

if [[ "${1:-}" != "--checks-only" ]]; then
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "== installing redis-server (apt)"
    if [[ $(id -u) -eq 0 ]]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
  fi
  echo "== MLServer venv"
  bash tools/setup_mlserver.sh
fi

echo "== ruff"
$BIN/ruff check gateway privacy tests tools
echo "== mypy --strict"
$BIN/mypy
echo "== bandit"
$BIN/bandit -q -r gateway privacy -ll
[[ "${1:-}" == "--checks-only" ]] && exit 0

echo "== pytest"
set +e
$BIN/python -m pytest -q -p no:cacheprovider "${@}"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit $rc
