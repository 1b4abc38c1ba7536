"""The vectorised detector paths give exactly the scores of the straightforward code.

The reference functions below are the implementations the detectors had before their
per-call overhead was cut (issue 11): ``ndarray.min/max/mean`` and one concatenated
distance block. Scores and k-NN means must be *equal* (not close): the thresholds were
calibrated on these numbers, and a decision must never move because of a refactor.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from gateway.adversarial.detectors import (
    GridDetector,
    MahalanobisDetector,
    QueryPatternDetector,
    RangeDetector,
    _History,
)
from gateway.adversarial.profile import NumericProfile, load_profile
from tests.adversarial import TRITON_REPO, digits_profile, digits_split, hsj_like_stream, load_build_module

F = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]


def _risk() -> tuple[NumericProfile, F]:
    profile = load_profile(TRITON_REPO / "risk" / "profile.json", model="risk").numeric
    assert profile is not None
    _, x_test, _, _ = load_build_module().load_risk_split()
    return profile, np.asarray(x_test, dtype=np.float64)


# -- the reference implementations (verbatim from before the change) -----------------------


def _ref_range(d: RangeDetector, x: F) -> tuple[float, bool]:
    if d.uniform is not None:
        if x.shape[0] == 1:
            lo, hi = float(x.min()), float(x.max())
            constant = lo == hi
        else:
            row_min, row_max = x.min(axis=1), x.max(axis=1)
            lo, hi = float(row_min.min()), float(row_max.max())
            constant = bool((row_min == row_max).any())
        low, high, inv_width = d.uniform
        excess = max(low - lo, hi - high) * inv_width
    else:
        excess = float((np.maximum(d.low - x, x - d.high) * d.inv_width).max())
        constant = d.refuse_constant and bool((x.max(axis=1) == x.min(axis=1)).any())
    if not excess <= 0.0:
        value, fired = min(excess, 1e9) if excess == excess else 1e9, True
    else:
        value, fired = 0.0, False
    if d.refuse_constant and constant:
        value, fired = max(value, 1.0), True
    return value, fired


def _ref_grid(d: GridDetector, x: F) -> float:
    position = x if d.origin == 0.0 and d.step == 1.0 else (x - d.origin) / d.step
    return float(np.abs(position - np.rint(position)).max())


def _ref_knn(det: QueryPatternDetector, s: F32, norms: F32, hist: _History, *,
             exclude_owner: int | None = None, within_batch: bool = True) -> F32:
    n = hist.size
    parts: list[F32] = []
    if n:
        d2 = norms[:, None] + hist.norms[None, :n] - 2.0 * (s @ hist.sketches[:n].T)
        if exclude_owner is not None:
            d2[:, hist.owners[:n] == exclude_owner] = np.inf
        parts.append(d2)
    if within_batch and s.shape[0] > 1:
        d2b = norms[:, None] + norms[None, :] - 2.0 * (s @ s.T)
        d2b[~np.tri(s.shape[0], k=-1, dtype=np.bool_)] = np.inf
        parts.append(d2b)
    k = det.neighbours
    if not parts or sum(p.shape[1] for p in parts) < k:
        return np.full(s.shape[0], np.inf, dtype=np.float32)
    d2 = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    if det.ignore_exact_repeats:
        d2[d2 <= (1e-2 * det.radius) ** 2] = np.inf
    nearest = np.partition(d2, k - 1, axis=1)[:, :k]
    result: F32 = np.sqrt(np.maximum(nearest, 0.0)).mean(axis=1)
    return result


# -- per-request detectors ------------------------------------------------------------------


def _batches(x: F) -> list[F]:
    """Every row alone, plus batches of 2, 5 and 64 rows (the multi-row paths)."""
    out = [x[i:i + 1] for i in range(x.shape[0])]
    out += [x[i:i + size] for size in (2, 5, 64) for i in range(0, x.shape[0] - size, 97)]
    return out


def _perturbed(x: F, rng: np.random.Generator) -> F:
    """Clean rows and rows that fire: off-grid noise, out-of-range and constant rows."""
    noisy = x + rng.normal(0.0, 1.5, x.shape)
    far = x * 3.0 - 5.0
    constant = np.full_like(x[:20], 4.0)
    return np.concatenate([x, noisy, far, constant])


@pytest.mark.parametrize("which", ["digits", "risk"])
def test_per_request_scores_equal_the_reference(which: str) -> None:
    if which == "digits":
        profile, x = digits_profile(), digits_split()[1]
    else:
        profile, x = _risk()
    x = _perturbed(x, np.random.default_rng(11))
    ranges = [RangeDetector.from_profile(profile),
              RangeDetector.from_profile(profile, bounds="training", margin=0.1, refuse_constant=False),
              RangeDetector.from_profile(profile, bounds="training", refuse_constant=True)]
    maha = MahalanobisDetector.from_profile(profile, fpr=0.01)
    grid = GridDetector(origin=0.0, step=1.0)
    scaled = GridDetector(origin=0.5, step=0.25)
    fired = 0
    batches = _batches(x)
    for batch in batches:
        for detector in ranges:
            score = detector.score(batch)
            assert (score.score, score.fired) == _ref_range(detector, batch)
            fired += score.fired
        for g in (grid, scaled):
            value = _ref_grid(g, batch)
            assert g.score(batch).score == (value if value < 1e9 else 1e9)
        ref = float(maha.distances(batch).max()) if batch.shape[0] > 1 else \
            math.sqrt(max(float((batch[0] - maha.mean) @ maha.precision @ (batch[0] - maha.mean)), 0.0))
        assert maha.score(batch).score == min(ref, 1e9)
    assert 0 < fired < 3 * len(batches)  # both outcomes were exercised


# -- k-NN of the query-pattern detector -----------------------------------------------------


def _stream(rng: np.random.Generator) -> F:
    _, x_test = digits_split()
    bursts = [hsj_like_stream(x_test[i], rng, iterations=2, evals=60) for i in range(3)]
    return np.concatenate([x_test[:300], *bursts, x_test[:40]])  # clean, attacks, exact repeats


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_knn_means_equal_the_reference_along_a_stream(batch: int) -> None:
    rng = np.random.default_rng(5)
    stream = _stream(rng)
    detector = QueryPatternDetector.from_profile(digits_profile(), radius=2.5, seed=3, history=128,
                                                 global_history=256)
    callers = ["acme", "globex"]
    finite = 0
    for step, start in enumerate(range(0, stream.shape[0], batch)):
        x = stream[start:start + batch]
        caller = callers[step % 2]
        state = detector._state(caller)
        sketches = detector.sketch(x)
        norms = (sketches * sketches).sum(axis=1)
        own = detector._knn_mean(sketches, norms, state.history)
        assert np.array_equal(own, _ref_knn(detector, sketches, norms, state.history))
        owner = hash(caller)
        for within in (True, False):
            got = detector._knn_mean(sketches, norms, detector._global, exclude_owner=owner, within_batch=within)
            want = _ref_knn(detector, sketches, norms, detector._global, exclude_owner=owner, within_batch=within)
            assert got.dtype == want.dtype == np.float32
            assert np.array_equal(got, want)
        finite += int(np.isfinite(own).sum())
        detector.observe(caller, x)
    assert finite > 100  # past the warm-up, real means were compared
