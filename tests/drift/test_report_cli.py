"""``infergate drift report --samples``: a file of rows judged and printed as text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gateway.cli import main
from tests.drift import POLICIES, TRITON_REPO, digits_classes, digits_test_split


def test_report_from_a_file_of_shifted_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, _ = digits_test_split()
    bright = np.clip(x + 2, 0, 16)
    samples = tmp_path / "rows.json"
    samples.write_text(json.dumps({"inputs": bright.tolist(), "outputs": digits_classes(bright).tolist()}))
    code = main(["drift", "report", "--model", "digits", "--samples", str(samples), "--profiles", str(TRITON_REPO),
                 "--policies", str(POLICIES)])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("model digits: CRITICAL")
    assert "critical PSI 0.5 / KS 0.3" in out  # the shipped policy's thresholds
    assert "pixels[" in out and "profile" in out and "#" in out


def test_report_from_clean_rows_is_ok_and_json_is_available(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    x, _ = digits_test_split()
    samples = tmp_path / "rows.npy"
    np.save(samples, x)
    assert main(["drift", "report", "--model", "digits", "--samples", str(samples), "--profiles", str(TRITON_REPO),
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "ok" and doc["samples"]["inputs"] == len(x) and doc["output"] is None


def test_report_needs_a_source(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["drift", "report", "--model", "digits"]) == 2
    assert "--url" in capsys.readouterr().err
