"""Fixtures shared by the whole-gateway flag tests."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import TRITON_REPO


@pytest.fixture
def two_version_repo(tmp_path: Path) -> Path:
    """The shipped model repository with digits v2 (a copy of v1) served next to v1: a canary to route to."""
    repo = tmp_path / "repo"
    shutil.copytree(TRITON_REPO, repo)
    if not (repo / "digits" / "2").exists():
        shutil.copytree(repo / "digits" / "1", repo / "digits" / "2")
    config = repo / "digits" / "config.pbtxt"
    config.write_text(re.sub(r"version_policy \{.*?\n\}\n", "version_policy { all {} }\n",
                             config.read_text(), flags=re.S))
    return repo
