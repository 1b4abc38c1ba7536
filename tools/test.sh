#!/usr/bin/env bash
# The whole test suite: static checks, then pytest (unit, functional, integration).
# Called by `make test` and by .ci/run. Installs missing system pieces itself.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

TOOLS=.cache/deploy-tools
if [[ "${1:-}" != "--checks-only" ]]; then
  if [[ $(id -u) -eq 0 ]]; then SUDO=""; else SUDO="sudo"; fi
  if ! command -v redis-server >/dev/null 2>&1 || [[ ! -x $TOOLS/usr/bin/promtool ]]; then
    $SUDO apt-get update -qq >/dev/null
  fi
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "== installing redis-server (apt)"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
  fi
  if [[ ! -x $TOOLS/usr/bin/promtool || ! -x $TOOLS/usr/bin/amtool ]]; then
    # promtool/amtool validate deploy/; unpacked, not installed, so no service starts.
    echo "== fetching promtool and amtool (Debian packages, unpacked under $TOOLS)"
    mkdir -p $TOOLS/debs
    (cd $TOOLS/debs && apt-get download -qq prometheus prometheus-alertmanager >/dev/null)
    for deb in $TOOLS/debs/*.deb; do dpkg-deb -x "$deb" $TOOLS; done
  fi
  echo "== MLServer venv"
  bash tools/setup_mlserver.sh
fi

echo "== ruff"
$BIN/ruff check gateway privacy tests tools bench security_tests
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
