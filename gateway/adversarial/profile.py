"""Load and validate ``triton_repo/<model>/profile.json``: the training-data profile.

``tools/build_models.py`` writes one profile per model from the *training split only*:
per-feature min/max/mean/std, the input domain, and a Ledoit-Wolf Mahalanobis reference
(mean, precision matrix, distance thresholds at stated false-positive rates). Every
numeric detector trusts these numbers, so a profile is checked as strictly as a policy:
a wrong shape, a non-finite number or a precision matrix that is not positive
semi-definite would silently turn a detector off (or on for everyone), so each is an
error at load time, naming the file and the rule, never a surprise per request.

Loading happens once per policy revision; the arrays are read-only afterwards.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from gateway import strict_json

__all__ = ["ModelProfile", "NumericProfile", "ProfileError", "load_profile", "parse_profile"]

FloatArray = npt.NDArray[np.float64]

PROFILE_FILENAME: Final = "profile.json"
SUPPORTED_VERSION: Final = 1
# A 64-feature profile is ~60 KiB; a 1,000-feature precision matrix ~20 MiB.
MAX_PROFILE_BYTES: Final = 32 * 1024 * 1024
MAX_FEATURES: Final = 2048
_THRESHOLD_KEY: Final = re.compile(r"threshold_fpr_(0\.[0-9]{1,6})")
# Relative tolerances for matrices written with 6 significant digits.
_SYMMETRY_TOL: Final = 1e-4
_PSD_TOL: Final = 1e-6


class ProfileError(ValueError):
    """A profile that cannot be trusted; raised at policy build time, never per request."""


@dataclass(frozen=True, slots=True)
class NumericProfile:
    """The numeric part of a profile, as read-only float64 arrays of length ``n_features``."""

    n_features: int
    n_train: int
    domain_min: float | None
    domain_max: float | None
    integral: bool
    feature_min: FloatArray
    feature_max: FloatArray
    feature_mean: FloatArray
    feature_std: FloatArray
    maha_mean: FloatArray
    inv_cov: FloatArray
    # Stated false-positive rate (on training data) -> Mahalanobis distance threshold.
    maha_thresholds: Mapping[float, float]

    def maha_threshold(self, fpr: float) -> float:
        """The distance threshold computed for ``fpr``; a missing rate is a policy error."""
        for rate, value in self.maha_thresholds.items():
            if math.isclose(rate, fpr, rel_tol=1e-9):
                return value
        raise ProfileError(f"profile has no Mahalanobis threshold for fpr {fpr} "
                           f"(available: {sorted(self.maha_thresholds)})")


@dataclass(frozen=True, slots=True)
class ModelProfile:
    model: str
    input: str
    datatype: str
    numeric: NumericProfile | None  # None for models without numeric features (text)


def load_profile(path: Path, *, model: str | None = None) -> ModelProfile:
    """Read and validate one ``profile.json``; ``model`` must match the file's model name."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if len(raw) > MAX_PROFILE_BYTES:
        raise ProfileError(f"{path}: larger than {MAX_PROFILE_BYTES} bytes")
    try:
        doc = strict_json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProfileError(f"{path}: not valid JSON ({exc})") from exc
    try:
        profile = parse_profile(doc)
    except ProfileError as exc:
        raise ProfileError(f"{path}: {exc}") from exc
    if model is not None and profile.model != model:
        raise ProfileError(f"{path}: describes model {profile.model!r}, expected {model!r}")
    return profile


def parse_profile(doc: Any) -> ModelProfile:
    """Validate a decoded profile document (see ``tools/build_models.py``)."""
    if not isinstance(doc, dict):
        raise ProfileError("a profile must be a JSON object")
    version = doc.get("profile_version")
    if type(version) is not int or version != SUPPORTED_VERSION:
        raise ProfileError(f"profile_version must be {SUPPORTED_VERSION}")
    model = _str(doc, "model")
    input_name = _str(doc, "input")
    datatype = _str(doc, "dtype")
    features = doc.get("features")
    if not isinstance(features, list):
        raise ProfileError("features must be a list")
    if not features:
        return ModelProfile(model=model, input=input_name, datatype=datatype, numeric=None)
    if datatype not in {"FP16", "FP32", "FP64"}:
        raise ProfileError("numeric features need a floating-point dtype")
    return ModelProfile(model=model, input=input_name, datatype=datatype, numeric=_numeric(doc, features))


def _numeric(doc: dict[str, Any], features: list[Any]) -> NumericProfile:
    d = len(features)
    if d > MAX_FEATURES:
        raise ProfileError(f"more than {MAX_FEATURES} features")
    shape = doc.get("shape")
    if shape != [-1, d]:
        raise ProfileError(f"shape must be [-1, {d}] for {d} features")
    n_train = doc.get("n_train")
    if type(n_train) is not int or n_train < 2:
        raise ProfileError("n_train must be an integer >= 2")
    columns: dict[str, list[float]] = {"min": [], "max": [], "mean": [], "std": []}
    for position, feature in enumerate(features):
        if not isinstance(feature, dict) or feature.get("index") != position:
            raise ProfileError(f"features[{position}] must be an object with index {position}")
        for key, column in columns.items():
            column.append(_finite(feature, key, f"features[{position}]"))
    lo, hi = _frozen(columns["min"]), _frozen(columns["max"])
    if np.any(lo > hi):
        raise ProfileError("a feature has min > max")
    std = _frozen(columns["std"])
    if np.any(std < 0):
        raise ProfileError("a feature has a negative std")

    domain = doc.get("domain")
    if not isinstance(domain, dict):
        raise ProfileError("domain must be an object")
    domain_min = _optional_finite(domain, "min", "domain")
    domain_max = _optional_finite(domain, "max", "domain")
    integral = domain.get("integral")
    if type(integral) is not bool:
        raise ProfileError("domain.integral must be true or false")
    if domain_min is not None and domain_max is not None and domain_min >= domain_max:
        raise ProfileError("domain.min must be below domain.max")
    # SECURITY: a domain narrower than the training data would refuse the training data.
    if (domain_min is not None and float(lo.min()) < domain_min) or (
            domain_max is not None and float(hi.max()) > domain_max):
        raise ProfileError("training feature ranges fall outside the declared domain")

    maha = doc.get("mahalanobis")
    if not isinstance(maha, dict):
        raise ProfileError("mahalanobis must be an object")
    mean = _matrix(maha.get("mean"), (d,), "mahalanobis.mean")
    inv_cov = _matrix(maha.get("inv_cov"), (d, d), "mahalanobis.inv_cov")
    scale = float(np.abs(inv_cov).max()) or 1.0
    if float(np.abs(inv_cov - inv_cov.T).max()) > _SYMMETRY_TOL * scale:
        raise ProfileError("mahalanobis.inv_cov is not symmetric")
    symmetric = (inv_cov + inv_cov.T) / 2.0
    # SECURITY: a precision matrix with a negative eigenvalue gives negative squared
    # distances along that direction: an attacker could push any input "inside".
    if float(np.linalg.eigvalsh(symmetric).min()) < -_PSD_TOL * scale:
        raise ProfileError("mahalanobis.inv_cov is not positive semi-definite")
    thresholds: dict[float, float] = {}
    for key, value in maha.items():
        match = _THRESHOLD_KEY.fullmatch(key)
        if match is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ProfileError(f"mahalanobis.{key} must be a positive number")
        thresholds[float(match.group(1))] = float(value)
    if not thresholds:
        raise ProfileError("mahalanobis has no threshold_fpr_<rate> entry")
    symmetric.setflags(write=False)
    return NumericProfile(
        n_features=d, n_train=n_train, domain_min=domain_min, domain_max=domain_max, integral=integral,
        feature_min=lo, feature_max=hi, feature_mean=_frozen(columns["mean"]), feature_std=std,
        maha_mean=mean, inv_cov=symmetric, maha_thresholds=thresholds,
    )


def _str(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise ProfileError(f"{key} must be a non-empty string")
    return value


def _finite(obj: dict[str, Any], key: str, where: str) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProfileError(f"{where}.{key} must be a finite number")
    return float(value)


def _optional_finite(obj: dict[str, Any], key: str, where: str) -> float | None:
    return None if obj.get(key) is None else _finite(obj, key, where)


def _frozen(values: list[float]) -> FloatArray:
    array = np.asarray(values, dtype=np.float64)
    array.setflags(write=False)
    return array


def _matrix(value: Any, shape: tuple[int, ...], where: str) -> FloatArray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ProfileError(f"{where} must be numbers of shape {list(shape)}") from exc
    if array.shape != shape:
        raise ProfileError(f"{where} must have shape {list(shape)}, not {list(array.shape)}")
    if not np.all(np.isfinite(array)):
        raise ProfileError(f"{where} must be finite")
    array.setflags(write=False)
    return array
