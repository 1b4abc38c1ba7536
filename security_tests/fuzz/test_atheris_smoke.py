"""CI smoke of the atheris harnesses: each replays its corpus, one fuzzes for 10 seconds.

The real atheris runs are local and long (see atheris_common.py); this only proves the
harnesses start, instrument and run clean, so they cannot rot between those runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from security_tests.fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parents[2]


def _run(target: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", f"security_tests.fuzz.atheris_{target}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "INITED" in output and "Done" in output, output[-2000:]
    return output


@pytest.mark.parametrize("target", [t for t in TARGETS if t != "http_infer"])
def test_harness_replays_its_corpus(target: str) -> None:
    _run(target, "--replay-only")


def test_http_infer_fuzzes_ten_seconds_without_a_crash() -> None:
    output = _run("http_infer", "--seconds", "10")
    assert "crash-" not in output
