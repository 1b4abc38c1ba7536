"""The folder tree is the architecture: these import rules keep it true.

- ``privacy/`` is a pure library: no HTTP, no Redis, no gateway at module level.
- Stages, the pipeline, the service and policy code are transport-neutral: no aiohttp, no grpc.
- The gateway process never imports torch or opacus (seconds and hundreds of MB).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def module_level_imports(path: Path) -> set[str]:
    """Top-level packages imported at module level (not inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks are fine
            continue
    return found


def all_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def files(*parts: str) -> list[Path]:
    out: list[Path] = []
    for part in parts:
        target = ROOT / part
        out.extend(sorted(target.rglob("*.py")) if target.is_dir() else [target])
    return out


@pytest.mark.parametrize("path", files("privacy"), ids=lambda p: str(p.relative_to(ROOT)))
def test_privacy_is_a_pure_library(path: Path) -> None:
    assert not module_level_imports(path) & {"aiohttp", "redis", "gateway", "grpc"}


@pytest.mark.parametrize(
    "path",
    files("gateway/stages", "gateway/pipeline.py", "gateway/service.py", "gateway/policy",
          "gateway/context.py", "gateway/errors.py", "gateway/kserve.py"),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_pipeline_is_transport_neutral(path: Path) -> None:
    assert not all_imports(path) & {"aiohttp", "grpc", "tritonclient"}


@pytest.mark.parametrize("path", files("gateway"), ids=lambda p: str(p.relative_to(ROOT)))
def test_gateway_never_imports_training_stacks(path: Path) -> None:
    assert not all_imports(path) & {"torch", "opacus", "art", "tensorflow"}
