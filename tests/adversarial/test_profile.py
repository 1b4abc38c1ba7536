"""profile.json loading: the shipped profiles load, and every way a profile can lie is refused."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.adversarial.profile import ProfileError, load_profile, parse_profile
from tests.adversarial import TRITON_REPO


def _digits_doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((TRITON_REPO / "digits" / "profile.json").read_text())
    return doc


@pytest.mark.parametrize("model", ["digits", "risk"])
def test_shipped_numeric_profiles_load(model: str) -> None:
    profile = load_profile(TRITON_REPO / model / "profile.json", model=model)
    assert profile.numeric is not None
    num = profile.numeric
    assert num.inv_cov.shape == (num.n_features, num.n_features)
    assert not num.inv_cov.flags.writeable  # shared by every request: read-only
    assert num.maha_threshold(0.01) < num.maha_threshold(0.001)


def test_text_model_profile_has_no_numeric_part() -> None:
    profile = load_profile(TRITON_REPO / "text_echo" / "profile.json", model="text_echo")
    assert profile.numeric is None
    assert profile.datatype == "BYTES"


def test_model_name_must_match(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="expected 'risk'"):
        load_profile(TRITON_REPO / "digits" / "profile.json", model="risk")


def test_missing_threshold_rate_is_a_policy_error() -> None:
    num = parse_profile(_digits_doc()).numeric
    assert num is not None
    with pytest.raises(ProfileError, match="no Mahalanobis threshold for fpr 0.05"):
        num.maha_threshold(0.05)


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


def _negate_eigen(doc: dict[str, Any]) -> None:
    doc["mahalanobis"]["inv_cov"] = (-np.asarray(doc["mahalanobis"]["inv_cov"])).tolist()


def _asymmetric(doc: dict[str, Any]) -> None:
    doc["mahalanobis"]["inv_cov"][1][2] += 1.0


def _drop_thresholds(doc: dict[str, Any]) -> None:
    for key in [k for k in doc["mahalanobis"] if k.startswith("threshold_fpr_")]:
        del doc["mahalanobis"][key]


BROKEN = [
    # (what is wrong, edit, message fragment)
    ("unknown version", _set(("profile_version",), 2), "profile_version"),
    ("version as a string", _set(("profile_version",), "1"), "profile_version"),
    ("shape disagrees with features", _set(("shape",), [-1, 63]), "shape must be"),
    ("feature index out of order", _set(("features", 3, "index"), 4), "index 3"),
    ("min above max", _set(("features", 20, "min"), 17.0), "min > max"),
    ("negative std", _set(("features", 20, "std"), -1.0), "negative std"),
    ("non-finite mean", _set(("features", 5, "mean"), float("inf")), "finite number"),
    ("boolean as a number", _set(("features", 5, "max"), True), "finite number"),
    ("training data outside the domain", _set(("domain", "max"), 15), "outside the declared domain"),
    ("empty domain", _set(("domain", "min"), 16), "below domain.max"),
    ("integral not a bool", _set(("domain", "integral"), 1), "integral"),
    ("mean of the wrong length", _set(("mahalanobis", "mean"), [0.0] * 63), "mahalanobis.mean"),
    ("precision not square", _set(("mahalanobis", "inv_cov"), [[0.0] * 64] * 63), "inv_cov"),
    ("precision not symmetric", _asymmetric, "not symmetric"),
    ("precision not PSD", _negate_eigen, "positive semi-definite"),
    ("no threshold", _drop_thresholds, "no threshold_fpr"),
    ("negative threshold", _set(("mahalanobis", "threshold_fpr_0.01"), -1.0), "positive number"),
    ("n_train too small", _set(("n_train",), 1), "n_train"),
    ("numeric features with a BYTES dtype", _set(("dtype",), "BYTES"), "floating-point"),
]


@pytest.mark.parametrize(("edit", "message"), [pytest.param(e, m, id=i) for i, e, m in BROKEN])
def test_broken_profiles_are_refused(edit: Callable[[dict[str, Any]], None], message: str) -> None:
    doc = copy.deepcopy(_digits_doc())
    edit(doc)
    with pytest.raises(ProfileError, match=message):
        parse_profile(doc)


@pytest.mark.parametrize(("raw", "message"), [
    pytest.param(b'{"a": 1, "a": 2}', "not valid JSON", id="duplicate-key"),
    pytest.param(b'{"a": NaN}', "not valid JSON", id="nan-literal"),
    pytest.param(b"\xff\xfe", "not valid JSON", id="not-utf8"),
    pytest.param(b"[]", "JSON object", id="not-an-object"),
])
def test_unreadable_files_are_refused(tmp_path: Path, raw: bytes, message: str) -> None:
    path = tmp_path / "profile.json"
    path.write_bytes(raw)
    with pytest.raises(ProfileError, match=message):
        load_profile(path)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(tmp_path / "nope.json")
