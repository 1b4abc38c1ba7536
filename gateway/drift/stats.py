"""Drift statistics of a window of rows against binned reference distributions (numpy only).

The training profile keeps per-feature histograms, not the training rows, so both
statistics compare histograms over the *profile's* bin edges, plus two open bins for
values below the first edge and above the last (numpy.histogram's convention: every bin
half-open except the last, which is closed):

* **PSI**, ``sum((p_w - p_r) * ln(p_w / p_r))``. An empty bin gets half a count (a
  zero would make the index infinite); a bin empty on both sides adds nothing.
* **KS**, the largest gap between the two cumulative distributions at the bin edges:
  the two-sample Kolmogorov-Smirnov distance of the binned samples. It never exceeds the
  exact statistic, and for features already on the bin grid (digits pixels are integers)
  it loses little; a shift inside one bin is what it cannot see.

Rows of the reference that differ in bin count are padded with empty bins on the right,
which changes neither statistic, so one array holds every feature.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["FloatArray", "bin_counts", "bin_index", "histogram_matrix", "ks_binned", "proportions", "psi"]

FloatArray = npt.NDArray[np.float64]

_EMPTY_BIN_COUNT = 0.5


def bin_index(values: npt.NDArray[np.floating], edges: FloatArray) -> npt.NDArray[np.intp]:
    """0 below the first edge, 1..B the profile's B bins, B+1 above the last edge."""
    idx = np.searchsorted(edges, values, side="right")
    idx[values == edges[-1]] = len(edges) - 1  # the last bin is closed, as in numpy.histogram
    return idx


def bin_counts(columns: npt.NDArray[np.floating], edges: Sequence[FloatArray], width: int) -> FloatArray:
    """Counts of each column of ``columns`` (rows x features) over its feature's edges, padded to ``width``."""
    out = np.zeros((len(edges), width), dtype=np.float64)
    for j, feature_edges in enumerate(edges):
        counts = np.bincount(bin_index(columns[:, j], feature_edges), minlength=len(feature_edges) + 1)
        out[j, : counts.size] = counts
    return out


def histogram_matrix(hists: Sequence[Sequence[float]]) -> FloatArray:
    """Reference counts (B per feature) as a matrix with the open bins added and ragged rows padded."""
    width = max(len(h) for h in hists) + 2
    out = np.zeros((len(hists), width), dtype=np.float64)
    for j, hist in enumerate(hists):
        out[j, 1 : len(hist) + 1] = hist
    return out


def proportions(counts: FloatArray) -> FloatArray:
    """Counts as shares of each row's total (all zeros for an empty row)."""
    totals = counts.sum(axis=1, keepdims=True)
    shares: FloatArray = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    return shares


def psi(reference: FloatArray, window: FloatArray) -> FloatArray:
    """Population stability index per row of two count matrices of equal shape."""
    n_ref = np.maximum(reference.sum(axis=1, keepdims=True), 1.0)
    n_win = np.maximum(window.sum(axis=1, keepdims=True), 1.0)
    p_ref = np.where(reference > 0, reference, _EMPTY_BIN_COUNT) / n_ref
    p_win = np.where(window > 0, window, _EMPTY_BIN_COUNT) / n_win
    terms = (p_win - p_ref) * np.log(p_win / p_ref)
    terms[(reference == 0) & (window == 0)] = 0.0
    result: FloatArray = terms.sum(axis=1)
    return result


def ks_binned(reference: FloatArray, window: FloatArray) -> FloatArray:
    """Largest CDF gap at the bin edges, per row of two count matrices of equal shape."""
    gap = np.abs(np.cumsum(proportions(reference), axis=1) - np.cumsum(proportions(window), axis=1))
    result: FloatArray = gap.max(axis=1)
    return result

