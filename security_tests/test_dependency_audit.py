"""Known vulnerabilities in the runtime dependencies (pip-audit, PyPI advisory data).

Runs tools/audit_deps.py, which writes security_tests/results/pip-audit.json. Fails on a
finding without a recorded decision, or when PyPI could not be asked at all. Packages
PyPI could not answer for are listed there as unaudited (and printed), never as clean.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "security_tests" / "results" / "pip-audit.json"


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("audit_deps", ROOT / "tools" / "audit_deps.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def test_runtime_closure_is_what_the_gateway_runs() -> None:
    pins = _tool().runtime_closure()
    for runtime in ("aiohttp", "pyjwt", "cryptography", "pyyaml", "grpcio", "protobuf"):
        assert runtime in pins
    for tooling in ("pytest", "hypothesis", "schemathesis", "pip-audit", "mypy"):
        assert tooling not in pins, f"{tooling} is a test tool, not a runtime dependency"


def test_no_undecided_vulnerabilities(capsys: pytest.CaptureFixture[str]) -> None:
    code = _tool().main(["--output", str(RESULTS)])
    printed = capsys.readouterr().out
    report = json.loads(RESULTS.read_text())
    with capsys.disabled():
        print("\n" + printed)  # the summary (and any UNAUDITED line) shows in the CI log
    assert report["status"] != "unreachable", "PyPI's vulnerability data could not be fetched: nothing audited"
    undecided = [f for f in report["vulnerabilities"] if not f["decision"]]
    assert not undecided, f"vulnerable runtime dependencies without a decision: {undecided}"
    assert code == 0
    assert report["audited"], "no package audited"
    assert len(report["audited"]) + len(report["unaudited"]) == len(report["packages"])
