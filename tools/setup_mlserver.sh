#!/usr/bin/env bash
# Create the virtualenv that runs Seldon MLServer, the KServe V2 gRPC server the integration
# tests use as a stand-in for Triton (Triton itself cannot run on our machines).
#
# Why a separate venv: MLServer pins fastapi/starlette and other packages that must not leak
# into the gateway's own environment (.venv); see shared/notes/BACKENDS.md section 2.
#
# Usage: tools/setup_mlserver.sh            (venv at <repo>/.venv-mlserver)
#        MLSERVER_VENV=/some/dir tools/setup_mlserver.sh
#        MLSERVER_PYTHON=/usr/bin/python3.11 tools/setup_mlserver.sh
#
# Idempotent: a stamp file inside the venv records the interpreter version and the pin list;
# when both match, the script does nothing. Quiet on success; pip's errors still show.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MLSERVER_VENV:-$ROOT/.venv-mlserver}"
PYTHON="${MLSERVER_PYTHON:-python3.11}"

# mlserver 1.7.1 requires Python < 3.13. uvloop < 0.22: with 0.22/0.23 MLServer's worker
# start-up crashes ("no current event loop", SeldonIO/MLServer#2286); we also run with
# parallel_workers=0, this pin is the second safety net. The runtime imports only mlserver,
# numpy and onnxruntime, so nothing else is needed.
PINS=(
    "mlserver==1.7.1"
    "onnxruntime==1.32.0"
    "numpy==2.4.6"
    "uvloop<0.22"
)

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "setup_mlserver: $PYTHON not found (MLServer 1.7.1 needs Python 3.11 or 3.12);" \
        "set MLSERVER_PYTHON to a Python 3.11 interpreter" >&2
    exit 1
fi

STAMP="$VENV/.infergate-mlserver-pins"
WANT="$("$PYTHON" -c 'import sys; print("python %d.%d" % sys.version_info[:2])')
$(printf '%s\n' "${PINS[@]}")"

stamp_matches() {
    [[ -f "$STAMP" && -x "$VENV/bin/mlserver" && "$(cat "$STAMP")" == "$WANT" ]]
}

if stamp_matches; then
    exit 0
fi

# Two test sessions may start at once: serialise the install. The lock lives inside the venv
# directory (python -m venv accepts an existing directory), so nothing lands beside it.
mkdir -p "$VENV"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$VENV/.setup.lock"
    flock 9
    if stamp_matches; then
        exit 0
    fi
fi

rm -f "$STAMP"
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-input "${PINS[@]}"
# Fail here, not at test time, if the install is unusable.
"$VENV/bin/python" -c 'import mlserver, numpy, onnxruntime' >/dev/null
printf '%s\n' "$WANT" >"$STAMP.tmp"
mv "$STAMP.tmp" "$STAMP"
