"""PSI, binned KS, the profile reference and the sliding window, on small known cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from gateway.adversarial.profile import ProfileError
from gateway.drift.reference import load_reference
from gateway.drift.stats import bin_counts, bin_index, histogram_matrix, ks_binned, psi
from gateway.drift.window import SlidingWindow
from tests.drift import TRITON_REPO, digits_test_split


def test_bins_follow_numpy_histogram_and_add_open_ends() -> None:
    edges = np.array([0.0, 1.0, 2.0])
    values = np.array([-1.0, 0.0, 0.5, 1.0, 2.0, 2.5])
    assert bin_index(values, edges).tolist() == [0, 1, 1, 2, 2, 3]
    inside = values[(values >= 0) & (values <= 2)]
    assert bin_counts(values.reshape(-1, 1), [edges], 4)[0, 1:3].tolist() == np.histogram(inside, edges)[0].tolist()


def test_psi_and_ks_known_values() -> None:
    ref = histogram_matrix([[50, 50]])
    same = histogram_matrix([[5, 5]])
    moved = histogram_matrix([[90, 10]])
    assert psi(ref, same)[0] == 0.0 and ks_binned(ref, same)[0] == 0.0
    expected = (0.9 - 0.5) * math.log(0.9 / 0.5) + (0.1 - 0.5) * math.log(0.1 / 0.5)
    assert psi(ref, moved)[0] == pytest.approx(expected)
    assert ks_binned(ref, moved)[0] == pytest.approx(0.4)


def test_psi_is_finite_when_the_window_leaves_the_profile_range() -> None:
    ref = histogram_matrix([[100, 0]])
    outside = np.zeros((1, 4))
    outside[0, 3] = 10  # every row above the last edge
    value = psi(ref, outside)[0]
    assert math.isfinite(value) and value > 5
    assert ks_binned(ref, outside)[0] == pytest.approx(1.0)


def test_digits_reference_matches_the_profile_and_the_held_out_data_is_close() -> None:
    reference = load_reference(TRITON_REPO, "digits")
    raw = json.loads((TRITON_REPO / "digits" / "profile.json").read_text())
    assert reference.n_features == 64 and reference.input == "pixels"
    assert reference.counts[5, 1:-1].tolist() == raw["features"][5]["hist"]
    assert reference.output is not None and reference.output.kind == "class"
    x, _ = digits_test_split()
    window = bin_counts(x, reference.edges, reference.counts.shape[1])
    assert float(psi(reference.counts, window).max()) < 0.1  # the whole held-out split: no drift


def test_a_profile_without_numeric_features_cannot_serve_drift() -> None:
    with pytest.raises(ProfileError, match="no numeric features"):
        load_reference(TRITON_REPO, "text_echo")


def test_a_broken_histogram_is_a_profile_error(tmp_path: Path) -> None:
    doc = json.loads((TRITON_REPO / "digits" / "profile.json").read_text())
    doc["features"][3]["hist_edges"] = doc["features"][3]["hist_edges"][::-1]
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "profile.json").write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match="increase strictly"):
        load_reference(tmp_path, "digits")


def test_window_is_bounded_by_count_and_by_age() -> None:
    window = SlidingWindow(capacity=4, width=2, max_age_s=10.0)
    window.extend(np.array([[1, 1], [2, 2], [3, 3]], dtype=np.float32), now=0.0)
    window.extend(np.array([[4, 4], [5, 5]], dtype=np.float32), now=5.0)
    assert window.values()[:, 0].tolist() == [2, 3, 4, 5]  # the oldest row was overwritten
    assert window.evict(now=10.5) == 2  # rows of t=0 are older than 10 s
    assert window.values()[:, 0].tolist() == [4, 5]
    window.extend(np.arange(20, dtype=np.float32).reshape(10, 2), now=6.0)
    assert len(window) == 4 and window.values()[:, 0].tolist() == [12, 14, 16, 18]
    smaller = window.resized(2, 10.0)
    assert smaller.values()[:, 0].tolist() == [16, 18]
    with pytest.raises(ValueError, match="shape"):
        window.extend(np.zeros((1, 3), dtype=np.float32), now=7.0)
