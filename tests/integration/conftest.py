"""Fixtures for tests against a real KServe V2 gRPC server: MLServer standing in for Triton.

The server is started once per test session (about 3 s, plus a one-off ~45 s venv install by
``tools/setup_mlserver.sh`` on a fresh machine) and serves ``<repo>/triton_repo``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TRITON_REPO = REPO_ROOT / "triton_repo"

# `python -m pytest` puts the repository root on sys.path, plain `pytest` does not.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.support.mlserver import MLServerProcess, start_mlserver  # noqa: E402


@pytest.fixture(scope="session")
def triton_repo() -> Path:
    """The Triton model repository the server serves (tests read config.pbtxt from it)."""
    return TRITON_REPO


@pytest.fixture(scope="session")
def mlserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MLServerProcess]:
    """One MLServer for the whole session on 127.0.0.1, stopped (never left running) at the end."""
    if not TRITON_REPO.is_dir():
        pytest.fail(f"{TRITON_REPO} is missing: build it with tools/build_models.py")
    server = start_mlserver(TRITON_REPO, tmp_path_factory.mktemp("mlserver"))
    try:
        yield server
    finally:
        server.stop()
