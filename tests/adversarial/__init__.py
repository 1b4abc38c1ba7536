"""Unit tests of gateway/adversarial: profile loading, detectors, output hardening (numpy only).

Shared helpers live here (plain cached functions, not fixtures, so the stage tests in
``tests/stages`` can use them too): the shipped digits profile, the real train/test split
(scikit-learn's bundled data, through ``tools/build_models.py``), and a model-free
HopSkipJump-shaped query stream.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import numpy.typing as npt

from gateway.adversarial.profile import NumericProfile, load_profile

ROOT = Path(__file__).resolve().parent.parent.parent
TRITON_REPO = ROOT / "triton_repo"
BUILD_SCRIPT = ROOT / "tools" / "build_models.py"

Split = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]


def load_build_module() -> ModuleType:
    """``tools`` is not a package; load the build script by path (as tests/test_triton_repo.py does)."""
    name = "infergate_build_models"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BUILD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@functools.cache
def digits_profile() -> NumericProfile:
    profile = load_profile(TRITON_REPO / "digits" / "profile.json", model="digits")
    assert profile.numeric is not None
    return profile.numeric


@functools.cache
def digits_split() -> Split:
    """(train, test) pixels as float64, exactly the split the model and profile came from."""
    x_train, x_test, _, _ = load_build_module().load_digits_split()
    return np.asarray(x_train, dtype=np.float64), np.asarray(x_test, dtype=np.float64)


def hsj_like_stream(x0: npt.NDArray[np.float64], rng: np.random.Generator, *, iterations: int = 4,
                    evals: int = 100, low: float = 0.0, high: float = 16.0) -> npt.NDArray[np.float64]:
    """A HopSkipJump-shaped query sequence without a model: the original, a random starting
    point, a binary search between them, then per iteration a cloud of ``evals`` small
    perturbations around the boundary point (gradient estimate) and another binary search.
    The perturbation size follows ART's ``HopSkipJump._compute_delta`` for the L2 norm:
    a tenth of the value range in the first iteration, ``sqrt(d) * d**-1.5 * dist`` after."""
    queries = [x0, rng.uniform(low, high, x0.shape)]
    start = queries[1]
    lo, hi = 0.0, 1.0
    for _ in range(12):
        mid = (lo + hi) / 2
        queries.append(x0 + mid * (start - x0))
        lo, hi = (lo, mid) if rng.random() < 0.5 else (mid, hi)
    boundary = x0 + hi * (start - x0)
    d = x0.shape[0]
    for iteration in range(iterations):
        distance = float(np.linalg.norm(boundary - x0))
        delta = 0.1 * (high - low) if iteration == 0 else math.sqrt(d) * d**-1.5 * distance
        units = rng.standard_normal((evals, x0.shape[0]))
        units /= np.linalg.norm(units, axis=1, keepdims=True)
        queries.extend(np.clip(boundary + delta * units, low, high))
        step = boundary + 0.3 * (x0 - boundary)
        lo, hi = 0.0, 1.0
        for _ in range(8):
            mid = (lo + hi) / 2
            queries.append(boundary + mid * (step - boundary))
            lo, hi = (lo, mid) if rng.random() < 0.5 else (mid, hi)
        boundary = boundary + hi * (step - boundary)
    return np.asarray(queries, dtype=np.float64)
